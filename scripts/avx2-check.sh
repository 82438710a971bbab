#!/usr/bin/env bash
# Runs test binaries on an emulated AVX2-only CPU (QEMU's user-mode emulator as an AMD Zen 3:
# AVX2, FMA, F16C, no AVX-512), so the kernels' AVX2 paths run on a developer's AVX-512 machine.
# CI's processor varies between AVX2-only and AVX-512 parts; on an AVX-512 machine the AVX2 paths
# otherwise never run. Emulation is slow (about 200x: cache_and_batching takes ~10 min), so this is a
# check to run when a kernel or a cache type changes, not part of the test command.
#
# usage: scripts/avx2-check.sh [CRATE:TEST[:FILTER] ...]
#        default: tandem-models:quant tandem-models:cache_and_batching
#        CRATE:lib runs a crate's unit tests; FILTER: only the tests whose names contain it;
#        QEMU_CPU picks another emulated CPU (default EPYC-Milan).
# needs: qemu-x86_64 (Debian: apt-get install qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."

cpu="${QEMU_CPU:-EPYC-Milan}"
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 is missing: apt-get install qemu-user" >&2; exit 2; }
[ $# -gt 0 ] || set -- tandem-models:quant tandem-models:cache_and_batching

# Built as README's test command builds them (the whole workspace: the same features, so the same
# binaries), then each named one is looked up by crate and target. Cargo's own messages (a build
# error among them) stay on stderr.
built=$(cargo test --release --workspace --no-run --message-format=json |
  python3 -c 'import json, sys
for m in map(json.loads, sys.stdin):
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kind = "lib" if m["target"]["kind"] == ["lib"] else m["target"]["name"]
        print(m["package_id"].split("#")[0].rsplit("/", 1)[-1], kind, m["executable"])')

executable() { # crate test -> path of its test binary
  awk -v c="$1" -v t="$2" '$1 == c && $2 == t { print $3 }' <<<"$built"
}

failed=0
for spec in "$@"; do
  IFS=: read -r crate test filter <<<"$spec"
  bin=$(executable "$crate" "$test")
  [ -n "$bin" ] || { echo "no test binary $test in crate $crate" >&2; failed=1; continue; }
  echo "== $crate $test on an emulated $cpu ($bin)"
  # Tests find their files from the crate's folder, as under cargo test.
  if ! (cd "crates/$crate" && qemu-x86_64 -cpu "$cpu" "$bin" ${filter:+"$filter"} 2> >(grep -v "TCG doesn't support" >&2)); then
    failed=1
  fi
done
exit $failed
