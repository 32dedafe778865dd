#!/usr/bin/env bash
# The one script a session runs first when it is lent an NVIDIA GPU (H100 / H200): at most
# 8 minutes, every part under its own time limit, and a markdown block for benchmarks/RESULTS.md
# printed last. It installs nothing: it runs this checkout on the machine's own packages.
#
#   1. pytest -m gpu              the kernels against the references, compiled on the GPU
#   2. benchmarks/paged_attention.py   decode GB/s vs measured copy and jax's bundled paged_attention,
#                                      our Mosaic GPU decode kernel vs our Triton one (pages of 64);
#                                      prefill TFLOP/s vs jax.nn.dot_product_attention(cudnn)
#   3. benchmarks/moe.py          grouped matmul TFLOP/s (Triton and Mosaic GPU kernels) vs jax.lax.ragged_dot
#                                 and a dense matmul of equal FLOPs
#   4. benchmarks/quantized_matmul.py  int4 / int8 / GGUF Q4_1 / Q8_0 fused dequantize-matmul GB/s and
#                                      TFLOP/s vs XLA (dequantize, then dot) and a dense bf16 matmul, Llama-8B layers
#   5. benchmarks/engine_gpu.py   random-weight bf16 Llama-3.1-8B shape: batch-1 decode tok/s and offline
#                                 throughput (256 prompts, 512 in / 256 out); a Mixtral-shaped MoE with 4 layers
#   6. benchmarks/spec_decode_gpu.py  speculative decoding at batch 1 and 16 on the 8B shape: ngram, a 2-layer
#                                 draft model, a random EAGLE-3 head and (DeepSeek-style target) a random MTP layer
#                                 against plain decoding; random heads measure overhead only, not a speed-up
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (PYTHON=python3 by default)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: every part on tiny shapes, kernels interpreted off GPU
# Logs and JSON go to $GPU_CHECK_OUT (default: a new temporary folder; $OUT on the lent machine).
set -u
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOGS=${GPU_CHECK_OUT:-${OUT:-$(mktemp -d)}}
mkdir -p "$LOGS"
REPORT="$LOGS/gpu_check.md"
STATUS=0

# part NAME SECONDS COMMAND...: run one part under its limit, keep its log, note its outcome.
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local outcome="ok"
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then outcome="TIMED OUT after ${limit}s"; STATUS=1
  elif [[ $rc -ne 0 ]]; then outcome="FAILED (exit $rc)"; STATUS=1; fi
  {
    echo
    echo "### $name: $outcome in $((SECONDS - start))s"
    echo
    echo "\`$*\`"
    echo
    # JSON records as a code block, then the markdown tables (one blank line before each).
    if grep -q '^{' "$LOGS/$name.log"; then echo '```'; grep '^{' "$LOGS/$name.log"; echo '```'; fi
    awk '/^\|/ { if (!inside) print ""; inside = 1; print; next } { inside = 0 }' "$LOGS/$name.log"
    grep -E '^[0-9]+ (passed|failed|skipped|deselected|error)|^=+ .*(passed|failed|skipped|error)' "$LOGS/$name.log" | tail -n 1
    if [[ $outcome != ok ]]; then echo; echo '```'; tail -n 15 "$LOGS/$name.log"; echo '```'; fi
  } >>"$REPORT"
  tail -n 3 "$LOGS/$name.log" >&2
}

{
  echo "## GPU check ($(date -u +%Y-%m-%d), $( (nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU') | head -n 1))"
  echo
  echo "- Versions: $("$PYTHON" -c 'import sys, jax; import importlib.util as u; t = __import__("triton").__version__ if u.find_spec("triton") else "none"; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}, triton {t}, backend {jax.default_backend()}")' 2>&1)"
  echo "- Command: \`bash benchmarks/gpu_check.sh$([[ $DRY_RUN == 1 ]] && echo ' --dry-run')\` at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} >"$REPORT"

if [[ $DRY_RUN == 1 ]]; then
  part pytest_gpu 300 "$PYTHON" -m pytest -q -m gpu tests/pallas_kernels -p no:cacheprovider
  part paged_attention 300 "$PYTHON" benchmarks/paged_attention.py --dry-run --json "$LOGS/paged_attention.json"
  part grouped_matmul 300 "$PYTHON" benchmarks/moe.py --dry-run --configs mixtral --json "$LOGS/moe.json"
  part quantized_matmul 300 "$PYTHON" benchmarks/quantized_matmul.py --dry-run --rows 1 130 --layers down \
    --formats int4 int8 q4_1 q8_0 fp8 --json "$LOGS/quantized_matmul.json"
  part engine 300 "$PYTHON" benchmarks/engine_gpu.py --dry-run --json "$LOGS/engine.json"
  part spec_decode 300 "$PYTHON" benchmarks/spec_decode_gpu.py --dry-run --methods eagle3 mtp --batches 1 --budget-s 240 --json "$LOGS/spec_decode.json"
else
  # Limits sum to 480 s (8 minutes).
  part pytest_gpu 80 "$PYTHON" -m pytest -q -m gpu tests/pallas_kernels -p no:cacheprovider
  part paged_attention 70 "$PYTHON" benchmarks/paged_attention.py --batches 1 8 64 --contexts 4096 \
    --prefill-batches 1 4 --prefill-lengths 2048 --json "$LOGS/paged_attention.json"
  part grouped_matmul 60 "$PYTHON" benchmarks/moe.py --configs mixtral qwen3 --tokens 64 4096 --iters 10 --samples 5 \
    --json "$LOGS/moe.json"
  part quantized_matmul 40 "$PYTHON" benchmarks/quantized_matmul.py --rows 1 512 --iters 10 --samples 3 \
    --json "$LOGS/quantized_matmul.json"
  part engine_llama8b 100 "$PYTHON" benchmarks/engine_gpu.py --models llama8b --json "$LOGS/engine_llama8b.json"
  part engine_mixtral 60 "$PYTHON" benchmarks/engine_gpu.py --models mixtral --mixtral-layers 4 \
    --json "$LOGS/engine_mixtral.json"
  part spec_decode 70 "$PYTHON" benchmarks/spec_decode_gpu.py --batches 1 16 --budget-s 50 \
    --json "$LOGS/spec_decode.json"
fi

echo
cat "$REPORT"
exit $STATUS
