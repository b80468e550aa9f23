#!/usr/bin/env bash
# One device session on the lent GPU: correctness, kernel bandwidth, engine latency (see docs/bench.md).
# usage: bash benchmarks/device_session.sh STAGES   (STAGES: comma list of env,tests,suite,pdltest,ab,w8a8,profile,ncu,kernels,bench,hf,check,mainjob)
# Carry what benchmarks/device_inputs.sh prepares (.whl, .devdata): the wheels are installed and the Qwen tokenizer
# and calibration text there are the defaults of the tests and the main job.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=",${1:-env,tests,bench,kernels},"
has() { [[ "$STAGES" == *",$1,"* ]]; }
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ -f .devdata/tokenizer/tokenizer.json ]; then
  export QUANTBENCH_TEST_TOKENIZER=${QUANTBENCH_TEST_TOKENIZER:-$PWD/.devdata/tokenizer}
  MAIN_TOKENIZER=${MAIN_TOKENIZER:-$PWD/.devdata/tokenizer}
fi
[ -f .devdata/calib.txt ] && MAIN_CALIB=${MAIN_CALIB:-$PWD/.devdata/calib.txt}
if has env; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1 | tee "$OUT/env.txt"
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.txt"
  python3 -c "import torch; from quantbench.engine.kernels import pdl; print('pdl launch:', pdl.launch_args(torch.device('cuda')))" 2>&1 | tee -a "$OUT/env.txt"
  (which ncu nvcc; nvidia-smi --query-gpu=clocks.sm,clocks.mem --format=csv) 2>&1 | tee -a "$OUT/env.txt"
fi
if has tests; then
  timeout ${T_TESTS:-240} python3 -m pytest -q -x -m cuda ${TESTS_PATHS:-tests/test_kernels.py} -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"
fi
if has suite; then  # every CUDA test
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${SUITE_WORKERS:-6}")
  timeout ${T_SUITE:-300} python3 -m pytest -q -rfE -m cuda $workers tests -p no:cacheprovider > "$OUT/suite.txt" 2>&1
  tail -25 "$OUT/suite.txt"
fi
if has pdltest; then  # PDL on vs off: identical tokens; CUDA graph vs eager
  timeout ${T_PDLTEST:-200} python3 -m pytest -q -x -m cuda tests/test_kernels.py -k "${PDLTEST_K:-pdl or engine_graph}" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pdltest.txt"
fi
if has ab; then
  timeout ${T_AB:-300} python3 benchmarks/engine_ab.py --methods "${AB_METHODS:-int4:group=128;nf4:block=64;int8;fp8}" \
    --variants "${AB_VARIANTS:-base;nopdl}" --batch ${AB_BATCH:-1,8} --input ${AB_INPUT:-128} --output ${AB_OUTPUT:-128} --json "$OUT/engine_ab.json" 2>&1 | tee "$OUT/engine_ab.txt" | tail -30
fi
if has w8a8; then  # W8A8 products of evaluation-sized batches: 8-bit tensor cores against slabs + cuBLAS
  timeout ${T_W8A8:-240} python3 benchmarks/w8a8_gemm_sweep.py --methods "${W8A8_METHODS:-llm.int8,smoothquant,fp8}" \
    --m "${W8A8_M:-1024,2752}" ${W8A8_ARGS:-} --json "$OUT/w8a8_gemm_sweep.json" 2>&1 | tee "$OUT/w8a8_gemm_sweep.txt" | tail -40
fi
if has profile; then  # top kernels of a prompt pass and of a decode step, per method
  timeout ${T_PROFILE:-300} python3 benchmarks/decode_profile.py --methods "${PROF_METHODS:-int4:group=128;nf4:block=64;int8;fp8;llm.int8:compute=bf16}" \
    ${PROF_ARGS:-} --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.txt" | tail -${PROF_TAIL:-150}
fi
if has ncu; then  # hardware counters of the four GEMVs of one layer, in their real sequence (eager decode)
  for m in ${NCU_METHODS:-int4:group=128}; do
    tag=$(echo "$m" | tr -c 'a-z0-9\n' '_')
    timeout ${T_NCU:-150} ncu --clock-control none -k regex:${NCU_KERNEL:-_mma_gemv_kernel} --launch-skip 128 --launch-count 4 \
      --set full -f -o "$OUT/ncu_$tag" python3 benchmarks/engine_ab.py --ncu --variants nopdl --methods "$m" > "$OUT/ncu_$tag.log" 2>&1
    ncu --import "$OUT/ncu_$tag.ncu-rep" --page details > "$OUT/ncu_$tag.txt" 2>&1
    grep -E "^  _|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Compute \(SM\) Th|Issue Slots Busy|Eligible Warps|No Eligible|L2 Hit|Mem Busy|Max Bandwidth|Warp Cycles Per Issued|Active Warps|stalled" "$OUT/ncu_$tag.txt" | head -${NCU_LINES:-60}
  done
fi
if has bench; then
  timeout ${T_BENCH:-300} python3 -m quantbench bench random:mistral-7b --methods "${BENCH_METHODS:-bf16;int4:group=128;nf4:block=64;int8}" \
    --batch ${BENCH_BATCH:-1,8} --input 128 --output 128 --repeats 3 --db "$OUT/quantbench.db" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" | grep -v "^\s*$" | tail -40
fi
if has kernels; then
  timeout ${T_KERNELS:-240} python3 benchmarks/kernel_bw.py ${KERNEL_ARGS:-} --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -80
fi
if has hf; then
  timeout ${T_HF:-420} python3 benchmarks/latency_vs_hf.py --json "$OUT/latency_vs_hf.json" ${HF_ARGS:-} 2>&1 | tee "$OUT/latency_vs_hf.txt" | tail -40
fi
if has check; then
  timeout ${T_CHECK:-240} python3 benchmarks/cuda_methods_check.py --json "$OUT/cuda_methods_check.json" 2>&1 | tee "$OUT/check.txt" | tail -20
fi
if has mainjob; then  # the seed's table on a random 7B, each method under MAIN_VARIANTS (docs/bench.md "The main job on a GPU")
  timeout ${T_MAINJOB:-540} python3 benchmarks/main_job_gpu.py --tokenizer "${MAIN_TOKENIZER:?a directory holding the Qwen tokenizer}" \
    --methods "${MAIN_METHODS:-bf16;int4:group=128;nf4:block=64,compute=fp16;fp8}" --variants "${MAIN_VARIANTS:-base;refext}" \
    --tasks "${MAIN_TASKS:-mmlu}" --seed-questions ${MAIN_SEED:-0} --hf-methods "${MAIN_HF:-}" ${MAIN_CALIB:+--calib "$MAIN_CALIB"} ${MAIN_ARGS:-} \
    --json "$OUT/main_job.json" 2>&1 | tee "$OUT/main_job.txt" | grep -v "^block" | tail -30
fi
