#!/usr/bin/env bash
# Every GPU check the open issues ask for, in ONE command that fits a lent GPU's device time (15
# minutes a session, the machine's start included): a budget of 480 s by default, which leaves
# about 4 minutes to rerun one step on the still-warm machine.
#
#   here:   python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy pytest \
#               tokenizers safetensors pyyaml jinja2 tqdm              # the GPU machine's Triton (3.6.0 in
#               ../.library/device/KINDS.md's pip list as of 2026-11; use the version listed there), once
#           PYTHONPATH=src /tmp/t36/bin/python bench/triton_cache.py   # 6 minutes on 2 CPU cores
#               (it needs .whl/triton-3.6.0-cp312-*.whl for the key: its docstring says how to fetch it)
#   run:    command "LMSTACK_COMMIT=<sha> bash bench/gpu_session.sh", carry [".triton-cache.tar.gz"],
#           timeout_s 540
#
# The steps, most important first; each runs under `timeout` with at most its cap and never past
# the budget (first argument, seconds; the second, optional, names the steps to run, e.g. "decode"),
# and leaves its results in $OUT as it ends:
#   tests     bf16 kernels at real sizes, half precision, the model through the kernels, CUDA-graph decoding
#   kernels   bench/attention.py --part kernels: TFLOP/s vs SDPA flash and cuDNN on the issue's grid
#   training  bench/attention.py --part training: packed varlen vs padded batches, llama-1.1b shape
#   decode    bench/decode_vs_hf.py on the llama-1.1b shape in bf16 (issue 3)
#   rest      the remaining kernel tests (fp32 small shapes; CI runs them in the interpreter)
# .triton-cache.tar.gz (optional) holds the kernels compiled ahead on a CPU (bench/triton_cache.py):
# without it the GPU compiles them itself, minutes of the budget. summary.txt says how many it
# still compiled (cache misses).
#
# Back in $OUT (at most 8 files come back): summary.txt, logs.tar.gz, attention.json,
# decode_vs_hf_cuda.json, benchmarks.md. Copy the JSON into bench/results/ and the docs sections
# into docs/benchmarks.md. A copy of the tree without .git records LMSTACK_COMMIT as the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lmstack-gpu}
BUDGET=${1:-480}
STEPS=" ${2:-tests kernels training decode rest} "  # a later session can run the steps an earlier one missed
START=$SECONDS
LOGS=/tmp/lmstack-gpu-logs  # outside $OUT: only 8 files come back, so the logs travel as one archive
rm -rf "$LOGS" && mkdir -p "$LOGS" "$OUT"
STAMP=$LOGS/.started && touch "$STAMP"  # pack() returns only results written after this
SUMMARY="$OUT/summary.txt"

say() { echo "$*" | tee -a "$SUMMARY"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$SUMMARY"

CACHE=/tmp/lmstack-triton-cache  # bench/triton_cache.py's CACHE_DIR: its files name this path
export TRITON_CACHE_DIR=$CACHE
if [ -f .triton-cache.tar.gz ]; then
  rm -rf "$CACHE" && mkdir -p "$CACHE" && tar xzf .triton-cache.tar.gz -C "$CACHE"
  python3 - "$CACHE/manifest.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import hashlib, json, os, sys
import triton.runtime.cache as c
m = json.load(open(sys.argv[1]))
ours = hashlib.sha256(c.triton_key().encode()).hexdigest()
here = os.environ.get("LMSTACK_COMMIT", "?")
print(f"triton cache: {m['entries']} kernels compiled ahead at {m['commit']} (this tree: {here}); key "
      + ("matches" if ours == m["triton_key_sha256"] else f"DIFFERS ({ours[:12]} here, {m['triton_key_sha256'][:12]} there): every kernel compiles here"))
EOF
else
  say "triton cache: none carried (.triton-cache.tar.gz); every kernel compiles here"
fi
# the attention kernels' binaries (torch.compile's kernels land in TRITON_CACHE_DIR too)
cached() { find "$CACHE" \( -name '_fwd_kernel.cubin' -o -name '_bwd_*_kernel.cubin' \) 2>/dev/null | wc -l; }
BEFORE=$(cached)

# step NAME CAP COMMAND...: run under min(CAP, what is left of the budget), log to $LOGS/NAME.log
step() {
  local name=$1 cap=$2; shift 2
  [[ "$STEPS" == *" $name "* ]] || return 0
  local left=$(( BUDGET - (SECONDS - START) - 15 ))  # 15 s to pack the results
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then say "$name: skipped, ${left}s of the budget left"; return; fi
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict="rc $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="CUT at its ${limit}s limit"
  say "$name: $verdict after $(( SECONDS - t0 ))s | $(grep -E 'passed|failed|error|nothing measured' "$LOGS/$name.log" | tail -1)"
  tail -n 25 "$LOGS/$name.log"
  pack
}

pack() {  # the files this session wrote (the tree's older copies would pass for new results)
  for f in bench/results/attention.json bench/results/decode_vs_hf_cuda.json docs/benchmarks.md; do
    if [ -f "$f" ] && [ "$f" -nt "$STAMP" ]; then cp "$f" "$OUT/"; fi
  done
  tar czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"
}

GPU_TESTS="bf16_real or bf16_varlen or half_precision or backend_triton or tiny_transformer or cuda_graph"
step tests 100 python3 -m pytest -p no:cacheprovider -rs tests/kernels/test_flash_attention.py \
  tests/generate/test_static_cache.py -k "$GPU_TESTS"
step kernels 130 env TRITON_PRINT_AUTOTUNING=1 python3 bench/attention.py --part kernels
step training 80 python3 bench/attention.py --part training
step decode 300 python3 bench/decode_vs_hf.py --device cuda --model llama-1.1b --dtype bf16 --new-tokens 128 --repeats 1
step rest 60 python3 -m pytest -p no:cacheprovider -rs tests/kernels/test_flash_attention.py -k "not ($GPU_TESTS)"

say "kernels compiled on the GPU (not in the carried cache): $(( $(cached) - BEFORE ))"
say "total: $(( SECONDS - START ))s of a ${BUDGET}s budget"
pack
