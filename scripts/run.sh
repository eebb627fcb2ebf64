#!/usr/bin/env bash
# README main command: install the ComfyUI host and the pack (idempotent), then run the default example
# workflow headlessly through ComfyUI's real executor, or open ComfyUI's web UI.
#
#   bash scripts/run.sh --gui [--port N]      # ComfyUI's web UI with the pack on http://127.0.0.1:8188
#   bash scripts/run.sh --gui --demo          # ... on the tiny generated models (every example opens)
#   bash scripts/run.sh --demo                # tiny generated models, no downloads: see the graph execute
#   bash scripts/run.sh --download NAME|all   # fetch a model of the README's table into the host's models/
#   bash scripts/run.sh [runner options]      # real models; lists any missing file, its folder and source
#   bash scripts/run.sh --comfyui 0.3.75 ...  # the oldest supported host instead of ComfyUI 0.30 (default)
#
# Runner options (scripts/run_workflow.py --help): [WORKFLOW.json] --image --mask --context --subject --prompt
# --seed --steps --width --height --reference-resolution --output --base-dir --comfyui DIR --server URL --check
# --cpu --verbose
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/scripts/host_choice.sh" "$@"   # sets HOST, COMFYUI_VERSION and PASSTHROUGH (the other args)
# (pip's notes about this machine's missing local index folders are filtered out; a failed install still fails)
bash "$REPO/scripts/setup_host.sh" --comfyui "$COMFYUI_VERSION" "$HOST" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export MOMA_HOST_DIR="$HOST" MOMA_COMFYUI="$COMFYUI_VERSION"
exec "$HOST/venv/bin/python" "$REPO/scripts/run_workflow.py" "${PASSTHROUGH[@]}"
