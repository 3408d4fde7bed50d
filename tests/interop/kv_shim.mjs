// wasi:keyvalue/store + atomics @0.2.0-draft for the jco-transpiled component, in memory.
//
// jco maps every `wasi:keyvalue/*` import here (`--map 'wasi:keyvalue/*=../kv_shim.mjs#*'`), so
// this module exports one object per interface. Like the reference host, only the bucket ""
// exists. `seed` and `dump` let a test carry state in and out (values as UTF-8 strings).

const data = new Map();
const utf8 = new TextEncoder();
const text = new TextDecoder("utf-8", { fatal: true });

class Bucket {
  get(key) {
    return data.get(key);
  }
  set(key, value) {
    data.set(key, Uint8Array.from(value));
  }
  delete(key) {
    data.delete(key);
  }
  exists(key) {
    return data.has(key);
  }
  // One page holds every key: the cursor is only for stores too big to list at once.
  listKeys(_cursor) {
    return { keys: [...data.keys()].sort(), cursor: undefined };
  }
}

// jco turns a thrown `{ payload }` into the `err` of the import's result.
function fail(err) {
  const e = new Error(`wasi:keyvalue: ${err.tag}`);
  e.payload = err;
  return e;
}

export const store = {
  Bucket,
  open(identifier) {
    if (identifier !== "") throw fail({ tag: "no-such-store" });
    return new Bucket();
  },
};

// Counters are decimal text, as in the reference host's store and wasmtime's wasi-keyvalue, so state
// moves between hosts.
export const atomics = {
  increment(_bucket, key, delta) {
    const old = data.get(key);
    let n = 0n;
    if (old !== undefined) {
      const t = new TextDecoder().decode(old).trim();
      if (!/^[0-9]+$/.test(t)) throw fail({ tag: "other", val: "not a counter" });
      n = BigInt(t);
    }
    n += delta;
    if (n >= 1n << 64n) throw fail({ tag: "other", val: "counter overflow" });
    data.set(key, utf8.encode(n.toString()));
    return n;
  },
};

export function seed(entries) {
  for (const [k, v] of Object.entries(entries)) data.set(k, utf8.encode(v));
}

export function dump() {
  const out = {};
  for (const [k, v] of [...data.entries()].sort(([a], [b]) => (a < b ? -1 : 1))) {
    try {
      out[k] = text.decode(v);
    } catch {
      out[k] = { bytes: [...v] };
    }
  }
  return out;
}
