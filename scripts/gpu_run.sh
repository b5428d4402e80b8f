#!/usr/bin/env bash
# The GPU runs behind data/bench/*_h200.json (or *_h100.json), in parts that each fit the lent
# machine's 10-minute command limit. Run from the repository root on a CUDA machine:
#
#   scripts/gpu_run.sh tests decode          # GPU tests (kernels, engine with graphs, sync and async),
#                                            # then the decode-step probe (kvlab.bench.step_probe)
#   scripts/gpu_run.sh engine_tests          # test_gpu and test_engine_attention only (kernels unchanged)
#   scripts/gpu_run.sh race_c                # workload C: kvlab against HF (padded, static + compile,
#   scripts/gpu_run.sh race_a sweep          #   continuous batching); workload A and the concurrency sweep
#   scripts/gpu_run.sh serve1 serve8         # the load test of kvlab serve, --stream-interval 1 and 8
#
# Results go to $OUT (default ./gpu_out); set KVLAB_COMMIT=<sha> when the copy has no .git, so that
# every result records the commit it measured (kvlab.bench.results.git_commit). Wheels the machine lacks (starlette, uvicorn, uvloop,
# httptools, pytest, hypothesis and their dependencies) are installed from ./.whl if it exists; an
# older checkout in ./.baseline (e.g. `git worktree add .baseline <commit>`, its commit in
# .baseline/COMMIT) is measured by the decode part too, as the "before" on the same card. Merge the race parts afterwards with
#   python -m kvlab.bench.engine --merge $OUT/race_*.json --out data/bench/engine_<card>.json
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
        echo "== $name: exit ${PIPESTATUS[0]} ($(date +%T))"; }
for part in "$@"; do
  case $part in
    tests)  run tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine_attention.py \
                tests/test_fused_kernels.py tests/test_prefill_attention.py tests/test_kernels.py
            run exercise_kernel 60 python3 -c "from kvlab.exercises import ch06; from kvlab.exercises.solutions \
                import ch06 as s; print(ch06.check_paged_attention_kernel(s.paged_attention_kernel))" ;;
    engine_tests)                            # the engine's GPU tests only (when the kernels did not change)
            run engine_tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine_attention.py ;;
    decode) if [ -d .baseline/kvlab ]; then
              cp kvlab/bench/step_probe.py /tmp/step_probe.py
              (base=$PWD/.baseline; cd /tmp && PYTHONPATH=/tmp/site:$base KVLAB_COMMIT=$(cat $base/COMMIT 2>/dev/null) \
                  run decode_before 150 python3 /tmp/step_probe.py --modes sync eager --out "$OUT/decode_before.json")
            fi
            run decode 240 python3 -m kvlab.bench.engine --workload --decode-analysis --out "$OUT/race_decode.json" ;;
    race_c) run race_c 480 python3 -m kvlab.bench.engine --workload C --systems kvlab hf_static_compile \
                hf_continuous --out "$OUT/race_c.json" ;;
    race_a) run race_a 240 python3 -m kvlab.bench.engine --workload A --systems kvlab hf_padded hf_static_compile \
                hf_continuous hf_one_at_a_time --subset-slow 4 --out "$OUT/race_a.json" ;;
    sweep)  run sweep 200 python3 -m kvlab.bench.engine --workload --concurrency 1 16 64 256 --out "$OUT/race_sweep.json" ;;
    serve1) run serve1 300 python3 -m kvlab.bench.serve --model smollm2-135m-random --dataset sharegpt \
                --num-prompts 1000 --rates auto --seconds-per-rate 10 --min-prompts 50 --warmup 64 \
                --num-kv-blocks 40000 --slo-ttft-ms 500 --slo-tpot-ms 50 --stream-interval 1 --quiet \
                --out "$OUT/serve_1.json" ;;
    serve8) run serve8 200 python3 -m kvlab.bench.serve --model smollm2-135m-random --dataset sharegpt \
                --num-prompts 1000 --rates inf --warmup 64 --num-kv-blocks 40000 --slo-ttft-ms 500 \
                --slo-tpot-ms 50 --stream-interval 8 --quiet --out "$OUT/serve_8.json" ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
ls -la "$OUT"
