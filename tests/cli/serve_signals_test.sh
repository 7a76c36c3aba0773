#!/usr/bin/env bash
# helix-gen serve's start-up and shutdown signals, and its own --leader-addr:
#  1. a SIGTERM while the leader waits in the rendezvous (a rank that never comes) ends it at
#     once (exit 143), not after the rendezvous timeout;
#  2. `serve --leader-addr HOST:PORT` (where the leader listens) starts its CP 2 group (the
#     spawned rank used to get --leader-addr twice and exit);
#  3. a SIGTERM sent to the whole process group (Ctrl-C, systemd, killpg) drains: the stream
#     in flight completes, because the worker rank outlives the signal until its leader is done;
#  4. a worker rank that has not joined yet (its leader absent) ends at once on SIGTERM (it
#     ignored the signal from the start and sat out the 30 s rendezvous timeout).
# Every process is started in its own session and stopped by pid.
# Usage: serve_signals_test.sh HELIX_GEN SHARED_DIR
set -u
gen=$1
shared=$2
model=$shared/models/stories260K
[ -f "$model/stories260K.bin" ] || { echo "skip: no stories260K under $shared"; exit 77; }
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
fail=0
free_port() {  # below the ephemeral range, apart from the other tests' ranges
  python3 - <<'EOF'
import random, socket
for _ in range(200):
    p = random.randrange(9000, 9999)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p)); print(p); break
        except OSError:
            pass
EOF
}
other_port() {  # other_port PORT: a free port that is not PORT
  local p
  p=$(free_port)
  while [ "$p" = "$1" ]; do p=$(free_port); done
  echo "$p"
}
config() {  # config PORT FILE
  cat >"$2" <<EOF
{"model": "$model/stories260K.bin", "tokenizer": "$model/tok512.bin", "num_threads": 1,
 "context_parallel_size": 2, "cp_config": {"cp_type": "HELIX", "tokens_per_block": 8},
 "kv_cache_config": {"tokens_per_block": 8, "max_tokens": 8192, "dtype": "float32"},
 "max_seq_len": 512, "server": {"host": "127.0.0.1", "port": $1},
 "logging": {"level": "warn"}}
EOF
}
wait_port() {  # wait_port PORT PID: 0 once it listens, 1 if the process died or 60 s passed
  for _ in $(seq 600); do
    kill -0 "$2" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

start_alone() {  # start_alone RANK NAME: one rank of a CP 2 group whose other rank never comes
  # (sets pid and leader)
  local port
  port=$(free_port)
  leader=$(other_port "$port")
  config "$port" "$tmp/$2.json"
  setsid "$gen" serve --config "$tmp/$2.json" --rank "$1" --leader-addr "127.0.0.1:$leader" \
    >"$tmp/$2.log" 2>&1 &
  pid=$!
  pids+=("$pid")
}

# 1. SIGTERM during the rendezvous (its store listening means the leader watches signals).
start_alone 0 a
if ! wait_port "$leader" "$pid"; then
  echo "FAIL the leader's rendezvous store did not listen"; sed 's/^/  /' "$tmp/a.log"; fail=1
fi
start=$(date +%s%N)
kill -TERM "$pid"
wait "$pid"
rc=$?
took=$((($(date +%s%N) - start) / 1000000))
if [ "$rc" -eq 143 ] && [ "$took" -lt 5000 ] && grep -q "during start-up" "$tmp/a.log"; then
  echo "ok   SIGTERM during the rendezvous ends the leader (exit $rc after $took ms)"
else
  echo "FAIL SIGTERM during the rendezvous: exit $rc after $took ms"; sed 's/^/  /' "$tmp/a.log"
  fail=1
fi

# 2 and 3. --leader-addr with a spawning leader; then a SIGTERM to the group mid-stream.
port=$(free_port)
leader=$(other_port "$port")
config "$port" "$tmp/b.json"
setsid "$gen" serve --config "$tmp/b.json" --leader-addr "127.0.0.1:$leader" --drain-ms 60000 \
  >"$tmp/b.log" 2>&1 &
pid=$!
pids+=("$pid")
if wait_port "$port" "$pid"; then
  echo "ok   serve --leader-addr starts its CP 2 group"
else
  echo "FAIL serve --leader-addr did not start"; sed 's/^/  /' "$tmp/b.log"; fail=1
fi
"$gen" client --target "127.0.0.1:$port" --prompt "Once upon a time" --max-tokens 400 \
  --temperature 0 >"$tmp/long.txt" 2>"$tmp/long.err" &
client=$!
# Once the stream has begun, the whole group gets the signal.
for _ in $(seq 1200); do [ -s "$tmp/long.txt" ] && break; sleep 0.05; done
kill -TERM -- "-$pid"
wait "$client"
crc=$?
wait "$pid"
src=$?
if [ "$crc" -eq 0 ] && grep -qE "finish_reason=FINISH_REASON_(STOP|LENGTH)" "$tmp/long.err" &&
  [ "$src" -eq 0 ]; then
  echo "ok   a SIGTERM to the process group drains the stream in flight"
else
  echo "FAIL group SIGTERM: client exit $crc, server exit $src"
  sed 's/^/  client: /' "$tmp/long.err" | tail -3; sed 's/^/  server: /' "$tmp/b.log" | tail -5
  fail=1
fi

# 4. SIGTERM to a worker waiting for a leader that is not there.
start_alone 1 w
sleep 1
kill -TERM "$pid"
ended=0
for _ in $(seq 50); do
  kill -0 "$pid" 2>/dev/null || { ended=1; break; }
  sleep 0.1
done
if [ "$ended" -eq 1 ]; then
  echo "ok   a worker rank that has not joined ends on SIGTERM"
else
  echo "FAIL a worker rank waiting for its leader outlived SIGTERM by 5 s"
  fail=1
fi
exit $fail
