#!/usr/bin/env bash
# Every GPU check the open issues ask for, in parts that each fit one 10-minute command on a lent
# GPU machine (which has torch, triton, transformers and peft, but no network and no install):
#
#   bash bench/gpu_session.sh tests      # GPU tests: bf16 kernels at real sizes, CUDA-graph decoding, model
#   bash bench/gpu_session.sh attention  # bench/attention.py: kernel TFLOP/s vs SDPA, packed vs padded training
#   bash bench/gpu_session.sh decode     # bench/decode_vs_hf.py on the llama-1.1b shape in bf16 (best of 2:
#                                        # HF's default cache needs ~14 s per 200-token run there)
#
# Logs, result JSON and the updated docs/benchmarks.md are copied to $OUT (the device tool brings
# that folder back); copy the JSON and the docs sections into the repo from there. A copy of the
# tree without .git records the commit given as LMSTACK_COMMIT=$(git rev-parse --short HEAD).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lmstack-gpu}
mkdir -p "$OUT"
part=${1:?usage: bash bench/gpu_session.sh tests|attention|decode}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

case "$part" in
  tests)
    python3 -m pytest -p no:cacheprovider -q -rs tests/kernels tests/generate/test_static_cache.py tests/model \
      2>&1 | tee "$OUT/tests.log"
    ;;
  attention)
    # TRITON_PRINT_AUTOTUNING: the log names the config each kernel chose (for the next tuning round)
    TRITON_PRINT_AUTOTUNING=1 python3 bench/attention.py 2>&1 | tee "$OUT/attention.log"
    cp bench/results/attention.json docs/benchmarks.md "$OUT/"
    ;;
  decode)
    python3 bench/decode_vs_hf.py --device cuda --model llama-1.1b --dtype bf16 --repeats 2 2>&1 | tee "$OUT/decode.log"
    cp bench/results/decode_vs_hf_cuda.json docs/benchmarks.md "$OUT/"
    ;;
  *)
    echo "unknown part $part: tests, attention or decode" >&2
    exit 2
    ;;
esac
