#!/usr/bin/env bash
# The paired callback ratios (target/release/ratio) with AES, SHA-1 and SHA-256 replaced, in the
# guest and natively alike, by stand-ins of about one cycle per byte (bench/crypto-excluded.patch:
# AES whose block function is the identity, a multiply-rotate mix for the digests). What is left
# of the ratio is what the sandbox costs apart from crypto, which no crypto import could remove.
#
#   bench/crypto-excluded.sh build   patched worktree of HEAD, its component and its ratio tool
#   bench/crypto-excluded.sh run     the paired ratios -> target/bench/ratio-nocrypto.json
#
# Run through `./dev bench`, which builds before any measurement starts. Only what is committed
# is measured (a worktree of HEAD). Everything lives under target/crypto-excluded: the first build
# starts from a copy of target/release so the dependencies are not compiled again, and later
# builds are incremental. The patch must apply to HEAD; when the code it touches changes, this
# fails and the patch needs refreshing (`git apply` says where).
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$PWD
dir=$ws/target/crypto-excluded
tree=$dir/tree

case "${1:-}" in
  build)
    mkdir -p "$dir/target"
    if [[ ! -d $dir/target/release && -d target/release ]]; then
      cp -a target/release "$dir/target/"
    fi
    git worktree remove --force "$tree" 2>/dev/null || rm -rf "$tree"
    git worktree prune
    git worktree add -q --detach "$tree" HEAD
    git -C "$tree" apply "$ws/bench/crypto-excluded.patch"
    ln -s ../target "$tree/target"
    (cd "$tree" && ./dev build >/dev/null && cargo build -q --release -p imbridge-bench --bin ratio)
    ;;
  run)
    shift
    [[ -x $tree/target/release/ratio ]] || { echo "error: run '$0 build' first" >&2; exit 1; }
    # The tool writes under its own workspace, the patched tree.
    (cd "$tree" && target/release/ratio "$@")
    mkdir -p target/bench
    cp "$dir/target/bench/ratio.json" target/bench/ratio-nocrypto.json
    git worktree remove --force "$tree"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
