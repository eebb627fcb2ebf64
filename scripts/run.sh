#!/usr/bin/env bash
# README main command: install the ComfyUI host and the pack (idempotent), then run the default example
# workflow headlessly through ComfyUI's real executor.
#
#   bash scripts/run.sh --demo                # tiny generated models, no downloads: see the graph execute
#   bash scripts/run.sh [runner options]      # real models; lists any missing file, its folder and source
#
# Runner options (scripts/run_workflow.py --help): [WORKFLOW.json] --image --mask --subject --prompt --seed
# --steps --width --height --output --base-dir --comfyui --server --cpu --verbose
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${MOMA_HOST_DIR:-$REPO/.host}
bash "$REPO/scripts/setup_host.sh" "$HOST"
export MOMA_HOST_DIR="$HOST"
exec "$HOST/venv/bin/python" "$REPO/scripts/run_workflow.py" "$@"
