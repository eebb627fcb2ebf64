"""Run steps one after the other, each under its own time limit, and leave every result under an output folder
that the device tool can bring back (at most 8 files, no deeper than 2 folders, 16 MiB each).

A step is a command with a budget. Its limit is what the later steps' budgets leave of the run's total, and at
most ``stretch`` times its budget: time an early step does not use passes on, and a step that hangs or overruns
is cut off (its whole process group: SIGTERM, then SIGKILL) without touching the time reserved for the steps
after it. Every step runs whatever the earlier ones did; each is recorded with its status (passed, failed,
timed_out, skipped), exit code, seconds, limit, the tail of its log and what its ``summarize`` read from its
output files.

Under the output folder: ``summary.json`` (rewritten after every step, so a run killed from outside still
leaves the steps it finished), one ``<step>.log`` per step for the first steps that fit the file limit, and
``logs.tar.gz`` with every log and every file the steps named in ``keep`` (their raw JSON, JUnit XML).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import machine

SUMMARY_NAME = "summary.json"
TARBALL_NAME = "logs.tar.gz"
LOG_COPY_MAX_BYTES = 4 * 2**20  # a longer log comes back as its first 1 MiB and its last 3 MiB
TAIL_LINES = 15
KILL_GRACE_S = 5.0


@dataclass
class Step:
    """One command of the run. ``argv[0]`` is the program; it runs in the repository with ``env`` added."""

    name: str
    argv: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    keep: list[str] = field(default_factory=list)  # files (in the work folder) that go into the tarball
    summarize: Callable[[Path], dict] | None = None  # work folder -> what the summary records of its results
    about: str = ""  # one line: what the step checks or measures

    def __post_init__(self) -> None:
        if not machine.OUT_NAME.match(self.name):
            raise ValueError(f"step name {self.name!r}: letters, digits, '.', '_' and '-' only")


@dataclass
class Run:
    """Where and how a list of steps runs."""

    repo: Path
    out_dir: Path  # what comes back (the device tool's $OUT)
    work_dir: Path  # the steps' logs and output files
    total_s: float  # the whole run, every step included
    stretch: float = 1.5  # a step may use up to this times its budget when earlier steps left time
    min_limit_s: float = 5.0  # a step with less time than this left is skipped
    env: dict[str, str] = field(default_factory=dict)  # added to every step's environment
    header: dict[str, Any] = field(default_factory=dict)  # recorded at the top of the summary
    echo: Callable[[str], None] = print


def step_limit(budgets: Sequence[float], index: int, used_s: float, total_s: float, stretch: float) -> float:
    """The limit of step ``index`` when ``used_s`` of the run's ``total_s`` are gone: what is left once the budgets
    of the steps after it are set aside, at most ``stretch`` times its own budget."""
    left = total_s - used_s - sum(budgets[index + 1 :])
    return max(0.0, min(budgets[index] * stretch, left))


def run_steps(steps: Sequence[Step], run: Run) -> dict:
    """Run ``steps`` in order under ``run``'s limits; return (and write) the summary."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.work_dir.mkdir(parents=True, exist_ok=True)
    if sum(step.budget_s for step in steps) > run.total_s:
        raise ValueError(
            f"the steps' budgets ({sum(s.budget_s for s in steps):.0f} s) exceed the run's total ({run.total_s:.0f} s)"
        )
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names repeat: {names}")
    summary: dict[str, Any] = {
        "started": _now(),
        "total_budget_s": run.total_s,
        **run.header,
        "steps": [
            {"name": step.name, "about": step.about, "budget_s": step.budget_s, "status": "pending"} for step in steps
        ],
    }
    started = time.monotonic()
    budgets = [step.budget_s for step in steps]
    with _stop_signals():
        for index, step in enumerate(steps):
            limit = step_limit(budgets, index, time.monotonic() - started, run.total_s, run.stretch)
            if limit < run.min_limit_s:
                record = {"status": "skipped", "reason": f"only {limit:.0f} s left for it"}
                run.echo(f"=== {step.name}: skipped (only {limit:.0f} s left)")
            else:
                try:
                    record = _run_one(step, limit, run)
                except _Stopped as stop:  # the run itself is being killed (the call's timeout): leave what it has
                    summary["steps"][index].update(status="interrupted", limit_s=round(limit, 1))
                    summary.update(
                        seconds=round(time.monotonic() - started, 1),
                        status="interrupted",
                        finished=_now(),
                        targets_missed=[],
                    )
                    _write_out(summary, steps[: index + 1], run)
                    raise SystemExit(128 + stop.signal) from None
            record.update(name=step.name, about=step.about, budget_s=step.budget_s, limit_s=round(limit, 1))
            summary["steps"][index] = record
            summary["seconds"] = round(time.monotonic() - started, 1)
            _write_out(summary, steps[: index + 1], run)
    summary["finished"] = _now()
    summary["status"] = "passed" if all(s["status"] == "passed" for s in summary["steps"]) else "failed"
    summary["targets_missed"] = [
        f"{s['name']}: {t['name']}"
        for s in summary["steps"]
        for t in s.get("results", {}).get("targets", [])
        if t.get("met") is False
    ]
    _write_out(summary, steps, run)
    run.echo(format_table(summary))
    return summary


def _run_one(step: Step, limit: float, run: Run) -> dict:
    log_path = run.work_dir / f"{step.name}.log"
    env = {**os.environ, **run.env, **step.env}
    run.echo(f"=== {step.name} (limit {limit:.0f} s, {time.strftime('%H:%M:%S')}): {' '.join(step.argv)}")
    start = time.monotonic()
    timed_out = False
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(step.argv)}\n".encode())
        log.flush()
        try:
            process = subprocess.Popen(
                step.argv,
                cwd=run.repo,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as error:
            log.write(f"could not start: {error}\n".encode())
            return {
                "status": "failed",
                "exit_code": None,
                "seconds": 0.0,
                "error": str(error),
                "tail": [f"could not start: {error}"],
            }
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            code = _stop_group(process)
        except BaseException:
            _stop_group(process)
            raise
        _kill_leftovers(process)
    seconds = time.monotonic() - start
    record: dict[str, Any] = {
        "status": "timed_out" if timed_out else "passed" if code == 0 else "failed",
        "exit_code": code,
        "seconds": round(seconds, 1),
        "tail": _tail(log_path),
    }
    if timed_out:
        with open(log_path, "ab") as log:
            log.write(f"\n[device_run] cut off after {seconds:.0f} s (limit {limit:.0f} s)\n".encode())
    if step.summarize is not None:
        try:
            record["results"] = step.summarize(run.work_dir)
        except Exception as error:  # a crashed or cut-off step leaves no or half an output file
            record["results"] = {"unreadable": f"{type(error).__name__}: {error}"}
    for line in record["tail"][-TAIL_LINES:]:
        run.echo(f"    {line}")
    run.echo(f"=== {step.name}: {record['status']} (exit {code}) in {seconds:.0f} s")
    return record


def _stop_group(process: subprocess.Popen) -> int | None:
    """SIGTERM the step's process group, SIGKILL what is left after a grace period; the step's exit code."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return process.poll()


def _kill_leftovers(process: subprocess.Popen) -> None:
    """Processes the step started and left behind (its process group outlives it) would run into the next step."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Stopped(BaseException):
    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal = signal_number


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGTERM / SIGHUP to the runner stop the running step's process group too (the steps run in sessions of
    their own, which the device tool would leave running) and end the run with what it has written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number: int, frame: object) -> None:
        raise _Stopped(signal_number)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tail(path: Path, lines: int = 30) -> list[str]:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 16384))
        text = handle.read().decode("utf-8", "replace")
    kept = [line.rstrip()[:300] for line in text.splitlines() if line.strip()]
    return kept[-lines:]


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --- the output folder ---------------------------------------------------------------------------------------


def _write_out(summary: dict, steps: Sequence[Step], run: Run) -> None:
    """summary.json, the first step logs that fit the file limit, and the tarball of everything."""
    direct = machine.OUT_MAX_FILES - 2  # summary.json and logs.tar.gz
    for index, step in enumerate(steps):
        log_path = run.work_dir / f"{step.name}.log"
        if index < direct and log_path.is_file():
            _copy_capped(log_path, run.out_dir / f"{step.name}.log")
    members = [run.work_dir / f"{step.name}.log" for step in steps]
    members += [run.work_dir / name for step in steps for name in step.keep]
    _write_tarball([path for path in members if path.is_file()], run.out_dir / TARBALL_NAME)
    text = json.dumps(summary, indent=2, default=str)
    tmp = run.out_dir / f".{SUMMARY_NAME}.partial"
    tmp.write_text(text)
    os.replace(tmp, run.out_dir / SUMMARY_NAME)


def _copy_capped(source: Path, target: Path, cap: int = LOG_COPY_MAX_BYTES) -> None:
    size = source.stat().st_size
    with open(source, "rb") as src, open(target, "wb") as dst:
        if size <= cap:
            dst.write(src.read())
            return
        head = cap // 4
        dst.write(src.read(head))
        dst.write(f"\n[... {size - cap} bytes left out; the whole log is in {TARBALL_NAME} ...]\n".encode())
        src.seek(size - (cap - head))
        dst.write(src.read())


def _write_tarball(paths: list[Path], target: Path) -> None:
    """Every file, flat, gzip-compressed; capped to fit the tool's per-file limit (long logs are cut in the middle)."""
    budget = machine.OUT_MAX_FILE_BYTES - 2**20
    per_file = budget if not paths else max(2**20, budget // len(paths))
    tmp = target.with_name(f".{target.name}.partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in paths:
            data = path.read_bytes()
            if len(data) > per_file:  # compressed logs are ~10x smaller; this only bounds the pathological case
                data = data[: per_file // 4] + b"\n[... cut ...]\n" + data[-(per_file - per_file // 4) :]
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, target)


def check_out(out_dir: Path) -> list[str]:
    """What would not come back from ``out_dir`` through the device tool (empty: everything would)."""
    problems: list[str] = []
    files = [path for path in out_dir.rglob("*") if path.is_file() or path.is_symlink()]
    total = 0
    for path in files:
        relative = path.relative_to(out_dir)
        total += path.lstat().st_size
        if len(relative.parts) - 1 > machine.OUT_MAX_DEPTH:
            problems.append(f"{relative}: more than {machine.OUT_MAX_DEPTH} folders down")
        if not all(machine.OUT_NAME.match(part) for part in relative.parts):
            problems.append(f"{relative}: a name with characters other than letters, digits, '.', '_', '-'")
        if path.is_symlink():
            problems.append(f"{relative}: a link")
        elif path.stat().st_size > machine.OUT_MAX_FILE_BYTES:
            problems.append(
                f"{relative}: {path.stat().st_size / 2**20:.1f} MiB, over {machine.OUT_MAX_FILE_BYTES / 2**20:.0f} MiB"
            )
    if len(files) > machine.OUT_MAX_FILES:
        problems.append(f"{len(files)} files, over {machine.OUT_MAX_FILES}")
    if total > machine.OUT_MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all, over {machine.OUT_MAX_TOTAL_BYTES / 2**20:.0f} MiB")
    return problems


# --- the closing table ---------------------------------------------------------------------------------------


def format_table(summary: dict) -> str:
    """The steps and their headline results, for the end of the console output (the device tool returns its
    last 12,000 characters)."""
    lines = [
        "",
        f"device run {summary.get('status', 'running')} in {summary.get('seconds', 0):.0f} s "
        f"(total budget {summary['total_budget_s']:.0f} s)",
        "| step | status | s (limit) | results |",
        "|---|---|---|---|",
    ]
    for step in summary["steps"]:
        seconds = step.get("seconds")
        timing = (
            f"{seconds:.0f} ({step.get('limit_s', 0):.0f})"
            if seconds is not None
            else f"- ({step.get('limit_s', 0):.0f})"
        )
        lines.append(
            f"| {step['name']} | {step['status']} | {timing} | {step.get('results', {}).get('headline', '')} |"
        )
    targets = [
        (step["name"], target) for step in summary["steps"] for target in step.get("results", {}).get("targets", [])
    ]
    if targets:
        lines += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
        for name, target in targets:
            met = {True: "yes", False: "NO", None: "-"}[target.get("met")]
            lines.append(f"| {name}: {target['name']} | {target.get('value')} | {target.get('wanted')} | {met} |")
    return "\n".join(lines)


def main_guard() -> None:
    """Flush Python's buffers line by line (the device tool shows the console's end; a killed run keeps its lines)."""
    sys.stdout.reconfigure(line_buffering=True)
