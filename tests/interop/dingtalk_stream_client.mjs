#!/usr/bin/env node
// Runs the official DingTalk Stream SDK (npm dingtalk-stream: DWClient with an all-events
// listener and keepAlive on) against a Stream gateway, e.g. the loopback simulator:
//
//   dingtalk_stream_client.mjs <base> <clientId> <clientSecret> [laterOnceType]
//
// The SDK has no setting for its gateway: it POSTs its constant GATEWAY_URL
// (https://api.dingtalk.com/v1.0/gateway/connections/open) through axios's default instance,
// then dials whatever `endpoint` the answer names. A request interceptor on that same axios
// instance sends exactly that request to <base> + the same path, and refuses any other, so
// the SDK's own body and headers reach the simulator unchanged and nothing leaves the machine.
//
// Every event the SDK hands its listener is one JSON line on stdout:
// {"event": <eventType>, "attempt": n, "message_id", "data": <the event JSON>}. The listener
// answers EventAck.LATER the first time it sees <laterOnceType>, SUCCESS otherwise. Each pong
// the SDK's keepalive gets back (it pings every 8 s) is a line {"heartbeat": n}. The first
// line is {"sdk_version", "ready", "gateway_url"} once connect() settled: `ready` is whether
// the socket is open, `gateway_url` the URL the SDK asked for. Closing stdin disconnects and
// exits. The SDK's own log goes to stderr.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import axios from "axios";
import { DWClient, EventAck } from "dingtalk-stream";
import { GATEWAY_URL } from "dingtalk-stream/constants";

const [base, clientId, clientSecret, laterOnce] = process.argv.slice(2);
if (!base || !clientId || !clientSecret) {
  console.error("usage: dingtalk_stream_client.mjs <base> <clientId> <clientSecret> [laterOnceType]");
  process.exit(2);
}
const require = createRequire(import.meta.url);
const pkg = require.resolve("dingtalk-stream/package.json");
const version = JSON.parse(readFileSync(pkg, "utf8")).version.replace(/^v/, "");
// The interceptor works only on the axios the SDK itself imports.
const sdkAxios = createRequire(pkg).resolve("axios");
if (sdkAxios !== require.resolve("axios")) {
  console.error(`dingtalk-stream uses another axios (${sdkAxios}); cannot redirect its gateway`);
  process.exit(3);
}

const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
// The SDK logs with console.info/warn; stdout is for the lines above.
console.info = (...a) => console.error(...a);
console.log = (...a) => console.error(...a);

const gateway = new URL(GATEWAY_URL);
let requested = null;
axios.interceptors.request.use((config) => {
  if (config.url !== GATEWAY_URL) {
    throw new Error(`refusing a request the test did not expect: ${config.method} ${config.url}`);
  }
  requested = config.url;
  config.url = base.replace(/\/$/, "") + gateway.pathname;
  return config;
});

const client = new DWClient({ clientId, clientSecret, keepAlive: true });

const attempts = new Map();
client.registerAllEventListener((msg) => {
  const type = msg.headers.eventType;
  const n = (attempts.get(type) || 0) + 1;
  attempts.set(type, n);
  let data;
  try {
    data = JSON.parse(msg.data);
  } catch {
    data = msg.data;
  }
  say({ event: type, attempt: n, message_id: msg.headers.messageId, data });
  // The listener's answer is sent as the ack's data; it must be returned synchronously.
  if (type === laterOnce && n === 1) {
    return { status: EventAck.LATER, message: "try again later" };
  }
  return { status: EventAck.SUCCESS };
});

// The SDK calls heartbeat() on each pong of its keepalive pings.
let heartbeats = 0;
const heartbeat = client.heartbeat.bind(client);
client.heartbeat = () => {
  heartbeat();
  heartbeats += 1;
  say({ heartbeat: heartbeats });
};

await client.connect();
say({ sdk_version: version, ready: client.connected, gateway_url: requested });

process.stdin.resume();
process.stdin.on("end", () => {
  client.disconnect();
  process.exit(0);
});
