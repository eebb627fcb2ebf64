"""``--dry-run``: check the device run on this CPU machine before a GPU is lent (docs/gpu.md).

1. the pack: ``.gpu-pack/`` is (re)built from the installed host (wheels already there are kept) and what one call sends
   (working tree + carried paths) fits the device tool's 64 MiB; the call itself fits its limits;
2. a machine-like Python: a venv on the installed host's interpreter holding only the packages the GPU machine has
   (machine.MACHINE_PACKAGES, linked from the host's venv; transformers and huggingface-hub at the machine's
   versions), nothing of ComfyUI's requirements beyond them;
3. the dry plan (plan.dry_plan) run by that Python through the same runner: the carried wheels installed with
   ``pip install --no-index --no-deps --target``, ComfyUI booted from the carried tree (``--cpu``) with the pack, the
   fixtures, the CUDA test files collected, one of them run, the two benchmarks at CPU sizes;
4. what comes back from ``$OUT`` fits the tool's limits (files, depth, names, sizes).

Differences from the machine, said in the report: the host's Python (3.11 here, 3.12 there) and its torch (CPU use
of a 2.14 build; 2.11+cu130 there); the other machine packages at the host's versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import machine, pack, plan, runner

REPO = Path(__file__).resolve().parents[2]
DRY_DIR = REPO / ".host" / "gpu-dryrun"
# Pure-Python machine packages installed at the machine's versions (KINDS.md), with the two it needs that the
# host's venv lacks (huggingface-hub 1.x uses httpx; the host's 2.x uses httpx2).
TWIN_PINS = ("transformers==5.17.0", "huggingface-hub==1.33.0", "httpx==0.29.0", "httpcore==1.0.9")


def host_python() -> Path:
    from moma_runner.common import host_dir

    python = host_dir() / "venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"No host venv at {python}: install the host first (bash scripts/setup_host.sh).")
    return python


def _venv_base(venv_python: Path) -> str:
    """The interpreter a venv was made from (its pyvenv.cfg)."""
    config = dict(
        line.split(" = ", 1)
        for line in (venv_python.parent.parent / "pyvenv.cfg").read_text().splitlines()
        if " = " in line
    )
    return config.get("executable") or str(Path(config["home"]) / "python3")


def build_twin(dest: Path, rebuild: bool = False, echo=print) -> Path:
    """A venv with only the machine's packages (linked from the host's venv) and TWIN_PINS; returns its python."""
    source_python = host_python()
    stamp_text = json.dumps([str(source_python), sorted(machine.MACHINE_PACKAGES), TWIN_PINS])
    python = dest / "bin" / "python"
    if python.exists() and not rebuild and (dest / ".stamp").is_file() and (dest / ".stamp").read_text() == stamp_text:
        return python
    base = _venv_base(source_python)
    echo(f"[dry-run] machine-like Python: a venv from {base} with the machine's packages only")
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run([base, "-m", "venv", str(dest)], check=True)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    host_site = Path(
        subprocess.run(
            [str(source_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    pinned = {machine.normalize(pin.split("==")[0]) for pin in TWIN_PINS}
    linked, left = [], []
    for dist in metadata.distributions(path=[str(host_site)]):
        name = dist.metadata["Name"]
        if not machine.on_machine(name) or machine.normalize(name) in pinned:
            left.append(name)
            continue
        for top in {Path(entry).parts[0] for entry in dist.files or []}:
            if top == ".." or top.endswith(".data") or top == "__pycache__":
                continue
            target = site / top
            if (host_site / top).exists() and not target.exists():
                target.symlink_to(host_site / top)
        linked.append(name)
    downloads = dest.parent / "twin-downloads"
    downloads.mkdir(exist_ok=True)
    missing = [
        pin
        for pin in TWIN_PINS
        if not list(
            downloads.glob(f"{machine.normalize(pin.split('==')[0]).replace('-', '_')}-{pin.split('==')[1]}-*.whl")
        )
    ]
    if missing:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(downloads),
                *missing,
            ],
            check=True,
        )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--find-links",
            str(downloads),
            *TWIN_PINS,
        ],
        check=True,
    )
    (dest / ".stamp").write_text(stamp_text)
    echo(
        f"[dry-run]   {len(linked)} machine packages linked from {host_site}; left out (not on the machine): "
        f"{', '.join(sorted(left))}"
    )
    return python


def call_checks() -> list[str]:
    """The call's own limits and the plan's arithmetic."""
    problems = []
    if len(plan.DEVICE_COMMAND) > machine.COMMAND_MAX_CHARS:
        problems.append(f"the command is {len(plan.DEVICE_COMMAND)} characters, over {machine.COMMAND_MAX_CHARS}")
    if len(pack.CARRY) > machine.CARRY_MAX_PATHS:
        problems.append(f"{len(pack.CARRY)} carried paths, over {machine.CARRY_MAX_PATHS}")
    if plan.DEVICE_TIMEOUT_S > machine.COMMAND_LIMIT_S:
        problems.append(f"timeout_s {plan.DEVICE_TIMEOUT_S} over {machine.COMMAND_LIMIT_S}")
    context = plan.Context(
        python="python3",
        repo=REPO,
        work=Path("/tmp/w"),
        site=Path("/tmp/s"),
        fixture_cache=Path("/tmp/f"),
        host_dir=REPO / pack.PACK_DIR,
    )
    budgets = sum(step.budget_s for step in plan.bare_plan(context))
    if budgets > plan.BARE_TOTAL_S:
        problems.append(f"the bare plan's budgets ({budgets:.0f} s) exceed its total ({plan.BARE_TOTAL_S} s)")
    if plan.BARE_TOTAL_S + 30 > plan.DEVICE_TIMEOUT_S:
        problems.append(
            f"the bare plan's total ({plan.BARE_TOTAL_S} s) leaves under 30 s of the call's {plan.DEVICE_TIMEOUT_S} s"
        )
    return problems


def main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    report: dict = {"started": runner._now()}
    from moma_runner.common import host_dir

    pack.build(REPO, host_dir() / "ComfyUI")  # a second or two: the ComfyUI copy again, the wheels already there
    manifest = json.loads((REPO / pack.PACK_DIR / "manifest.json").read_text())
    account = pack.account(REPO)
    print(pack.format_account(account), flush=True)
    report.update(
        account=account,
        manifest=manifest,
        call=plan.DEVICE_COMMAND,
        carry=list(pack.CARRY),
        call_problems=call_checks(),
    )
    for problem in report["call_problems"]:
        print(f"PROBLEM: {problem}")

    DRY_DIR.mkdir(parents=True, exist_ok=True)
    twin = build_twin(DRY_DIR / "twin", rebuild=args.rebuild_twin)
    scratch = DRY_DIR / "scratch"
    out = DRY_DIR / "out"
    for folder in (scratch, out):
        shutil.rmtree(folder, ignore_errors=True)
    fixture_cache = (
        scratch / "fixtures"
        if args.fresh_fixtures
        else Path(os.environ.get("MOMA_FIXTURE_CACHE", REPO / ".host" / "fixture-cache"))
    )
    command = [
        str(twin),
        "-m",
        "device_run",
        "run",
        "--plan",
        "dry",
        "--out",
        str(out),
        "--scratch",
        str(scratch),
        "--fixture-cache",
        str(fixture_cache),
    ]
    print(f"[dry-run] {' '.join(command)}", flush=True)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(command, cwd=REPO, env={**env, "PYTHONPATH": str(REPO / "tools")})
    summary = json.loads((out / runner.SUMMARY_NAME).read_text()) if (out / runner.SUMMARY_NAME).is_file() else {}
    out_problems = runner.check_out(out)
    report.update(
        dry_run_exit=result.returncode,
        out_problems=out_problems,
        out_files={path.name: path.stat().st_size for path in sorted(out.iterdir())} if out.is_dir() else {},
        steps={
            step["name"]: {key: step.get(key) for key in ("status", "seconds", "limit_s", "budget_s")}
            for step in summary.get("steps", [])
        },
        seconds=round(time.monotonic() - start, 1),
    )
    imports = next((step.get("results", {}) for step in summary.get("steps", []) if step["name"] == "imports"), {})
    report["imports"] = {
        key: imports.get(key)
        for key in ("pack_loaded", "origins", "import_failed", "unexpected_failures", "absent_node_ids", "ok")
    }
    report["ok"] = (
        account["ok"]
        and not report["call_problems"]
        and result.returncode == 0
        and not out_problems
        and summary.get("status") == "passed"
    )
    (DRY_DIR / "dry-run.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report), flush=True)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if report["ok"] else 1


def format_report(report: dict) -> str:
    mib = 2**20
    account = report["account"]
    lines = [
        "",
        "=== dry run of the device run",
        f"call: run(command={report['call']!r}, carry={report['carry']}, timeout_s={plan.DEVICE_TIMEOUT_S})",
        f"sizes: working tree {account['tree_bytes'] / mib:.2f} MiB + "
        + " + ".join(f"{name} {size / mib:.2f} MiB" for name, size in account["carried_bytes"].items())
        + f" = {account['total_bytes'] / mib:.2f} of {account['limit_bytes'] / mib:.0f} MiB "
        f"({account['headroom_bytes'] / mib:.2f} MiB to spare)",
    ]
    comfy = report["manifest"]["comfyui"]
    lines.append(
        f"  carried ComfyUI {comfy['version']}: {comfy['files']} files, {comfy['bytes'] / mib:.2f} MiB; "
        f"wheels: " + ", ".join(f"{w['requirement']} {w['bytes'] / mib:.2f}" for w in report["manifest"]["wheels"])
    )
    imports = report.get("imports") or {}
    origins = imports.get("origins") or {}
    if origins:
        lines.append(
            "imports after booting ComfyUI with the pack: "
            + ", ".join(f"{kind} {entry['modules']}" for kind, entry in origins.items())
        )
        for kind in ("carried", "machine"):
            if kind in origins:
                lines.append(f"  {kind}: {', '.join(origins[kind]['top'])}")
        lines.append(
            f"  ComfyUI extras not importable (expected: their packages are left out): "
            f"{', '.join(imports.get('import_failed') or []) or 'none'}"
        )
    lines.append(
        "steps (dry plan, CPU): "
        + ", ".join(
            f"{name} {step['status']} {step['seconds'] or 0:.0f}/{step['limit_s'] or 0:.0f} s"
            for name, step in report["steps"].items()
        )
    )
    lines.append(
        f"returned files: {len(report['out_files'])} ({', '.join(report['out_files'])}); "
        f"{'fit the limits' if not report['out_problems'] else report['out_problems']}"
    )
    for problem in account["problems"] + report["call_problems"]:
        lines.append(f"PROBLEM: {problem}")
    lines.append(f"dry run {'passed' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s")
    return "\n".join(lines)
