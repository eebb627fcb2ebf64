#!/usr/bin/env bash
# README's test command: install the host (idempotent), then run the whole test suite in it.
#   bash scripts/test.sh [--comfyui 0.30|0.3.75] [pytest args...]
# The ComfyUI version: --comfyui, else $MOMA_COMFYUI, else the one installed in $MOMA_HOST_DIR, else 0.30.
# At the end it says if Chromium is missing (the web-frontend test is then skipped) and how to install it, removes
# every temporary file of the run (each process it starts gets TMPDIR = a folder of its own, deleted on success,
# failure or Ctrl-C; MOMA_KEEP_TEST_TMP=1 keeps it) and prints the run's peak memory: tools/rss_peak.py measures
# the whole process tree, unless this script already runs under it (MOMA_RSS_PEAK set: .ci/run measures each run).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${MOMA_RSS_PEAK:-}" ]; then
  exec "${PYTHON:-python3}" "$REPO/tools/rss_peak.py" --label "scripts/test.sh" -- bash "$REPO/scripts/test.sh" "$@"
fi
source "$REPO/scripts/host_choice.sh" "$@"   # sets HOST, COMFYUI_VERSION and PASSTHROUGH (the other args)
TEST_TMP=$(mktemp -d "${TMPDIR:-/tmp}/moma-test-XXXXXX")
ran_pytest=0
chromium_found() {  # as tools/moma_demo/browser.py chromium() looks for it
  if [ -n "${MOMA_CHROMIUM:-}" ]; then command -v "$MOMA_CHROMIUM" >/dev/null; else
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null; fi
}
finish() {
  local status=$?
  if [ "$ran_pytest" -eq 1 ] && ! chromium_found; then
    echo "[test] Chromium is not installed: the test of ComfyUI's web frontend (tests/test_runner.py::" \
         "test_gui_web_app_round_trips_every_example_without_a_missing_file) was skipped. To run it, install" \
         "Chromium: apt-get install chromium (Debian), snap install chromium (Ubuntu), dnf install chromium" \
         "(Fedora); or set MOMA_CHROMIUM to a Chromium or Chrome executable."
  fi
  if [ "${MOMA_KEEP_TEST_TMP:-}" = 1 ]; then
    echo "[test] temporary files kept in $TEST_TMP ($(du -sh "$TEST_TMP" 2>/dev/null | cut -f1))"
  else
    echo "[test] temporary files: $(du -sh "$TEST_TMP" 2>/dev/null | cut -f1) in $TEST_TMP, removed"
    rm -rf "$TEST_TMP"
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
export TMPDIR="$TEST_TMP"  # ComfyUI base directories, pytest's tmp_path, outputs, Chromium profiles: all in here
# (pip's notes about this machine's missing local index folders are filtered out; a failed install still fails)
bash "$REPO/scripts/setup_host.sh" --comfyui "$COMFYUI_VERSION" "$HOST" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
cd "$REPO"
echo "[test] ComfyUI $COMFYUI_VERSION at $HOST"
# Two pytest runs, the same arguments to both (tests/conftest.py, MOMA_TEST_SPLIT): first every test that runs in
# pytest's own ComfyUI, then the runner's tests, which start ComfyUI processes of their own, from a pytest process
# that boots none (a child loading the demo's 2 GB checkpoint would otherwise sit beside a booted test host).
# Without arguments that narrow the selection (paths, -k, -m, --lf, ...) each run must collect tests; with them,
# exit 5 (nothing collected) of one run is fine when the other ran tests. Exit 5 of both always fails.
narrowed=0
stop_early=0
for arg in "${PASSTHROUGH[@]}"; do
  case "$arg" in
    -x|--exitfirst|--maxfail*|--sw|--stepwise) stop_early=1 ;;
    -k*|-m*|--deselect*|--lf|--last-failed|--ff|--failed-first|--nf|--new-first) narrowed=1 ;;
    -*) ;;
    *) narrowed=1 ;;  # a path or node id (or an option's value: then only the check below is weaker)
  esac
done
run_part() {
  echo "[test] pytest, $1"
  ran_pytest=1
  MOMA_TEST_SPLIT="$2" MOMA_COMFYUI="$COMFYUI_VERSION" MOMA_HOST_DIR="$HOST" "$HOST/venv/bin/python" -m pytest \
    "${PASSTHROUGH[@]}"
}
set +e
run_part "tests in this process's ComfyUI" in-process
rc_in_process=$?
set -e
# 0 passed, 1 some failed, 5 none collected; anything else (2 interrupted, 3 internal error, 4 usage) stops here,
# as does a failure under -x / --maxfail
if { [ "$rc_in_process" -ne 0 ] && [ "$rc_in_process" -ne 1 ] && [ "$rc_in_process" -ne 5 ]; } \
    || { [ "$rc_in_process" -eq 1 ] && [ "$stop_early" -eq 1 ]; }; then
  exit "$rc_in_process"
fi
set +e
run_part "the runner's tests (their own ComfyUI processes)" processes
rc_processes=$?
set -e
if [ "$rc_in_process" -eq 5 ] && [ "$rc_processes" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose (exit 5 must not pass as success)" >&2
  exit 1
fi
if [ "$narrowed" -eq 0 ] && { [ "$rc_in_process" -eq 5 ] || [ "$rc_processes" -eq 5 ]; }; then
  echo "one of the two pytest runs collected no tests although nothing narrowed the selection: failing" >&2
  exit 1
fi
for rc in "$rc_in_process" "$rc_processes"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then
    exit "$rc"
  fi
done
exit 0
