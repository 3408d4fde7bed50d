#!/usr/bin/env bash
# Component size experiment: builds the core module with variants of [profile.component]
# (through cargo's CARGO_PROFILE_COMPONENT_* overrides, so Cargo.toml is untouched), runs
# `wasm-opt -Oz` (Debian's binaryen) on each core module, componentizes both, and records the
# sizes in target/bench/sizes.json. Ends by rebuilding with the committed profile so
# target/imbridge.wasm is what `./dev build` makes. Run through `./dev bench sizes`.
set -euo pipefail
cd "$(dirname "$0")/.."
CORE=target/wasm/wasm32-unknown-unknown/component/imbridge.wasm
OUT=target/bench/sizes
mkdir -p "$OUT"
# ./dev installs binaryen (when root) before it runs this.
if ! command -v wasm-opt >/dev/null; then
  echo "error: needs wasm-opt (Debian's binaryen); run it through ./dev bench sizes" >&2
  exit 1
fi
componentize() { cargo run -q -p imbridge-componentize -- "$1" "$2"; }
entries=()
# name | opt-level | lto | LLVM inline threshold (empty: LLVM's default for the opt-level)
for v in "3-fat-i120|3|fat|120" "3-fat|3|fat|" "s-fat|s|fat|" "z-fat|z|fat|"; do
  IFS='|' read -r name opt lto threshold <<<"$v"
  echo "==> variant $name (opt-level=$opt, lto=$lto, codegen-units=1, inline threshold ${threshold:-default})" >&2
  CARGO_PROFILE_COMPONENT_OPT_LEVEL=$opt CARGO_PROFILE_COMPONENT_LTO=$lto \
    CARGO_PROFILE_COMPONENT_CODEGEN_UNITS=1 IMBRIDGE_INLINE_THRESHOLD=$threshold ./dev build >/dev/null
  cp "$CORE" "$OUT/$name.core.wasm"
  componentize "$OUT/$name.core.wasm" "$OUT/$name.wasm"
  opt_bytes=null
  if command -v wasm-opt >/dev/null; then
    # The component-type custom section must survive: wasm-opt keeps custom sections.
    wasm-opt -Oz --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
      --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
      "$OUT/$name.core.wasm" -o "$OUT/$name.core.opt.wasm"
    componentize "$OUT/$name.core.opt.wasm" "$OUT/$name.opt.wasm"
    opt_bytes=$(stat -c %s "$OUT/$name.opt.wasm")
  fi
  entries+=("{\"name\":\"$name (opt-level $opt, lto $lto, inline threshold ${threshold:-LLVM default})\",\"bytes\":$(stat -c %s "$OUT/$name.wasm"),\"wasm_opt_bytes\":$opt_bytes}")
done
ver=$(wasm-opt --version 2>/dev/null | head -1 || echo none)
(IFS=,; echo "{\"wasm_opt_version\":\"$ver\",\"variants\":[${entries[*]}]}") > target/bench/sizes.json
echo "==> rebuilding with the committed profile" >&2
./dev build
