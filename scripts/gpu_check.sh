#!/usr/bin/env bash
# The checks that need an NVIDIA GPU (CI has none), as one prepared run (docs/gpu.md; tools/device_run/).
#
#   bash scripts/gpu_check.sh --pack               here: build .gpu-pack/ (git-ignored), the folder the GPU call
#                                                  carries: ComfyUI 0.30 from the installed host, cut to what an
#                                                  in-process SD1.5 graph needs, and wheels of what the machine lacks
#   bash scripts/gpu_check.sh --dry-run            here, on the CPU: check the packing (sizes, the call's limits) and
#                                                  run the same steps at CPU sizes in a Python holding only the GPU
#                                                  machine's packages and the carried files; what comes back fits
#   bash scripts/gpu_check.sh --bare [OUT_DIR]     on a lent bare GPU machine: its python3, the carried .gpu-pack/;
#                                                  fixtures written there; about 9 minutes at most
#   bash scripts/gpu_check.sh [OUT_DIR]            on a machine with CUDA and the host scripts/setup_host.sh installs
#                                                  (more steps, no lease deadline)
#
# The device-tool call (one call; the lead's checkout, after --pack and --dry-run there):
#   run(command='bash scripts/gpu_check.sh --bare "$OUT"', carry=['.gpu-pack'], timeout_s=600)
#
# Steps (each with its own time limit; one that overruns is cut off and recorded, the next still runs):
#   setup            install the carried wheels (pip --no-index --no-deps --target), describe the machine
#   imports          boot ComfyUI from the carried tree with the pack on CUDA; what fails to import and why
#   fixtures         write the tests' real-format fixtures (full-layout SD1.5, LLaVA, CLIP, adapter, pictures)
#   tests-cuda-fp32  the CUDA exactness tests in fp32 (patched UNet = explicit formulas at 1e-4, Apply, Feature
#                    Grab, context nodes, streaming = resident)
#   sampling-cuda    benchmarks/sampling.py on CUDA at 512 and 768 in ComfyUI's default precision: MoMA / plain per
#                    step (target <= 1.25 at 512), reference pass, peak CUDA memory, ops and syncs per UNet call
#   llava-7b         benchmarks/llava_encode.py --matrix at the real 7B shape, fp16: resident vs streamed, 8 and
#                    6 GB caps (target under 6 GB: peak <= 2.5 GB, encode <= 3x resident, tokens equal)
# Results under OUT_DIR (default: $OUT, else ./gpu-check): summary.json (every step, its results and the targets),
# one log per step, logs.tar.gz (every log, the raw JSON and JUnit XML). Exit status 0 only when every step passed
# and no target was missed.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
device_run() {  # PYTHON ARGS...: tools/ on the path of the runner only (each step sets its own PYTHONPATH)
  local py=$1; shift
  PYTHONPATH="$REPO/tools" PYTHONUNBUFFERED=1 "$py" -m device_run "$@"
}
case "${1:-}" in
  -h|--help) usage ;;
  --pack) shift; device_run python3 pack "$@" ;;
  --dry-run) shift; device_run python3 dry-run "$@" ;;
  --bare) shift; device_run python3 run --plan bare --out "${1:-${OUT:-$REPO/gpu-check}}" ;;
  -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  *)
    PY=${MOMA_PYTHON:-${MOMA_HOST_DIR:-$REPO/.host/comfyui-${MOMA_COMFYUI:-0.30}}/venv/bin/python}
    device_run "$PY" run --plan host --python "$PY" --out "${1:-$REPO/gpu-check}" ;;
esac
