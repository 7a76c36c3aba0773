#!/usr/bin/env bash
# KV transfer throughput next to ucx_perftest on the same transport, in one run (issue 6).
#   tests/bench/kv_transfer_bench.sh BUILD_DIR [SHARED_DIR]
# UCX_TLS=tcp (loopback): the hand-off needs UCX's peer error handling to notice a dead or
# stalled context server, which this UCX build offers with TCP lanes (its endpoints, to the
# context server's listener, get no shared-memory lanes with it); shared-memory transports
# would be faster on one host but cannot report a lost peer. ucx_perftest runs ucp_get with the
# same message size (one KV block) and as many gets in flight (64) as UcxTransfer keeps per job.
# The pulls run both through the exporter's listener (the hand-off) and through its worker
# address (before 2026-11-28), interleaved.
set -euo pipefail
build=${1:?build dir}
shared=${2:-$(dirname "$0")/../../../shared}
export UCX_TLS=tcp UCX_NET_DEVICES=lo
block=737280
port=$((20000 + RANDOM % 20000))
ucx_perftest -p "$port" > /dev/null 2>&1 &
server=$!
sleep 0.5
perf=$(ucx_perftest 127.0.0.1 -p "$port" -t ucp_get -s "$block" -n 400 -w 20 -O 64 | grep Final)
kill "$server" 2> /dev/null || true
wait "$server" 2> /dev/null || true
# ucx_perftest's "MB/s" is MiB/s (2^20 bytes).
mibs=$(echo "$perf" | awk '{print $6}')
ref=$(awk -v m="$mibs" 'BEGIN {printf "%.3f", m * 1048576 / 1e9}')
echo "ucx_perftest ucp_get ${block} B x 64 in flight, UCX_TLS=tcp: ${ref} GB/s"
out=$("$build/tests/kv_transfer_bench" --model "$shared/models/stories260K/stories260K.bin" \
  --tokenizer "$shared/models/stories260K/tok512.bin" 2> /dev/null)
echo "$out"
echo "$out" | awk -v ref="$ref" '$1 ~ /^[0-9]+$/ {printf "%8s tokens: %s GB/s = %.2f of ucx_perftest (by worker address %s = %.2f)\n", $1, $5, $5 / ref, $6, $6 / ref}'
