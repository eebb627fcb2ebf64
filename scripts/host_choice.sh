# Sourced by run.sh and test.sh: which ComfyUI host to use, chosen once and passed through.
#   --comfyui VER (consumed), else $MOMA_COMFYUI, else the version installed in $MOMA_HOST_DIR, else 0.30.
#   `--comfyui` followed by anything but a version (0.30, 0.30.0, 0.3.75) is passed through: that is the
#   runner's own `--comfyui DIR` (a ComfyUI tree of the user's).
# Sets COMFYUI_VERSION, HOST (the host folder) and PASSTHROUGH (every other argument, in order).
COMFYUI_VERSION=${MOMA_COMFYUI:-}
PASSTHROUGH=()
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui|--comfyui=*)
      if [ "$1" = --comfyui ]; then value=${2:-}; step=2; else value=${1#--comfyui=}; step=1; fi
      case "$value" in
        0.30|0.30.0|0.3.75) COMFYUI_VERSION=$value; shift "$step" ;;
        *) PASSTHROUGH+=("$1"); shift ;;
      esac ;;
    *) PASSTHROUGH+=("$1"); shift ;;
  esac
done
if [ -z "$COMFYUI_VERSION" ] && [ -n "${MOMA_HOST_DIR:-}" ] && [ -f "$MOMA_HOST_DIR/comfyui-version" ]; then
  COMFYUI_VERSION=$(cat "$MOMA_HOST_DIR/comfyui-version")
fi
COMFYUI_VERSION=${COMFYUI_VERSION:-0.30}
[ "$COMFYUI_VERSION" = "0.30.0" ] && COMFYUI_VERSION=0.30
HOST=${MOMA_HOST_DIR:-$REPO/.host/comfyui-$COMFYUI_VERSION}
