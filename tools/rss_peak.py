"""Run a command and report the peak resident memory of its whole process tree (stdlib only, Linux /proc).

    python3 tools/rss_peak.py [--label NAME] [--interval S] [--log PATH] -- COMMAND [ARGS...]

Samples every process descended from COMMAND and prints, when it ends, the peak of their summed RSS (a page
shared by several processes, such as torch's libraries or a model file two processes read, counts once per
process), the peak of their summed PSS (each shared page split between its processes: what the tree really
holds) and the largest single process's RSS with its command line. ``--log PATH`` writes every sample (time,
summed RSS, summed PSS or "-" where it could not be a new peak, largest RSS in GiB, that process's command
line) to find when and where the peak came.
Exits with COMMAND's status (128 + N when a signal N ended it). COMMAND runs with MOMA_RSS_PEAK=<label> in its
environment, so a script that measures itself (scripts/test.sh) knows it is measured already. Ctrl-C reaches
COMMAND as usual (the terminal sends it to both); this process waits for it to end and still prints the peak.
Used by .ci/run to measure the test runs' memory, and by scripts/test.sh.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, RSS bytes, command name) of every process readable in /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry)] = (int(fields[1]), int(fields[21]) * PAGE, name)  # ppid, rss pages
    return found


def _pss(pid: int) -> int:
    """The process's proportional set size in bytes (0 if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _command_line(pid: int, name: str) -> str:
    """The process's command line, shortened (its name if unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return name
    text = " ".join(
        os.path.basename(word.decode(errors="replace")) if index == 0 else word.decode(errors="replace")
        for index, word in enumerate(words)
        if word
    )
    return (text or name)[:160]


def tree_rss(root: int, pss_above: int = -1) -> tuple[int, int | None, int, str]:
    """(summed RSS of root and its descendants, their summed PSS or None, the largest one's RSS, its command
    line). PSS (reading every process's page tables: costly) only when the summed RSS is above ``pss_above``:
    PSS never exceeds RSS, so below the PSS peak so far it cannot make a new one."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for pid, (parent, _rss, _name) in processes.items():
        children.setdefault(parent, []).append(pid)
    total, largest, largest_pid, largest_name = 0, 0, 0, ""
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        if pid in processes:
            _parent, rss, name = processes[pid]
            tree.append(pid)
            total += rss
            if rss > largest:
                largest, largest_pid, largest_name = rss, pid, name
        pending.extend(children.get(pid, []))
    proportional = sum(_pss(pid) for pid in tree) if total > pss_above else None
    return total, proportional, largest, _command_line(largest_pid, largest_name) if largest_pid else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="command")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--log", type=Path, help="write every sample to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    process = subprocess.Popen(command, env={**os.environ, "MOMA_RSS_PEAK": args.label})
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C: COMMAND gets it too and decides; we wait for it
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    peak = {"total": 0, "pss": 0, "largest": 0, "name": ""}
    done = threading.Event()

    log = open(args.log, "a") if args.log else None
    gib = 2**30

    def sample() -> None:
        while not done.is_set():
            total, proportional, largest, name = tree_rss(process.pid, pss_above=peak["pss"])
            if log:
                pss = "-" if proportional is None else f"{proportional / gib:.2f}"
                log.write(f"{time.time():.1f}\t{total / gib:.2f}\t{pss}\t{largest / gib:.2f}\t{name}\n")
                log.flush()
            peak["total"] = max(peak["total"], total)
            if proportional is not None:
                peak["pss"] = max(peak["pss"], proportional)
            if largest > peak["largest"]:
                peak["largest"], peak["name"] = largest, name
            done.wait(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    status = process.wait()
    done.set()
    sampler.join()
    if log:
        log.close()
    print(
        f"[rss_peak] {args.label}: peak RSS of the process tree {peak['total'] / gib:.2f} GiB (summed: shared pages "
        f"once per process), peak PSS of the tree {peak['pss'] / gib:.2f} GiB, largest process "
        f"{peak['largest'] / gib:.2f} GiB RSS ({peak['name']})",
        flush=True,
    )
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
