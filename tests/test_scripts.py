"""The README's test command, scripts/test.sh, as a user runs it (on this run's host): it prints the run's peak memory
(unless already measured, as under .ci/run), says at the end when Chromium is missing and how to install it, and
leaves nothing in the temporary folder, after a passing run, a failing one or Ctrl-C.

Each case starts scripts/test.sh narrowed to a few pure-Python tests (tests/test_import_graph.py), in a process
group of its own and with TMPDIR set to an empty folder: whatever the run leaves there is what a user's /tmp would
keep. Runs in scripts/test.sh's second pytest run (tests/conftest.py PROCESS_MODULES): it starts processes of its
own (the first run of each case boots ComfyUI in its pytest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import host
import pytest
from moma_demo import browser

REPO = Path(__file__).resolve().parents[1]
TEST_SH = REPO / "scripts" / "test.sh"
PEAK_LINE = "[rss_peak] scripts/test.sh: peak RSS of the process tree"
CHROMIUM_LINE = "[test] Chromium is not installed"


def start_test_sh(tmp: Path, *args: str, measured_outside: bool = False, **extra_env: str) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "MOMA_HOST_DIR": str(host.host_dir()),
        "PYTHONUNBUFFERED": "1",
        **extra_env,
    }
    env.pop("MOMA_TEST_SPLIT", None)
    env.pop("MOMA_KEEP_TEST_TMP", None)
    if measured_outside:
        env["MOMA_RSS_PEAK"] = "the caller"
    else:
        env.pop("MOMA_RSS_PEAK", None)
    return subprocess.Popen(
        ["bash", str(TEST_SH), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def leftovers(tmp: Path) -> list[str]:
    return sorted(str(path.relative_to(tmp)) for path in tmp.rglob("*"))


def test_a_passing_run_prints_its_peak_memory_the_chromium_advice_and_cleans_up(tmp_path):
    """A machine without Chromium (MOMA_CHROMIUM names no executable): the advice comes just before the end."""
    process = start_test_sh(
        tmp_path / "tmp",
        "tests/test_import_graph.py",
        "-q",
        "-p",
        "no:cacheprovider",
        MOMA_CHROMIUM=str(tmp_path / "no-chromium-here"),
    )
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    assert "3 passed" in output
    last_lines = output.rstrip().splitlines()[-3:]
    assert last_lines[-1].startswith(PEAK_LINE), output  # the last thing it prints
    assert output.count(PEAK_LINE) == 1
    assert any(line.startswith("[test] temporary files: ") and line.endswith(", removed") for line in last_lines)
    (advice,) = [line for line in last_lines if line.startswith(CHROMIUM_LINE)]
    assert "test_gui_web_app_round_trips_every_example_without_a_missing_file" in advice
    assert "apt-get install chromium" in advice and "MOMA_CHROMIUM" in advice
    assert leftovers(tmp_path / "tmp") == []


def test_a_failing_run_under_a_measuring_caller_cleans_up_and_does_not_measure_twice(tmp_path):
    process = start_test_sh(tmp_path / "tmp", "tests/no_such_test_file.py", measured_outside=True)
    output, _ = process.communicate(timeout=900)
    assert process.returncode not in (0, 5), output
    assert PEAK_LINE not in output  # .ci/run's rss_peak measures this run
    assert "[test] temporary files: " in output
    assert (CHROMIUM_LINE in output) == (browser.chromium() is None)  # this machine as it is
    assert leftovers(tmp_path / "tmp") == []


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and signals as on Linux")
def test_ctrl_c_stops_the_run_and_cleans_up(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while pytest boots ComfyUI: the run stops, the peak is still
    printed and the temporary folder (holding the booting host's base directory by then) is gone."""
    tmp = tmp_path / "tmp"
    process = start_test_sh(tmp, "tests/test_import_graph.py", "-q")
    deadline = time.monotonic() + 600
    while not list(tmp.glob("moma-test-*/moma-comfy-base-*")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the test host never started booting"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output
    assert output.count(PEAK_LINE) == 1 and "[test] temporary files: " in output
    assert leftovers(tmp) == []
