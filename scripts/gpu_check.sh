#!/usr/bin/env bash
# The checks that need an NVIDIA GPU (CI has none): the pack's tests on CUDA and the benchmarks there.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (after scripts/setup_host.sh, on a machine with CUDA)
#
# 1. exactness on CUDA in fp32: the patched UNet against the explicit formulas (1e-4), the Apply/Feature Grab
#    behaviour tests and the context nodes (LLaVA on the GPU), ComfyUI started on the GPU with --force-fp32;
# 2. the sampling benchmark on CUDA in ComfyUI's default precision (fp16 for SD1.5): MoMA / plain per step,
#    peak CUDA memory;
# 3. the whole graph through the executor and the smoke tests in ComfyUI's default precision;
# 4. the LLaVA benchmark on CUDA in fp16, full width (hidden 4096) with MOMA_GPU_LLAVA_LAYERS decoder layers;
# 5. LLaVA resident vs streamed vs cpu, fp16 and bf16, also under 6 / 8 GB caps, at the real 7B shape (32 layers).
# Logs and JSON go to OUT_DIR (default: ./gpu-check). Every step runs even if an earlier one fails; the exit
# status is that of the first failing step.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${1:-$REPO/gpu-check}
PY=${MOMA_PYTHON:-${MOMA_HOST_DIR:-$REPO/.host/comfyui-${MOMA_COMFYUI:-0.30}}/venv/bin/python}
LLAVA_LAYERS=${MOMA_GPU_LLAVA_LAYERS:-4}
mkdir -p "$OUT_DIR"
cd "$REPO"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log" | grep -vE "^\s*$" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  [ "$status" -ne 0 ] || status=$rc
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

step tests-cuda-fp32 ${MOMA_GPU_T1:-200} env MOMA_TEST_DEVICE=cuda MOMA_TEST_FP32=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/nodes/test_moma_numerics.py tests/nodes/test_moma_apply.py tests/nodes/test_context_nodes.py \
  tests/moma/test_llava_streaming.py
step sampling-cuda ${MOMA_GPU_T2:-120} "$PY" benchmarks/sampling.py --device cuda --sizes 512 256 --steps 8 --repeats 3 \
  --skip-rerun --json "$OUT_DIR/sampling-cuda.json"
step tests-cuda-default ${MOMA_GPU_T3:-90} env MOMA_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_smoke_host.py tests/nodes/test_moma_apply.py -k "smoke or executor or whole_graph or same_seed or fresh_subject_mask"
step llava-cuda ${MOMA_GPU_T4:-150} "$PY" benchmarks/llava_encode.py --device cuda --precision fp16 --full-width \
  --layers "$LLAVA_LAYERS" --json "$OUT_DIR/llava-cuda.json"
step llava-placement-cuda ${MOMA_GPU_T5:-900} "$PY" benchmarks/llava_encode.py --device cuda --matrix --full-width \
  --layers 32 --repeats 2 --json "$OUT_DIR/llava-placement-cuda.json"
exit $status
