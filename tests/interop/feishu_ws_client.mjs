#!/usr/bin/env node
// Runs the official Feishu Node SDK's long-connection client (@larksuiteoapi/node-sdk
// WSClient + EventDispatcher) against a Feishu endpoint, e.g. the loopback simulator:
//
//   feishu_ws_client.mjs <domain> <appId> <appSecret> [failOnceType]
//
// <domain> replaces https://open.feishu.cn: the SDK POSTs <domain>/callback/ws/endpoint and
// dials the WebSocket URL it answers. Every event the SDK dispatches is one JSON line on
// stdout: {"event": <type>, "attempt": n, "data": <what the handler got>}. A handler for
// <failOnceType> throws on its first call (the SDK then acks with code 500). The first line is
// {"sdk_version", "ready": true} once the SDK reports the connection ready. Closing stdin
// closes the client and exits. The SDK's own log goes to stderr.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import lark from "@larksuiteoapi/node-sdk";

const [domain, appId, appSecret, failOnce] = process.argv.slice(2);
if (!domain || !appId || !appSecret) {
  console.error("usage: feishu_ws_client.mjs <domain> <appId> <appSecret> [failOnceType]");
  process.exit(2);
}
const require = createRequire(import.meta.url);
const pkg = require.resolve("@larksuiteoapi/node-sdk/package.json");
const version = JSON.parse(readFileSync(pkg, "utf8")).version;

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const toStderr = (...a) => console.error(...a);
const logger = { error: toStderr, warn: toStderr, info: toStderr, debug: toStderr, trace: toStderr };

const attempts = new Map();
const handler = (type) => async (data) => {
  const n = (attempts.get(type) || 0) + 1;
  attempts.set(type, n);
  say({ event: type, attempt: n, data });
  if (type === failOnce && n === 1) {
    throw new Error(`handler for ${type} fails its first attempt`);
  }
};
const dispatcher = new lark.EventDispatcher({ logger, loggerLevel: lark.LoggerLevel.warn }).register({
  "im.message.receive_v1": handler("im.message.receive_v1"),
  approval_instance: handler("approval_instance"),
  approval_task: handler("approval_task"),
});

const client = new lark.WSClient({
  appId,
  appSecret,
  domain,
  logger,
  loggerLevel: lark.LoggerLevel.warn,
  onReady: () => say({ sdk_version: version, ready: true }),
  onError: (e) => say({ error: String(e && e.message ? e.message : e) }),
});
client.start({ eventDispatcher: dispatcher });

process.stdin.resume();
process.stdin.on("end", () => {
  client.close({ force: true });
  process.exit(0);
});
