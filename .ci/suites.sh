#!/usr/bin/env bash
# Runs scripts/test.sh for each ComfyUI version given (see .ci/run): side by side with one torch thread each,
# or in turn with MOMA_CI_SERIAL=1. Each log is printed whole when its run ends; fails if any run failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
logs=$(mktemp -d)

suite() {  # version log
  local start result
  start=$(date +%s)
  if python3 tools/rss_peak.py --label "ComfyUI $1 tests" -- bash scripts/test.sh --comfyui "$1" -q --durations=12 \
      --basetemp="$logs/tmp-$1" > "$2" 2>&1; then
    result=passed
  else
    result=FAILED
  fi
  echo "=== ComfyUI $1: $result in $(( $(date +%s) - start )) s ===" >> "$2"
  [ "$result" = passed ]
}

status=0
if [ "${MOMA_CI_SERIAL:-}" = 1 ]; then
  for version in "$@"; do
    suite "$version" "$logs/$version.log" || status=1
    cat "$logs/$version.log"
  done
  exit "$status"
fi
pids=()
for version in "$@"; do
  (export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; suite "$version" "$logs/$version.log") &
  pids+=("$!")
done
for index in "${!pids[@]}"; do
  wait "${pids[$index]}" || status=1
  version=${*:$((index + 1)):1}
  echo "=== ComfyUI $version ==="
  cat "$logs/$version.log"
done
exit "$status"
