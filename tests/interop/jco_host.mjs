// Runs target/imbridge.wasm in Node through jco: `jco transpile` turns the component into an ES
// module, preview2-shim provides wasi:http, clocks and random, and kv_shim.mjs wasi:keyvalue.
//
//   node jco_host.mjs TRANSPILED.js handle-callback --app APP.json --input REQUEST.json \
//       [--kv-seed KV.json] [--kv-out KV.json]
//
// Files and output are in the JSON form of `imbridge-host invoke` (one `{"ok": …}` or
// `{"err": {"kind", "message", …}}` line, exit 0 either way). `--kv-seed` loads a key→text
// object into the store first, `--kv-out` writes the store afterwards.

import { readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { seed, dump } from "./kv_shim.mjs";

const [module, exportName, ...rest] = process.argv.slice(2);
const opts = {};
for (let i = 0; i < rest.length; i += 2) opts[rest[i].replace(/^--/, "")] = rest[i + 1];
const readJson = (p) => JSON.parse(readFileSync(p, "utf8"));

const camel = (k) => k.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const snake = (k) => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
const utf8 = new TextEncoder();
const text = new TextDecoder("utf-8", { fatal: true });

// jco's forms: records with camelCase fields, `undefined` for none, Uint8Array for bytes.
function toJco(v) {
  if (v === null) return undefined;
  if (Array.isArray(v)) return v.map(toJco);
  if (typeof v !== "object") return v;
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [camel(k), toJco(x)]));
}

function fromJco(v) {
  if (v === undefined || v === null) return null;
  if (typeof v === "bigint") return Number(v);
  if (v instanceof Uint8Array) return text.decode(v);
  if (Array.isArray(v)) return v.map(fromJco);
  if (typeof v !== "object") return v;
  return Object.fromEntries(Object.entries(v).map(([k, x]) => [snake(k), fromJco(x)]));
}

function httpRequest(r) {
  return {
    method: r.method ?? "POST",
    path: r.path ?? "/",
    query: r.query ?? "",
    headers: r.headers ?? [],
    body: utf8.encode(r.body ?? ""),
  };
}

// Exports whose arguments this runner can build; each takes `--app` and `--input`.
const calls = {
  "handle-callback": (m, app, input) => m.handleCallback(app, httpRequest(input)),
  "handle-event": (m, app, input) =>
    m.handleEvent(app, utf8.encode(typeof input === "string" ? input : JSON.stringify(input))),
};

if (!calls[exportName]) {
  console.error(`usage: node jco_host.mjs TRANSPILED.js (${Object.keys(calls).join("|")}) …`);
  process.exit(2);
}
if (opts["kv-seed"]) seed(readJson(opts["kv-seed"]));
const plugin = await import(pathToFileURL(resolve(module)).href);
let reply;
try {
  reply = { ok: fromJco(calls[exportName](plugin, toJco(readJson(opts.app)), readJson(opts.input))) };
} catch (e) {
  // jco throws a ComponentError whose payload is the WIT `error` variant; anything else (a
  // trap, a shim failure) is the host failing, as in `imbridge-host invoke`.
  if (!e || e.payload === undefined) throw e;
  const { tag, val } = e.payload;
  reply = {
    err: typeof val === "object" ? { kind: tag, ...fromJco(val) } : { kind: tag, message: val },
  };
}
if (opts["kv-out"]) writeFileSync(opts["kv-out"], JSON.stringify(dump()));
console.log(JSON.stringify(reply));
