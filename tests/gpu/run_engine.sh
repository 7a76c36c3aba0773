#!/usr/bin/env bash
# One device call on the lent GPU machine for the engine on the CUDA backend: configure the
# kernels-only tree with HELIX_DEVICE_ENGINE=ON (Gloo, UCX and nlohmann-json from the Debian
# packages unpacked in .devdeps; NCCL from the toolkit or from Python's nvidia-nccl package),
# build, run the tests (cuda_ops_test: every CUDA op against the CPU; cuda_backend_test, each
# test in its own process: stories260K, the GGUF and the tiny DeepSeek models on the GPU vs the
# CPU engine, seeded device sampling, Helix CP/TP ranks sharing the GPU over Gloo,
# disaggregated KV through pinned staging; nccl_communicator_test), then the end-to-end decode
# benchmark on a random-weight model of Llama-3.2-1B's shape at 8K and 32K context against the
# roofline (weight + KV bytes / the D2D copy bandwidth measured in the same run), the kernel
# benchmarks (decode attention with its variants against a read kernel and PyTorch SDPA, at that
# model's head dim 64 and at 128; decode GEMMs; causal prefill attention, default vs tensor-core
# kernel), the end-to-end benchmark on SmolLM2-135M's shape, and print a short summary last:
# what a short call must measure comes first. Order: tests, copy bench, the 1B shape's end-to-end
# runs, head-dim-64 attention + SDPA, compute-sanitizer over the kernels changed since the last
# GPU call, PROFILE=1's Nsight Systems traces of decode steps as they run (nsys_*: .nsys-rep and
# .sqlite files, keep them out of the tarball too; tests/gpu/nsys_summary.py reads the trace CSV)
# and Nsight Compute steps (a per-kernel GPU time profile of decode steps, and
# section reports of the decode attention kernels, ncu_attention_*: a .ncu-rep each, several
# MiB; keep them out of a tarball that must stay under 16 MiB), then what earlier calls measured
# already (attention at head dim 128 + SDPA, GEMV, prefill, SmolLM2-135M's shape).
#
#   tests/gpu/run_engine.sh       (from the repository root; carry [".devdeps"])
#
# .devdeps must hold: root/ (googletest sources and the unpacked debs: libgloo-dev libgloo0
# libhiredis0.14 libibverbs1 libnl-3-200 libnl-route-3-200 libucx-dev libucx0 libnuma1
# nlohmann-json3-dev), shared/models/stories260K (a copy of ../shared/models/stories260K, which
# does not travel) and test_models/llama_BF16.gguf, llama_Q8_0.gguf, qwen2_F32.gguf (written by
# tests/models/make_test_models.py with gguf-py): `bash tests/gpu/prepare_devdeps.sh` on the dev
# machine makes all of it.
# Logs go to $OUT when set (else build-gpu-engine/logs). RUN_ENGINE_BUDGET_S (default 540).
set -u
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
BUILD=${BUILD_DIR:-$ROOT/build-gpu-engine}
LOGS=${OUT:-$BUILD/logs}
mkdir -p "$LOGS"
BUDGET=${RUN_ENGINE_BUDGET_S:-540}
TAG=run_engine
source "$ROOT/tests/gpu/run_lib.sh"

SHARED=${HELIX_SHARED_DIR:-}
if [[ -z $SHARED ]]; then
  if [[ -d $ROOT/.devdeps/shared/models/stories260K ]]; then
    SHARED=$ROOT/.devdeps/shared
  else
    SHARED=$ROOT/../shared
  fi
fi
export HELIX_SHARED_DIR=$SHARED
# UCX's transport modules from the same debs (its compiled-in module folder is /usr/lib/...).
export UCX_MODULE_DIR=$ROOT/.devdeps/root/usr/lib/x86_64-linux-gnu/ucx
# The executables' RUNPATH covers only their direct libraries; UCX's and Gloo's own (uct, ucm,
# numa, hiredis, ibverbs, libnl) are not installed on the GPU machine.
DEPS=$ROOT/.devdeps/root
export LD_LIBRARY_PATH=$DEPS/usr/lib:$DEPS/usr/lib/x86_64-linux-gnu:$DEPS/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
NCCL_FLAGS=()
if [[ ! -f /usr/local/cuda/include/nccl.h ]]; then
  NCCL_DIR=$(python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)
  if [[ -n $NCCL_DIR && -f $NCCL_DIR/include/nccl.h ]]; then
    NCCL_LIB=$(ls "$NCCL_DIR"/lib/libnccl.so* 2>/dev/null | head -1)
    NCCL_FLAGS=(-DNCCL_INCLUDE_DIR="$NCCL_DIR/include" -DNCCL_LIBRARY="$NCCL_LIB")
    export LD_LIBRARY_PATH=$NCCL_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi
reset_foreign_build
# The decode benchmark runs (shape:context:cuda graphs[:gemv[:pdl[:fold[:mma[:sa[:ns[:gr[:pf[:st[:ek]]]]]]]]]]; gemv 1 = the
# decode GEMMs as GemvCuda (decode_bench --gemv 1), 0 = all on cuBLAS; pdl 1 = programmatic
# dependent launch of the step's kernels (--pdl 1); both default to 0 here (the old path; no run
# below measures it any more: every one has both on, as the engine does); fold 0 = no norms folded into the GEMV
# (--fold 0), default 1; mma 1 = decode attention's math on the tensor cores (--attn-mma 1, the
# engine's default since 2026-11-26; 0 here unless given); sa 1 = the chunked greedy argmax
# (--split-argmax 1), default 0; ns 1 = the norms from the partial sums of squares the products
# adding into the residual stream leave (--norm-sums 1), default 0; gr 1 = RoPE and the K/V write
# in the q|k|v GEMV (--gemv-rope 1), default 0; pf N = decode attention prefetching up to N MiB of
# the next products' weights (Wo, then gate|up) into L2 (--l2-prefetch-mb N), default 0; st N =
# the shortest split-KV chunk decode attention may pick, in tokens (--attn-min-chunk N), default
# 0: 128; ek 1 = decode attention's first KV copies before its launch wait (--attn-early-kv 1),
# default 0) and
# the profiled ones
# (shape:context:graphs[:mma[:sa[:ns[:gr]]]], with decode_bench's defaults otherwise: GEMV, PDL and
# folding on; the kernel table shows the argmax kernels' own times, which a 1 % change of the
# step hides in the end-to-end runs' noise).
PROFILES=(llama3-1b:8192:1:1 llama3-1b:8192:1:1:1:1:1)
# PROFILE=1 also: decode attention's kernels in detail (head dim:tokens, batch 1).
ATTN_PROFILES=(64:8192 128:32768)
# PROFILE=1 also: Nsight Systems traces of the decode step (shape:context:early KV copies).
NSYS_RUNS=(llama3-1b:8192:0 llama3-1b:8192:1 smollm2-135m:8192:0)
# The Llama-3.2-1B shape's runs come right after the tests (the roofline goal and the switches'
# A/B), SmolLM2-135M's baseline and all-switches runs after the kernel benchmarks.
# The L2 prefetch: alone (24 MiB: Wo's 8 MiB and 16 of gate|up's 64), and with every switch at
# 9 MiB (Wo's 8 and 1 of gate|up) and 24 MiB. st512: split-KV chunks of at least 512 tokens, 16 a head at 8K
# instead of 32 (the attention_bench_d64 table's mc512 column, in the step). ek: the early KV
# copies alone and with the three other switches (sa, ns, gr), at 8K and 32K, and SmolLM2's.
RUNS=(llama3-1b:8192:1:1:1:1:1 llama3-1b:8192:1:1:1:1:1:0:0:0:0:0:1
  llama3-1b:8192:1:1:1:1:1:1:1:1:0:0:1 llama3-1b:32768:1:1:1:1:1:0:0:0:0:0:1
  llama3-1b:8192:1:1:1:1:1:1 llama3-1b:8192:1:1:1:1:1:0:1
  llama3-1b:8192:1:1:1:1:1:0:0:1 llama3-1b:8192:1:1:1:1:1:1:1:1
  llama3-1b:8192:1:1:1:1:1:0:0:0:24 llama3-1b:8192:1:1:1:1:1:1:1:1:9
  llama3-1b:8192:1:1:1:1:1:1:1:1:24 llama3-1b:8192:1:1:1:1:1:1:1:1:0:512
  llama3-1b:32768:1:1:1:1:1
  llama3-1b:32768:1:1:1:1:1:1:1:1 llama3-1b:32768:1:1:1:1:1:1:1:1:24 smollm2-135m:8192:1:1:1:1:1
  smollm2-135m:8192:1:1:1:1:1:1:1:1 smollm2-135m:8192:1:1:1:1:1:0:0:0:0:0:1)
# The log / result name of a RUNS entry.
run_name() {
  local s ctx g v d f m sa ns gr pf st ek
  IFS=: read -r s ctx g v d f m sa ns gr pf st ek <<<"$1"
  echo "decode_${s}_${ctx}_g$g$([[ ${v:-0} == 1 ]] && echo _gemv)$([[ ${d:-0} == 1 ]] && echo _pdl)$([[ ${f:-1} == 0 ]] && echo _nofold)$([[ ${m:-0} == 1 ]] && echo _mma)$([[ ${sa:-0} == 1 ]] && echo _sa)$([[ ${ns:-0} == 1 ]] && echo _ns)$([[ ${gr:-0} == 1 ]] && echo _gr)$([[ ${pf:-0} != 0 ]] && echo _pf$pf)$([[ ${st:-0} != 0 ]] && echo _st$st)$([[ ${ek:-0} == 1 ]] && echo _ek)"
}
# The log / result name (and trace prefix) of an NSYS_RUNS entry.
nsys_name() {
  local s ctx ek
  IFS=: read -r s ctx ek <<<"$1"
  echo "nsys_${s}_${ctx}$([[ ${ek:-0} == 1 ]] && echo _ek)"
}
# The log / result name of a PROFILES entry.
profile_name() {
  local s ctx g m sa ns gr
  IFS=: read -r s ctx g m sa ns gr <<<"$1"
  echo "ncu_${s}_${ctx}_g$g$([[ ${m:-0} == 1 ]] && echo _mma)$([[ ${sa:-0} == 1 ]] && echo _sa)$([[ ${ns:-0} == 1 ]] && echo _ns)$([[ ${gr:-0} == 1 ]] && echo _gr)"
}
step configure configure.log 90 cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" \
  -DHELIX_KERNELS_ONLY=ON -DHELIX_DEVICE_ENGINE=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90 "${NCCL_FLAGS[@]}"
TARGETS=(cuda_backend_test cuda_ops_test decode_bench gpu_copy_bench gpu_gemv_bench
  gpu_attention_bench)
if cmake --build "$BUILD" --target help 2>/dev/null | grep -q nccl_communicator_test; then
  TARGETS+=(nccl_communicator_test)
fi
step build build.log 240 cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}"
BUILD_OK=$?
if [[ $BUILD_OK == 0 ]]; then
  # The tiny DeepSeek checkpoints for the MLA cases (numpy + safetensors are on the machine).
  export HELIX_TEST_MODELS_DIR=$BUILD/test_models
  step mla_models mla_models.log 60 python3 "$ROOT/tests/models/make_mla_models.py" \
    "$HELIX_TEST_MODELS_DIR"
  # The GGUF cases need gguf-py to write their models, which the machine lacks: carried ones.
  cp "$ROOT"/.devdeps/test_models/*.gguf "$HELIX_TEST_MODELS_DIR"/ 2>/dev/null
  # Each test in its own process (a crash fails that test alone), four at a time.
  EACH=(bash -c 'source "$0"; gtest_each "$@"' "$ROOT/tests/gpu/run_lib.sh")
  step cuda_backend_test cuda_backend_test.log 200 "${EACH[@]}" \
    "$BUILD/engine/cuda_backend_test" "$LOGS/cuda_backend_test" 4 150
  if [[ -x $BUILD/engine/nccl_communicator_test ]]; then
    step nccl_test nccl_test.log 120 "${EACH[@]}" \
      "$BUILD/engine/nccl_communicator_test" "$LOGS/nccl_test" 1 80
  else
    RESULT[nccl_test]="not built (no NCCL found; see configure.log)"
  fi
  step cuda_ops_test cuda_ops_test.log 90 "$BUILD/tests/gpu/cuda_ops_test"
  step copy_bench copy_bench.log 60 "$BUILD/tests/gpu/copy_bench"
  # Random-weight models of two shapes (make_bench_model.py): SmolLM2-135M's and Llama-3.2-1B's.
  # Each run: 8 untimed warm-up steps, then 64 timed ones.
  bench_shape() {
    local shape=$1 r s ctx g v d f m sa ns gr pf st ek n
    step model_$shape model_$shape.log 150 python3 "$ROOT/tests/bench/make_bench_model.py" \
      "$BUILD/bench_$shape" --shape $shape --seq 33000 || return
    for r in "${RUNS[@]}"; do
      IFS=: read -r s ctx g v d f m sa ns gr pf st ek <<<"$r"
      [[ $s == "$shape" ]] || continue
      n=$(run_name "$r")
      step $n $n.log 120 "$BUILD/decode_bench" \
        --backend cuda --cuda-graphs $g --gemv ${v:-0} --pdl ${d:-0} --fold ${f:-1} \
        --attn-mma ${m:-0} --split-argmax ${sa:-0} --norm-sums ${ns:-0} --gemv-rope ${gr:-0} \
        --l2-prefetch-mb ${pf:-0} --attn-min-chunk ${st:-0} --attn-early-kv ${ek:-0} \
        --model "$BUILD/bench_$s/model.bin" \
        --tokenizer "$BUILD/bench_$s/tok.bin" --context $ctx --batch 1 --steps 64 --warmup 8 \
        --weight-dtype bfloat16 --kv-dtype bfloat16 --tokens-per-block 32
    done
  }
  # What a short call must measure first: the Llama-3.2-1B shape's step (the roofline goal and
  # the switches' A/B), then decode attention at that shape (head dim 64, 32 / 8 heads) and its
  # contexts with the variants and SDPA beside it (which split, warps and math suit the step).
  bench_shape llama3-1b
  step attention_bench_d64 attention_bench_d64.log 60 "$BUILD/tests/gpu/attention_bench" \
    --quick --head-dim 64 --tokens 8192,32768 --batches 1,4 --csv "$LOGS/attention_bench_d64.csv"
  step sdpa_bench_d64 sdpa_bench_d64.log 60 python3 "$ROOT/tests/gpu/sdpa_bench.py" --quick \
    --head-dim 64 --tokens 8192,32768 --batches 1,4 --csv "$LOGS/sdpa_bench_d64.csv"
  # The kernels added or changed since the last GPU call (run there only under the CPU
  # emulation of CUDA) under compute-sanitizer: memcheck over the GEMV fusions (norm sums, RoPE
  # + K/V write), the chunked argmax, the Helix combine's pack/unpack, the row gather/scatter
  # the attention's L2 prefetch and its early KV copies (the deferred own rows), the non-finite
  # attention cases and both merge kernels (the one-pass one is new); racecheck over
  # the fusions' shared-memory epilogues and the early copies' ring slots.
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ -x $SANITIZER ]]; then
    NEW_OPS='CudaOpsTest.GemvNormSumsHandOff:CudaOpsTest.GemvRopeKv*:CudaOpsTest.RopeWriteKv*'
    NEW_OPS+=':CudaOpsTest.ArgmaxMatchesGreedySampler:CudaOpsTest.HelixCombinePackUnpackMerge'
    NEW_OPS+=':CudaOpsTest.GatherRowsMatchesCpu:CudaOpsTest.ScatterAddRowsMatchesCpu'
    NEW_OPS+=':CudaOpsTest.AttentionEarlyKv*:CudaOpsTest.AttentionNonFiniteInputs'
    NEW_OPS+=':CudaOpsTest.MergeStatesHelixLayout'
    step memcheck_new_ops memcheck_new_ops.log 120 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 "$BUILD/tests/gpu/cuda_ops_test" "--gtest_filter=$NEW_OPS"
    step memcheck_l2_prefetch memcheck_l2_prefetch.log 60 "$SANITIZER" --tool memcheck \
      --error-exitcode 1 "$BUILD/engine/cuda_backend_test" \
      '--gtest_filter=CudaBackendAttention.L2PrefetchHintCutToTheOption'
    step racecheck_new_ops racecheck_new_ops.log 90 "$SANITIZER" --tool racecheck \
      --error-exitcode 1 "$BUILD/tests/gpu/cuda_ops_test" \
      '--gtest_filter=CudaOpsTest.GemvNormSumsHandOff:CudaOpsTest.GemvRopeKv*:CudaOpsTest.ArgmaxMatchesGreedySampler:CudaOpsTest.AttentionEarlyKv*'
  else
    RESULT[memcheck_new_ops]="not run (no compute-sanitizer)"
  fi
  # PROFILE=1: every kernel's GPU time (Nsight Compute, one metric; caches not flushed and clocks
  # not locked between kernels, as in a real step) over the prefill, one warm-up and two timed
  # decode steps of each PROFILES run (shape:context:cuda graphs[:mma]; decode_bench's default
  # GEMMs).
  # PROFILE=1, first: the decode step as it really runs (Nsight Systems, each kernel of the
  # replayed graphs traced with its real start and duration, programmatic launches overlapping;
  # ncu below runs one kernel at a time), for the NSYS_RUNS (shape:context:early KV), 2 warm-up
  # and 8 timed steps; nsys_summary.py prints the step's span and each kernel's duration and gap.
  NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
    /usr/local/cuda/nsight-systems-*/bin/nsys 2>/dev/null | head -1)
  if [[ ${PROFILE:-0} == 1 && -n $NSYS ]]; then
    for r in "${NSYS_RUNS[@]}"; do
      IFS=: read -r s ctx ek <<<"$r"
      [[ -f $BUILD/bench_$s/model.bin ]] || continue
      n=$(nsys_name "$r")
      step $n $n.log 90 "$NSYS" profile --trace=cuda --sample=none --cpuctxsw=none \
        --cuda-graph-trace=node --force-overwrite=true -o "$LOGS/$n" "$BUILD/decode_bench" \
        --backend cuda --cuda-graphs 1 --gemv 1 --pdl 1 --attn-mma 1 --attn-early-kv ${ek:-0} \
        --model "$BUILD/bench_$s/model.bin" --tokenizer "$BUILD/bench_$s/tok.bin" --context $ctx \
        --batch 1 --steps 8 --warmup 2 --weight-dtype bfloat16 --kv-dtype bfloat16 \
        --tokens-per-block 32 &&
        "$NSYS" stats --report cuda_gpu_trace --format csv --force-export=true \
          --output "$LOGS/$n" "$LOGS/$n.nsys-rep" >> "$LOGS/$n.log" 2>&1
    done
  elif [[ ${PROFILE:-0} == 1 ]]; then
    RESULT[nsys]="not run (no nsys found)"
  fi
  NCU=$(command -v ncu || true)
  if [[ ${PROFILE:-0} == 1 && -n $NCU ]]; then
    for r in "${PROFILES[@]}"; do
      IFS=: read -r s ctx g m sa ns gr <<<"$r"
      [[ -f $BUILD/bench_$s/model.bin ]] || continue
      n=$(profile_name "$r")
      step $n $n.csv 90 "$NCU" --metrics gpu__time_duration.sum \
        --cache-control none --clock-control none --csv --print-units base "$BUILD/decode_bench" \
        --backend cuda --cuda-graphs $g --attn-mma ${m:-0} --split-argmax ${sa:-0} \
        --norm-sums ${ns:-0} --gemv-rope ${gr:-0} --model "$BUILD/bench_$s/model.bin" \
        --tokenizer "$BUILD/bench_$s/tok.bin" \
        --context $ctx --batch 1 --steps 2 --warmup 1 --weight-dtype bfloat16 \
        --kv-dtype bfloat16 --tokens-per-block 32
    done
    # Where decode attention's time goes (below the read bandwidth at batch 1): one call of each
    # kernel (attention_bench --once) under ncu's speed-of-light, memory, occupancy, launch,
    # scheduler and warp-state sections (replayed, so caches are flushed between passes), at the
    # 1B step's shape (head dim 64, 8K tokens) and at the issue's 32K x 1 (head dim 128): the
    # fp32-math kernel ("ours"), the tensor-core one (mma, the engine's default), the copies
    # alone (loadonly) and the split-KV merge after each.
    for a in "${ATTN_PROFILES[@]}"; do
      IFS=: read -r hd tk <<<"$a"
      step ncu_attention_d${hd}_$tk ncu_attention_d${hd}_$tk.txt 90 "$NCU" \
        -o "$LOGS/ncu_attention_d${hd}_$tk" -f \
        -k "regex:AttentionWarpKernel|MergeKernel" --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section SchedulerStats --section WarpStateStats "$BUILD/tests/gpu/attention_bench" \
        --once --head-dim $hd --tokens $tk --batches 1 --variants mma,loadonly
    done
  fi
  # Measured in earlier calls already, so last: head dim 128 attention and SDPA, the GEMV and
  # prefill benches, SmolLM2-135M's shape end to end.
  # Decode attention (GQA 32 / 8 heads, head dim 128, bf16 KV): the default kernel and its
  # variants, the tensor-core ones among them, against a read kernel; then PyTorch's SDPA on the
  # same shapes (both --quick: 4K and 32K tokens, batch 1 and 4).
  step attention_bench attention_bench.log 90 "$BUILD/tests/gpu/attention_bench" --quick \
    --csv "$LOGS/attention_bench.csv"
  step sdpa_bench sdpa_bench.log 60 python3 "$ROOT/tests/gpu/sdpa_bench.py" --quick \
    --csv "$LOGS/sdpa_bench.csv"
  # Decode GEMMs: cuBLAS (converting x or not) vs GemvCuda vs a read of the same weights.
  step gemv_bench gemv_bench.log 60 "$BUILD/tests/gpu/gemv_bench"
  # Causal prefill attention: the default kernel against the tensor-core prefill kernel.
  step prefill_bench prefill_bench.log 60 "$BUILD/tests/gpu/attention_bench" --prefill --quick \
    --csv "$LOGS/prefill_bench.csv"
  bench_shape smollm2-135m
fi

{
  echo "==== run_engine summary ($(( $(date +%s) - T0 ))s total) ===="
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
    sed 's/^/device: /'
  for s in configure build mla_models cuda_backend_test nccl_test cuda_ops_test copy_bench \
    gemv_bench attention_bench sdpa_bench prefill_bench model_llama3-1b model_smollm2-135m "${RUNS[@]}" \
    attention_bench_d64 sdpa_bench_d64 memcheck_new_ops memcheck_l2_prefetch racecheck_new_ops "${PROFILES[@]/#/ncu:}" "${ATTN_PROFILES[@]/#/ncua:}"; do
    if [[ $s == ncua:* ]]; then
      s=ncu_attention_d${s#ncua:}
      s=${s/:/_}
    elif [[ $s == ncu:* ]]; then
      s=$(profile_name "${s#ncu:}")
    elif [[ $s == *:* ]]; then
      s=$(run_name "$s")
    fi
    printf '%-30s %s\n' "$s" "${RESULT[$s]:-not run}"
  done
  for r in "${NSYS_RUNS[@]}"; do
    n=$(nsys_name "$r")
    printf '%-30s %s\n' "$n" "${RESULT[$n]:-${RESULT[nsys]:-not run}}"
  done
  for t in cuda_backend_test nccl_test; do
    [[ -f $LOGS/$t/results.txt ]] || continue
    echo "$t (one process per test):"
    sed 's/^/  /' "$LOGS/$t/results.txt"
    grep -E " (FAILED|TIMEOUT)" "$LOGS/$t/results.txt" | while read -r name _; do
      echo "  --- $name:"
      grep -hE "Failure|error|Error|FATAL|Expected|Which is|Value of|actual" \
        "$LOGS/$t/${name//\//_}.log" | head -6 | cut -c1-200 | sed 's/^/    /'
    done
  done
  [[ -f $LOGS/cuda_ops_test.log ]] &&
    grep -hE "^\[  (PASSED|FAILED) |^\[  FAILED  \]|Failure" "$LOGS/cuda_ops_test.log" | head -8
  for t in memcheck_new_ops memcheck_l2_prefetch racecheck_new_ops; do
    [[ -f $LOGS/$t.log ]] || continue
    echo "$t: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$t.log" | head -1)"
    grep -hE "^========= (Invalid|Error|Race|.*hazard)" "$LOGS/$t.log" | sort | uniq -c |
      head -5 | cut -c1-200 | sed 's/^/  /'
  done
  [[ -f $LOGS/copy_bench.log ]] && cat "$LOGS/copy_bench.log"
  if [[ -f $LOGS/gemv_bench.log ]]; then
    echo "decode GEMMs, bf16 weights (us per call; fraction of the read kernel's bandwidth):"
    echo "  (norm: RMSNorm then gemv / fused; glu: gemv then SiLU·mul / fused)"
    awk '/^shape=/ { for (i = 1; i <= NF; ++i) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "  %-20s m %s: cublas %6s (%s) +lowp %6s, gemv %6s (%s), read %6s, norm %s / %s",
             v["shape"], v["m"], v["cublas_us"], v["cublas_vs_read"], v["cublas_lowp_us"],
             v["gemv_us"], v["gemv_vs_read"], v["read_us"], v["norm_then_gemv_us"],
             v["gemv_norm_fused_us"]
      if (v["gemv_silu_fused_us"] + 0 > 0)
        printf ", glu %s / %s", v["gemv_then_silu_us"], v["gemv_silu_fused_us"]
      printf "\n" }
      !/^shape=/ { print "  " $0 }' "$LOGS/gemv_bench.log" | head -24
  fi
  if [[ -s $LOGS/attention_bench.csv ]]; then
    echo "decode attention (ours: PagedAttentionCuda defaults; frac = KV GB/s / pure-read GB/s of"
    echo "the same bytes; torch = SDPA, same run; variants in ms, mma = tensor-core math):"
    grep -E "^variants" "$LOGS/attention_bench.log" | cut -c1-400
    python3 "$ROOT/tests/gpu/sdpa_bench.py" --summary --ours "$LOGS/attention_bench.csv" \
      --torch "$LOGS/sdpa_bench.csv"
  fi
  if [[ -s $LOGS/attention_bench_d64.csv ]]; then
    echo "decode attention at head dim 64 (the Llama-3.2-1B runs' shape; same columns):"
    python3 "$ROOT/tests/gpu/sdpa_bench.py" --summary --head-dim 64 \
      --ours "$LOGS/attention_bench_d64.csv" --torch "$LOGS/sdpa_bench_d64.csv"
  fi
  if [[ -f $LOGS/prefill_bench.log ]]; then
    echo "causal prefill attention (attention_bench --prefill --quick):"
    grep -vE "^device|^prefill:" "$LOGS/prefill_bench.log" | sed 's/^/  /'
  fi
  D2D=$(sed -n 's/.*d2d_gb_s=\([0-9.]*\).*/\1/p' "$LOGS/copy_bench.log" 2>/dev/null)
  echo "end-to-end decode (random-weight models, bf16 weights and KV, batch 1, 64 timed steps"
  echo "after 8 warm-up ones; roofline = (weight bytes + KV bytes read) / D2D copy GB/s of the"
  echo "same run):"
  for r in "${RUNS[@]}"; do
    IFS=: read -r sh ctx g v d fo mm sa ns gr pmb st ek <<<"$r"
    f=$LOGS/$(run_name "$r").log
    [[ -f $f ]] || continue
    line=$(grep '^engine=' "$f")
    [[ -n $line ]] || { tail -3 "$f"; continue; }
    ms=$(sed -n 's/.*ms_per_step=\([0-9.]*\).*/\1/p' <<<"$line")
    wb=$(sed -n 's/.*weight_bytes=\([0-9.]*\).*/\1/p' <<<"$line")
    kb=$(sed -n 's/.*kv_read_bytes=\([0-9.]*\).*/\1/p' <<<"$line")
    rp=$(sed -n 's/.*graph_replays=\([0-9]*\).*/\1/p' <<<"$line")
    cp=$(sed -n 's/.*graph_captures=\([0-9]*\).*/\1/p' <<<"$line")
    pf=$(sed -n 's/.*prefill_s=\([0-9.]*\).*/\1/p' <<<"$line")
    awk -v pf="$pf" -v m=$sh -v c=$ctx -v g=$g -v v=${v:-0} -v d=${d:-0} -v fo=${fo:-1} -v mm=${mm:-0} -v sa=${sa:-0} -v ns=${ns:-0} -v gr=${gr:-0} -v pfm=${pmb:-0} -v st=${st:-0} -v ek=${ek:-0} -v rp="$rp" -v cp="$cp" -v ms="$ms" -v wb="$wb" \
      -v kb="$kb" -v bw="${D2D:-0}" 'BEGIN {
      roof = bw > 0 ? (wb + kb) / (bw * 1e9) * 1e3 : 0;
      printf "%-13s context %6d graphs %d gemv %d pdl %d fold %d mma %d sa %d ns %d gr %d pf %2d st %d ek %d (%2d replays, %d captures): " \
             "%.3f ms/step, roofline %.3f ms (%.0f MB weights + %.0f MB KV), ratio %.2f; " \
             "prefill %.2f s\n", m, c, g, v, d, fo, mm, sa, ns, gr, pfm, st, ek, rp, cp, ms, roof, wb / 1e6, kb / 1e6,
             (roof > 0 ? ms / roof : 0), pf }'
  done
  for r in "${PROFILES[@]}"; do
    IFS=: read -r sh ctx g m sa ns gr <<<"$r"
    f=$LOGS/$(profile_name "$r").csv
    [[ -f $f ]] || continue
    echo "kernel profile $sh context $ctx graphs $g attn-mma ${m:-0} split-argmax ${sa:-0} norm-sums ${ns:-0} gemv-rope ${gr:-0} (ncu: one kernel at a time, caches kept, clocks unlocked):"
    python3 "$ROOT/tests/gpu/ncu_summary.py" "$f" --top 12 | sed 's/^/  /'
  done
  for r in "${NSYS_RUNS[@]}"; do
    IFS=: read -r s ctx ek <<<"$r"
    n=$(nsys_name "$r")
    f=$(ls "$LOGS/${n}"_cuda_gpu_trace*.csv 2>/dev/null | head -1)
    [[ -n $f ]] || continue
    echo "decode step timeline $s context $ctx early KV ${ek:-0} (nsys, graphs traced per kernel):"
    python3 "$ROOT/tests/gpu/nsys_summary.py" "$f" --top 24 | sed 's/^/  /'
  done
  for a in "${ATTN_PROFILES[@]}"; do
    f=$LOGS/ncu_attention_d${a/:/_}
    [[ -f $f.ncu-rep && -n ${NCU:-} ]] || continue
    echo "decode attention kernels, head dim ${a%%:*}, ${a#*:} tokens, batch 1 (ncu, one call each):"
    # Which variant each kernel is (the names differ only in the mode, <..., 0|1|2>).
    grep -h '^once:' "$f.txt" | sed 's/^/  /'
    "$NCU" -i "$f.ncu-rep" --csv --print-units base --page details > "$f.details.csv" 2>&1
    "$NCU" -i "$f.ncu-rep" --csv --print-units base --page raw > "$f.raw.csv" 2>&1
    python3 "$ROOT/tests/gpu/ncu_summary.py" --sections "$f.details.csv" --raw "$f.raw.csv" |
      sed 's/^/  /'
  done
} > "$LOGS/summary.txt" 2>&1
cat "$LOGS/summary.txt"
