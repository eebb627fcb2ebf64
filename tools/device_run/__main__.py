"""``python3 -m device_run`` (with tools/ on PYTHONPATH; scripts/gpu_check.sh is the front door):

run --plan bare|host|dry --out DIR [--python PY] [--budget STEP=SECONDS ...]   the steps (plan.py)
setup [--wheels DIR --target DIR] [--require-cuda] --json FILE                 install wheels, describe the machine
check-imports [--cuda] --json FILE                                             boot ComfyUI, load the pack
pack [--no-download]                                                           build .gpu-pack/ here
account                                                                        what one call sends, and whether it fits
dry-run [--fresh-fixtures] [--keep]                                            check the packing here (dryrun.py)
command                                                                        the device-tool call to make
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import pack, plan, runner

REPO = Path(__file__).resolve().parents[2]


def device_call() -> str:
    """The one device-tool call, as the lead types it."""
    return f"run(command={plan.DEVICE_COMMAND!r}, carry={list(pack.CARRY)!r}, timeout_s={plan.DEVICE_TIMEOUT_S})"


# --- run -----------------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    runner.main_guard()
    python = args.python or sys.executable
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="moma-device-run-")).resolve()
    if args.plan in ("bare", "dry"):  # the carried tree (dry: as the machine will see it)
        host_dir = REPO / pack.PACK_DIR
        if not (host_dir / "ComfyUI" / "comfy").is_dir():
            print(
                f"No carried ComfyUI at {host_dir}/ComfyUI: build it with `bash scripts/gpu_check.sh --pack` and "
                f"name {pack.PACK_DIR} in the call's carry list ({device_call()}).",
                file=sys.stderr,
            )
            return 2
        fixture_cache = scratch / "fixtures"
    if args.plan != "bare":
        from moma_runner.common import host_dir as installed_host

        if args.plan == "host":
            host_dir = Path(args.host_dir) if args.host_dir else installed_host()
        fixture_cache = Path(os.environ.get("MOMA_FIXTURE_CACHE", REPO / ".host" / "fixture-cache"))
    ctx = plan.Context(
        python=python,
        repo=REPO,
        work=scratch / "work",
        site=Path(args.site or scratch / "site").resolve(),
        fixture_cache=Path(args.fixture_cache or fixture_cache).resolve(),
        host_dir=host_dir,
    )
    steps = {"bare": plan.bare_plan, "host": plan.host_plan, "dry": plan.dry_plan}[args.plan](ctx)
    for override in args.budget or []:
        name, _, seconds = override.partition("=")
        matches = [step for step in steps if step.name == name]
        if not matches or not seconds:
            print(f"--budget {override}: use STEP=SECONDS with a step of {[s.name for s in steps]}", file=sys.stderr)
            return 2
        matches[0].budget_s = float(seconds)
    if args.only:
        steps = [step for step in steps if step.name in args.only]
    budgets = sum(step.budget_s for step in steps)
    total = args.total or (plan.BARE_TOTAL_S if args.plan == "bare" else budgets + 30)
    total = max(total, budgets)
    header = {
        "plan": args.plan,
        "repo_commit": _commit(),
        "host_dir": str(host_dir),
        "python": python,
        "device_call": device_call() if args.plan == "bare" else None,
    }
    print(
        f"device run, plan {args.plan}: {len(steps)} steps, budgets {budgets:.0f} s, total {total:.0f} s; "
        f"results in {args.out}",
        flush=True,
    )
    summary = runner.run_steps(
        steps, runner.Run(repo=REPO, out_dir=Path(args.out), work_dir=ctx.work, total_s=total, header=header)
    )
    return 0 if summary["status"] == "passed" and not summary["targets_missed"] else 1


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        manifest = REPO / pack.PACK_DIR / "manifest.json"
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("repo_commit", "?") + " (packed from)"
        return "?"


# --- setup ---------------------------------------------------------------------------------------------------


def cmd_setup(args: argparse.Namespace) -> int:
    report: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "ram_gb": _ram_gb(),
        "tmp_free_gb": round(shutil.disk_usage(tempfile.gettempdir()).free / 2**30, 1),
    }
    status = 0
    if args.wheels:
        wheels = sorted(str(path) for path in Path(args.wheels).glob("*.whl"))
        start = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                args.target,
                *wheels,
            ],
            capture_output=True,
            text=True,
        )
        noise = [line for line in (result.stdout + result.stderr).splitlines() if not pack.PIP_NOISE.search(line)]
        report["wheels"] = {
            "installed": [Path(w).name for w in wheels],
            "exit_code": result.returncode,
            "seconds": round(time.perf_counter() - start, 1),
            "messages": noise[-20:],
        }
        print(f"pip install --target {args.target}: {len(wheels)} wheels, exit {result.returncode}", flush=True)
        print("\n".join(noise[-20:]))
        status = status or result.returncode
        sys.path.insert(0, args.target)
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                "clocks.mem,temperature.gpu,utilization.gpu",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
        )
        report["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    from importlib import metadata

    report["packages"] = {}
    for name in (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "sentencepiece",
        "numpy",
        "pillow",
        "pytest",
        *[wheel.name for wheel in pack.WHEELS],
    ):
        try:
            report["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            report["packages"][name] = None
    import torch

    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        report["cuda_device"] = torch.cuda.get_device_name(0)
        report["cuda_capability"] = f"{properties.major}.{properties.minor}"
        report["cuda_memory_gb"] = round(properties.total_memory / 2**30, 1)
    print(json.dumps(report, indent=2), flush=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    if args.require_cuda and not report["cuda_available"]:
        print("no CUDA device: the GPU steps cannot run", file=sys.stderr)
        return 1
    return status


def _ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# --- check-imports -------------------------------------------------------------------------------------------


def cmd_check_imports(args: argparse.Namespace) -> int:
    from . import imports

    report = imports.check(cuda=args.cuda)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(imports.format_report(report), flush=True)
    return 0 if report["ok"] else 1


# --- pack / account / command --------------------------------------------------------------------------------


def cmd_pack(args: argparse.Namespace) -> int:
    from moma_runner.common import host_dir

    source = Path(args.host_dir) if args.host_dir else host_dir()
    pack.build(REPO, source / "ComfyUI", download=not args.no_download)
    return cmd_account(args)


def cmd_account(args: argparse.Namespace) -> int:
    report = pack.account(REPO)
    print(pack.format_account(report))
    return 0 if report["ok"] else 1


def cmd_command(args: argparse.Namespace) -> int:
    print(device_call())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m device_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a plan's steps")
    run.add_argument("--plan", choices=["bare", "host", "dry"], required=True)
    run.add_argument("--out", required=True, help="results (the device tool's $OUT)")
    run.add_argument("--python", help="the Python every step runs (default: this one)")
    run.add_argument("--scratch", help="work folder (default: a new temporary folder)")
    run.add_argument("--site", help="where the carried wheels are installed (default: <scratch>/site)")
    run.add_argument("--fixture-cache", help="fixture cache (bare: <scratch>/fixtures; else MOMA_FIXTURE_CACHE)")
    run.add_argument("--host-dir", help="host plan: the installed host (default: MOMA_HOST_DIR or .host/comfyui-0.30)")
    run.add_argument("--total", type=float, help=f"seconds for the whole run (bare: {plan.BARE_TOTAL_S})")
    run.add_argument("--budget", action="append", metavar="STEP=SECONDS", help="change one step's budget")
    run.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps")
    run.set_defaults(handler=cmd_run)
    setup = sub.add_parser("setup", help="install the carried wheels and describe the machine")
    setup.add_argument("--wheels")
    setup.add_argument("--target")
    setup.add_argument("--require-cuda", action="store_true")
    setup.add_argument("--json", required=True)
    setup.set_defaults(handler=cmd_setup)
    check = sub.add_parser("check-imports", help="boot ComfyUI from MOMA_HOST_DIR and load the pack")
    check.add_argument("--cuda", action="store_true", help="boot on the GPU (default: --cpu)")
    check.add_argument("--json", required=True)
    check.set_defaults(handler=cmd_check_imports)
    build = sub.add_parser("pack", help=f"build {pack.PACK_DIR}/ from the installed host")
    build.add_argument("--host-dir", help="the installed host (default: MOMA_HOST_DIR or .host/comfyui-0.30)")
    build.add_argument("--no-download", action="store_true", help="use only the wheels already in the pack")
    build.set_defaults(handler=cmd_pack)
    sub.add_parser("account", help="what one call sends, and whether it fits").set_defaults(handler=cmd_account)
    sub.add_parser("command", help="the device-tool call").set_defaults(handler=cmd_command)
    dry = sub.add_parser("dry-run", help="check the packing on this CPU machine")
    dry.add_argument("--fresh-fixtures", action="store_true", help="write the fixtures into a new cache (slower)")
    dry.add_argument("--keep", action="store_true", help="keep the dry run's work folder")
    dry.add_argument("--rebuild-twin", action="store_true", help="rebuild the machine-like Python environment")
    dry.set_defaults(handler=lambda a: __import__("device_run.dryrun", fromlist=["main"]).main(a))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
