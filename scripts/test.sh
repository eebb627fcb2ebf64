#!/usr/bin/env bash
# README's test command: install the host (idempotent), then run the whole test suite in it.
#   bash scripts/test.sh [--comfyui 0.30|0.3.75] [pytest args...]
# The ComfyUI version: --comfyui, else $MOMA_COMFYUI, else the one installed in $MOMA_HOST_DIR, else 0.30.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/scripts/host_choice.sh" "$@"   # sets HOST, COMFYUI_VERSION and PASSTHROUGH (the other args)
# (pip's notes about this machine's missing local index folders are filtered out; a failed install still fails)
bash "$REPO/scripts/setup_host.sh" --comfyui "$COMFYUI_VERSION" "$HOST" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
cd "$REPO"
echo "[test] ComfyUI $COMFYUI_VERSION at $HOST"
set +e
MOMA_COMFYUI="$COMFYUI_VERSION" MOMA_HOST_DIR="$HOST" "$HOST/venv/bin/python" -m pytest "${PASSTHROUGH[@]}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (exit 5 must not pass as success)" >&2
  exit 1
fi
exit "$rc"
