#!/usr/bin/env bash
# README's test command: install the host (idempotent), then run the whole test suite in it.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${MOMA_HOST_DIR:-$REPO/.host}
bash "$REPO/scripts/setup_host.sh" "$HOST" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
[ -x "$HOST/venv/bin/python" ] || { echo "host install failed" >&2; exit 1; }
cd "$REPO"
set +e
MOMA_HOST_DIR="$HOST" "$HOST/venv/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (exit 5 must not pass as success)" >&2
  exit 1
fi
exit "$rc"
