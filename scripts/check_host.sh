#!/usr/bin/env bash
# Check this pack against any ComfyUI tree (your own install, or a newer release) and print a one-screen verdict:
#   1. the host contract: every ComfyUI hook the pack relies on (nodes/host_contract.py, and the runner's)
#   2. the smoke test (tests/test_smoke_host.py): the pack registers, the SD1.5 fixture samples through KSampler
#      with replace patches on all 16 blocks, an API workflow runs through ComfyUI's executor
#   3. the demo: the default example workflow on tiny generated models (scripts/run_workflow.py --demo)
#
#   bash scripts/check_host.sh --comfyui DIR [--python PYTHON] [--keep]
#
# DIR is the ComfyUI folder (the one with main.py). PYTHON defaults to DIR/../venv/bin/python, DIR/venv/bin/python or
# DIR/.venv/bin/python if one exists, else python3; it needs ComfyUI's requirements, the pack's (requirements.txt)
# and pytest. Nothing is written into DIR: ComfyUI runs on a temporary base directory (models/, input/, output/,
# custom_nodes/ with the pack linked), on the CPU. Logs stay in that folder (printed at the end; removed on success
# unless --keep). Exit status: 0 when every step passes, 1 otherwise, 2 for bad arguments.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMFY="" PY="" KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) COMFY=${2:-}; shift 2 ;;
    --comfyui=*) COMFY=${1#--comfyui=}; shift ;;
    --python) PY=${2:-}; shift 2 ;;
    --python=*) PY=${1#--python=}; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "check_host: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$COMFY" ] || [ ! -f "$COMFY/main.py" ] || [ ! -d "$COMFY/comfy" ]; then
  echo "check_host: --comfyui DIR must be a ComfyUI folder (with main.py and comfy/); got '${COMFY}'" >&2
  exit 2
fi
COMFY=$(cd "$COMFY" && pwd)
if [ -z "$PY" ]; then
  for candidate in "$COMFY/../venv/bin/python" "$COMFY/venv/bin/python" "$COMFY/.venv/bin/python"; do
    if [ -x "$candidate" ]; then PY=$candidate; break; fi
  done
  PY=${PY:-python3}
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moma-check-host-XXXXXX")
# The tests and the runner find ComfyUI at $MOMA_HOST_DIR/ComfyUI: a host folder whose ComfyUI is DIR itself.
ln -s "$COMFY" "$WORK/ComfyUI"
VERSION=$("$PY" -c "import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print(comfyui_version.__version__)" "$COMFY" 2>/dev/null || echo unknown)
echo "$VERSION" > "$WORK/comfyui-version"
export MOMA_HOST_DIR="$WORK" MOMA_COMFYUI="$VERSION" PYTHONDONTWRITEBYTECODE=1
VERSIONS=$("$PY" - <<'PY' 2>/dev/null || echo "python: cannot import torch"
import platform
import importlib.metadata as md

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"

print(f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}")
PY
)
step() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  ( cd "$REPO" && "$@" ) > "$log" 2>&1
  local rc=$?
  RESULTS+=("$(printf '  %-14s %s  (%d s)  %s' "$name" "$([ $rc -eq 0 ] && echo pass || echo FAIL)" \
    $((SECONDS - start)) "$(summary "$name" "$log")")")
  [ $rc -eq 0 ] || STATUS=1
}
summary() {  # one line from a step's log
  case "$1" in
    contract) grep -E "^host contract:" "$2" | tail -1; grep -E "^  FAIL" "$2" | sed 's/^  FAIL  /broken: /' | head -3 ;;
    smoke*) grep -E "(passed|failed|error)" "$2" | tail -1 | sed 's/=//g' ;;
    demo) if grep -q "^done in" "$2"; then grep "^done in" "$2"; else grep -E "^error|Error" "$2" | tail -1; fi ;;
  esac | tr '\n' ' '
}
RESULTS=() STATUS=0
echo "[check_host] ComfyUI $VERSION at $COMFY; $VERSIONS; logs in $WORK"
step contract "$WORK/contract.log" env PYTHONPATH="$REPO/tools" "$PY" -m moma_runner.contract "$COMFY"
step "smoke test" "$WORK/smoke.log" "$PY" -m pytest tests/test_smoke_host.py -q -p no:cacheprovider
step demo "$WORK/demo.log" "$PY" scripts/run_workflow.py --demo --comfyui "$COMFY" --cpu
echo
echo "ComfyUI-MoMA host check, $(date +%Y-%m-%d)"
echo "  ComfyUI $VERSION at $COMFY"
echo "  $VERSIONS"
printf '%s\n' "${RESULTS[@]}"
if [ "$STATUS" -eq 0 ]; then
  echo "verdict: PASS: the pack works on this ComfyUI"
  [ "$KEEP" -eq 1 ] && echo "logs: $WORK" || rm -rf "$WORK"
else
  echo "verdict: FAIL: see the logs in $WORK (contract.log, smoke.log, demo.log)"
fi
exit "$STATUS"
