"""The steps of the GPU run, their budgets and what each result is held to (docs/gpu.md).

Three plans share the step runner (runner.py):
- ``bare``: on a lent GPU machine (the device tool), from the carried ``.gpu-pack/`` and the machine's ``python3``;
- ``host``: on a machine with CUDA where scripts/setup_host.sh installed the host (no deadline of a lease);
- ``dry``: on this CPU machine, in a Python environment holding only the machine's packages (dryrun.py): the same
  commands at CPU sizes, to prove the carried files and the runner before a GPU is lent.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .pack import PACK_DIR
from .runner import Step

# The one device-tool call (docs/gpu.md): run(command=DEVICE_COMMAND, carry=list(CARRY), timeout_s=DEVICE_TIMEOUT_S).
DEVICE_COMMAND = 'bash scripts/gpu_check.sh --bare "$OUT"'
DEVICE_TIMEOUT_S = 600
BARE_TOTAL_S = 560  # the steps' total on the machine: the call's 600 s less start-up and writing the results

# Targets (issue 23; README "Performance"). GB here is GiB, as the benchmarks' caps and MB (MiB) are.
SAMPLING_RATIO_TARGET_512 = 1.25  # MoMA (30% object bank) / plain per step at 512x512, ComfyUI's default precision
SAMPLING_MEMORY_TARGET_MB = 250.0  # peak CUDA memory while sampling, over plain's
STREAM_PEAK_TARGET_MB = 2.5 * 1024  # LLaVA 7B fp16 streamed under a 6 GB cap: peak CUDA memory
STREAM_ENCODE_RATIO_TARGET = 3.0  # ... and its encode time over the resident encoder's

# The CUDA exactness tests (fp32, TF32 off): the patched UNet against the explicit formulas (1e-4), Apply,
# Feature Grab, the context nodes with LLaVA on the GPU, streaming equal to resident.
CUDA_TEST_FILES = (
    "tests/nodes/test_moma_numerics.py",
    "tests/nodes/test_moma_apply.py",
    "tests/nodes/test_feature_grab_resolution.py",
    "tests/nodes/test_feature_grab_input.py",
    "tests/nodes/test_context_nodes.py",
    "tests/moma/test_llava_streaming.py",
)
# Whole graphs in ComfyUI's default precision (host plan only: the lease has no time for them).
DEFAULT_PRECISION_TESTS = ("tests/test_smoke_host.py", "tests/nodes/test_moma_apply.py")
DEFAULT_PRECISION_SELECTION = "smoke or executor or whole_graph or same_seed or fresh_subject_mask"
# Files whose graphs the run executes (glob patterns; their node ids must be registered by the carried ComfyUI).
GRAPH_SOURCES = (
    *CUDA_TEST_FILES,
    "tests/comfy_exec.py",
    "benchmarks/sampling*.py",
    "benchmarks/sampling*/**/*.py",
    "benchmarks/llava_encode.py",
)
TEST_ONLY_NODE = re.compile(r"^MomaTest")  # registered by the tests themselves (tests/peer_packs.py)


@dataclass
class Context:
    """Where a plan runs: the Python that runs every step, the checkout, the folders."""

    python: str
    repo: Path
    work: Path  # logs and output files of the steps
    site: Path  # where the carried wheels are installed (bare and dry plans)
    fixture_cache: Path
    host_dir: Path  # holds ComfyUI/ (the carried tree, or the installed host)


def common_env(ctx: Context, with_site: bool) -> dict[str, str]:
    """Every step's environment: the host and fixture folders, offline Hugging Face libraries, unbuffered output;
    PYTHONPATH holds the installed wheels only (tools/ is never put before ComfyUI's own modules)."""
    return {
        "MOMA_HOST_DIR": str(ctx.host_dir),
        "MOMA_COMFYUI": "0.30",
        "MOMA_FIXTURE_CACHE": str(ctx.fixture_cache),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # the machine's pytest plugins (xdist, timeout, ...) stay out
        "PYTHONPATH": str(ctx.site) if with_site else "",
        "MOMA_CARRIED_SITE": str(ctx.site) if with_site else "",
    }


def _tools_env(ctx: Context, with_site: bool) -> dict[str, str]:
    """For the run's own modules (device_run): tools/ after the wheels."""
    paths = [str(ctx.site)] if with_site else []
    return {"PYTHONPATH": ":".join([*paths, str(ctx.repo / "tools")])}


def setup_step(ctx: Context, install: bool, require_cuda: bool, budget_s: float) -> Step:
    argv = [ctx.python, "-m", "device_run", "setup", "--json", str(ctx.work / "environment.json")]
    if install:
        argv += ["--wheels", str(ctx.repo / PACK_DIR / "wheels"), "--target", str(ctx.site)]
    if require_cuda:
        argv.append("--require-cuda")
    return Step(
        "setup",
        argv,
        budget_s,
        env=_tools_env(ctx, False),
        keep=["environment.json"],
        summarize=summarize_environment,
        about="install the carried wheels; Python, torch, CUDA device, driver, RAM and disk",
    )


def imports_step(ctx: Context, with_site: bool, cuda: bool, budget_s: float) -> Step:
    argv = [ctx.python, "-m", "device_run", "check-imports", "--json", str(ctx.work / "imports.json")]
    if cuda:
        argv.append("--cuda")
    return Step(
        "imports",
        argv,
        budget_s,
        env=_tools_env(ctx, with_site),
        keep=["imports.json"],
        summarize=summarize_imports,
        about="boot ComfyUI from the carried tree and load the pack; what fails to import, and whether every "
        "node the run's graphs use is registered",
    )


def fixtures_step(ctx: Context, with_site: bool, budget_s: float) -> Step:
    return Step(
        "fixtures",
        [ctx.python, "-m", "device_run.fixtures", "--json", str(ctx.work / "fixtures.json")],
        budget_s,
        env=_tools_env(ctx, with_site),
        keep=["fixtures.json"],
        summarize=summarize_fixtures,
        about="write the tests' real-format fixtures (full-layout SD1.5, LLaVA, CLIP, adapter, pictures)",
    )


def pytest_step(
    ctx: Context,
    name: str,
    files: tuple[str, ...],
    budget_s: float,
    env: dict[str, str],
    about: str,
    extra: tuple[str, ...] = (),
) -> Step:
    argv = [
        ctx.python,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--durations=8",
        f"--junitxml={ctx.work / (name + '.xml')}",
        *extra,
        *files,
    ]
    summarize = summarize_collect(name) if "--collect-only" in extra else summarize_junit(name)
    return Step(name, argv, budget_s, env=env, keep=[name + ".xml"], summarize=summarize, about=about)


def sampling_step(
    ctx: Context,
    name: str,
    device: str,
    sizes: tuple[int, ...],
    steps: int,
    repeats: int,
    budget_s: float,
    extra: tuple[str, ...] = (),
) -> Step:
    out = ctx.work / f"{name}.json"
    argv = [
        ctx.python,
        "benchmarks/sampling.py",
        "--device",
        device,
        "--sizes",
        *map(str, sizes),
        "--steps",
        str(steps),
        "--repeats",
        str(repeats),
        "--skip-rerun",
        *extra,
        "--json",
        str(out),
    ]
    return Step(
        name,
        argv,
        budget_s,
        keep=[out.name],
        summarize=lambda work: summarize_sampling(out, device == "cuda"),
        about=f"sampling benchmark on {device} at {', '.join(f'{s}x{s}' for s in sizes)}: MoMA / plain per "
        f"step, reference pass, peak memory, ops and host syncs per UNet call",
    )


def llava_step(ctx: Context, name: str, argv_tail: list[str], budget_s: float, cuda: bool, about: str) -> Step:
    out = ctx.work / f"{name}.json"
    argv = [ctx.python, "benchmarks/llava_encode.py", *argv_tail, "--json", str(out)]
    return Step(
        name,
        argv,
        budget_s,
        keep=[out.name],
        about=about,
        summarize=lambda work: summarize_llava(out, work / f"{name}.log", cuda),
    )


def bare_plan(ctx: Context) -> list[Step]:
    """The lent GPU machine: carried wheels and ComfyUI tree, fixtures written there, ~9 minutes at most."""
    env = common_env(ctx, with_site=True)
    steps = [
        setup_step(ctx, install=True, require_cuda=True, budget_s=20),
        imports_step(ctx, with_site=True, cuda=True, budget_s=30),
        fixtures_step(ctx, with_site=True, budget_s=45),  # 16 s on this 2-core CPU (2.5 GB)
        pytest_step(
            ctx,
            "tests-cuda-fp32",
            CUDA_TEST_FILES,
            150,
            {"MOMA_TEST_DEVICE": "cuda", "MOMA_TEST_FP32": "1"},
            "the CUDA exactness tests in fp32 (patched UNet = explicit formulas at 1e-4, Apply, Feature Grab, "
            "context nodes, streaming = resident)",
        ),
        sampling_step(ctx, "sampling-cuda", "cuda", (512, 768), steps=8, repeats=3, budget_s=105),
        llava_step(
            ctx,
            "llava-7b",
            [
                "--device",
                "cuda",
                "--matrix",
                "--only",
                "fp16:gpu",
                "fp16:stream",
                "--full-width",
                "--layers",
                "32",
                "--repeats",
                "2",
                "--write-device",
                "cuda",
            ],
            190,
            cuda=True,
            about="LLaVA at the real 7B shape (32 layers, hidden 4096) in fp16: resident vs "
            "streamed, under 8 and 6 GB caps; load, encode, peak CUDA memory, tokens",
        ),
    ]
    for step in steps:
        step.env = {**env, **step.env}
    return steps


def host_plan(ctx: Context) -> list[Step]:
    """A machine with CUDA and the host scripts/setup_host.sh installs: the bare steps plus whole graphs in
    ComfyUI's default precision, and the LLaVA matrix in bf16 too."""
    env = common_env(ctx, with_site=False)
    steps = [
        setup_step(ctx, install=False, require_cuda=True, budget_s=60),
        imports_step(ctx, with_site=False, cuda=True, budget_s=60),
        fixtures_step(ctx, with_site=False, budget_s=300),
        pytest_step(
            ctx,
            "tests-cuda-fp32",
            CUDA_TEST_FILES,
            400,
            {"MOMA_TEST_DEVICE": "cuda", "MOMA_TEST_FP32": "1"},
            "the CUDA exactness tests in fp32",
        ),
        pytest_step(
            ctx,
            "tests-cuda-default",
            DEFAULT_PRECISION_TESTS,
            300,
            {"MOMA_TEST_DEVICE": "cuda"},
            "whole graphs and smoke tests in ComfyUI's default precision",
            extra=("-k", DEFAULT_PRECISION_SELECTION),
        ),
        sampling_step(ctx, "sampling-cuda", "cuda", (512, 768), steps=8, repeats=3, budget_s=300),
        llava_step(
            ctx,
            "llava-7b",
            [
                "--device",
                "cuda",
                "--matrix",
                "--full-width",
                "--layers",
                "32",
                "--repeats",
                "2",
                "--write-device",
                "cuda",
            ],
            900,
            cuda=True,
            about="LLaVA at the real 7B shape, fp16 and bf16, resident vs streamed vs cpu, 8 and 6 GB caps",
        ),
    ]
    for step in steps:
        step.env = {**env, **step.env}
    return steps


def dry_plan(ctx: Context) -> list[Step]:
    """This CPU machine, the machine's packages only (dryrun.py): the bare plan's commands at CPU sizes."""
    env = common_env(ctx, with_site=True)
    steps = [
        setup_step(ctx, install=True, require_cuda=False, budget_s=60),
        imports_step(ctx, with_site=True, cuda=False, budget_s=90),
        fixtures_step(ctx, with_site=True, budget_s=180),
        pytest_step(
            ctx,
            "tests-collect",
            CUDA_TEST_FILES,
            90,
            {},
            "the CUDA test files import and collect",
            extra=("--collect-only",),
        ),
        pytest_step(
            ctx,
            "tests-cpu",
            ("tests/moma/test_llava_streaming.py",),
            120,
            {},
            "one of the CUDA test files, on the CPU (streaming = resident)",
        ),
        sampling_step(
            ctx, "sampling-cpu", "cpu", (64,), steps=2, repeats=1, budget_s=240, extra=("--min-free-gb", "4")
        ),
        llava_step(
            ctx,
            "llava-cpu",
            ["--device", "cpu", "--matrix", "--only", "fp32:cpu", "fp32:stream", "--repeats", "1"],
            120,
            cuda=False,
            about="the LLaVA matrix on the fixtures, on the CPU (resident vs streamed, tokens equal)",
        ),
    ]
    for step in steps:
        step.env = {**env, **step.env}
    return steps


# --- reading the steps' results ------------------------------------------------------------------------------


def _target(name: str, value: float | None, wanted: str, met: bool | None) -> dict:
    return {"name": name, "value": value, "wanted": wanted, "met": met}


def summarize_environment(work: Path) -> dict:
    report = json.loads((work / "environment.json").read_text())
    gpu = report.get("cuda_device") or "no CUDA device"
    report["headline"] = (
        f"Python {report.get('python')}, torch {report.get('torch')}, {gpu}, "
        f"{report.get('cpu_count')} CPUs, {report.get('ram_gb')} GB RAM"
    )
    return report


def summarize_imports(work: Path) -> dict:
    report = json.loads((work / "imports.json").read_text())
    report["headline"] = (
        f"pack {'loaded' if report.get('pack_loaded') else 'NOT LOADED'}; "
        f"{len(report.get('import_failed', []))} ComfyUI extras fail to import "
        f"({len(report.get('unexpected_failures', {}))} unexpected); "
        f"{len(report.get('absent_node_ids', []))} of {len(report.get('run_node_ids', []))} "
        f"run node ids missing"
    )
    return report


def summarize_fixtures(work: Path) -> dict:
    report = json.loads((work / "fixtures.json").read_text())
    return {
        "fixtures": report,
        "headline": ", ".join(f"{name} {info['mb']:.0f} MB {info['seconds']:.0f} s" for name, info in report.items()),
    }


def summarize_junit(name: str) -> Callable[[Path], dict]:
    def read(work: Path) -> dict:
        root = ElementTree.parse(work / f"{name}.xml").getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        totals = {
            key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")
        }
        failed = []
        for case in root.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                message = (problem.get("message") or problem.text or "").strip().splitlines()
                failed.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:200] if message else ''}")
        passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
        seconds = sum(float(suite.get("time", 0)) for suite in suites)
        headline = (
            f"{passed} passed, {totals['failures']} failed, {totals['errors']} errors, "
            f"{totals['skipped']} skipped in {seconds:.0f} s"
        )
        return {**totals, "passed": passed, "seconds": round(seconds, 1), "failed_tests": failed, "headline": headline}

    return read


def summarize_collect(name: str) -> Callable[[Path], dict]:
    """pytest --collect-only: how many tests the files hold (their log's last line)."""

    def read(work: Path) -> dict:
        text = (work / f"{name}.log").read_text(errors="replace")
        counts = re.findall(r"(\d+) tests? collected", text)
        errors = re.findall(r"(\d+) errors?", text.splitlines()[-1] if text.strip() else "")
        collected = int(counts[-1]) if counts else 0
        return {
            "collected": collected,
            "errors": int(errors[0]) if errors else 0,
            "headline": f"{collected} tests collected" + (f", {errors[0]} errors" if errors else ""),
        }

    return read


def summarize_sampling(path: Path, on_cuda: bool) -> dict:
    """Per size and variant: s/step, MoMA / plain, peak memory over plain; reference pass; ops and host reads
    (syncs on CUDA) per UNet call; the GPU targets (on CUDA only)."""
    report = json.loads(path.read_text())
    sizes: dict[str, dict] = {}
    memory_key = "peak_cuda_mb" if on_cuda else "peak_rss_mb"
    for size, entry in report["sampling"].items():
        plain = entry["variants"]["plain"]
        sizes[str(size)] = {
            name: {
                "per_step_s": info["per_step_s"],
                "ratio": info["ratio"],
                "ratio_per_repeat": info.get("ratio_per_repeat"),
                memory_key: info.get(memory_key),
                "over_plain_mb": round(info[memory_key] - plain[memory_key], 1)
                if info.get(memory_key) is not None
                else None,
            }
            for name, info in entry["variants"].items()
        }
    counts = {
        name: {
            key: info.get(key)
            for key in (
                "ops_per_call",
                "added_ops_per_call",
                "host_reads_per_call",
                "added_host_reads_per_call",
                "added_host_reads_per_evaluation",
                "added_host_reads_per_run",
            )
            if key in info
        }
        for name, info in report.get("op_counts", {}).get("variants", {}).items()
    }
    reference = {
        label: {"total_s": info.get("total_s"), "plain_cfg_steps": info.get("plain_cfg_steps")}
        for label, info in report.get("reference_pass", {}).items()
    }
    ratio_512 = sizes.get("512", {}).get("moma 30%", {}).get("ratio")
    over = [
        row["over_plain_mb"]
        for rows in sizes.values()
        for name, row in rows.items()
        if name != "plain" and row["over_plain_mb"] is not None
    ]
    syncs = [row["added_host_reads_per_call"] for name, row in counts.items() if "added_host_reads_per_call" in row]
    targets = []
    if on_cuda:
        targets = [
            _target(
                "MoMA (30% object) / plain per step at 512x512",
                ratio_512,
                f"<= {SAMPLING_RATIO_TARGET_512}",
                None if ratio_512 is None else ratio_512 <= SAMPLING_RATIO_TARGET_512,
            ),
            _target(
                "peak CUDA memory over plain while sampling, MB",
                max(over) if over else None,
                f"<= {SAMPLING_MEMORY_TARGET_MB:.0f}",
                None if not over else max(over) <= SAMPLING_MEMORY_TARGET_MB,
            ),
            _target(
                "host syncs added per UNet call",
                max(syncs) if syncs else None,
                "0",
                None if not syncs else max(syncs) == 0,
            ),
        ]
    parts = []
    for size, rows in sizes.items():
        moma = ", ".join(
            f"{name.removeprefix('moma ')} {row['ratio']:.2f}x" for name, row in rows.items() if name != "plain"
        )
        parts.append(f"{size}: plain {rows['plain']['per_step_s'] * 1000:.0f} ms/step, {moma}")
    return {
        "sizes": sizes,
        "op_counts": counts,
        "reference_pass": reference,
        "machine": report.get("machine"),
        "settings": report.get("settings"),
        "targets": targets,
        "headline": "; ".join(parts),
    }


def summarize_llava(path: Path, log: Path, on_cuda: bool) -> dict:
    """The matrix rows; on CUDA the streaming targets: fp16 streamed under the 6 GB cap against the resident row."""
    rows = json.loads(path.read_text())
    written = re.findall(r"written in ([\d.]+) s", log.read_text(errors="replace")) if log.is_file() else []
    table = []
    for row in rows:
        table.append(
            {
                key: row.get(key)
                for key in (
                    "precision",
                    "placement",
                    "cap",
                    "oom",
                    "error",
                    "layers",
                    "params_m",
                    "load_s",
                    "encode_first_s",
                    "encode_warm_s",
                    "load_peak_cuda_mb",
                    "encode_peak_cuda_mb",
                    "load_peak_rss_mb",
                    "encode_peak_rss_mb",
                    "tokens_vs_resident",
                    "streamed_layers",
                    "max_layers_on_device",
                )
            }
        )

    def find(placement: str, cap: float | None, precision: str = "fp16") -> dict | None:
        return next(
            (
                row
                for row in table
                if row["precision"] == precision and row["placement"] == placement and row["cap"] == cap
            ),
            None,
        )

    targets = []
    if on_cuda:
        resident, capped = find("gpu", None), find("stream", 6.0)
        peak = None
        ratio = None
        if capped and not capped.get("oom") and not capped.get("error"):
            peak = max(capped.get("load_peak_cuda_mb") or 0, capped.get("encode_peak_cuda_mb") or 0)
            if resident and resident.get("encode_warm_s") and capped.get("encode_warm_s"):
                ratio = round(capped["encode_warm_s"] / resident["encode_warm_s"], 2)
        streamed = [row for row in table if row["placement"] == "stream" and not row.get("oom")]
        equal = all(row.get("tokens_vs_resident") == "equal" for row in streamed) if streamed else None
        targets = [
            _target(
                "fp16 streamed under a 6 GB cap: peak CUDA memory, MB",
                peak,
                f"<= {STREAM_PEAK_TARGET_MB:.0f}",
                None if peak is None else peak <= STREAM_PEAK_TARGET_MB,
            ),
            _target(
                "fp16 streamed under a 6 GB cap: warm encode / resident warm encode",
                ratio,
                f"<= {STREAM_ENCODE_RATIO_TARGET}",
                None if ratio is None else ratio <= STREAM_ENCODE_RATIO_TARGET,
            ),
            _target("streamed tokens equal the resident encoder's", equal, "equal", equal),
        ]
    parts = []
    for row in table:
        label = f"{row['precision']} {row['placement']}" + (f"@{row['cap']:g}GB" if row["cap"] else "")
        if row.get("oom") or row.get("error"):
            parts.append(f"{label} {'OOM' if row.get('oom') else 'error'}")
        else:
            peak_mb = max(row.get("load_peak_cuda_mb") or 0, row.get("encode_peak_cuda_mb") or 0)
            warm = row.get("encode_warm_s") or row.get("encode_first_s") or 0
            parts.append(
                f"{label} load {row['load_s']:.1f}s enc {warm:.2f}s" + (f" {peak_mb / 1024:.1f}GB" if peak_mb else "")
            )
    return {
        "rows": table,
        "write_s": float(written[0]) if written else None,
        "targets": targets,
        "headline": "; ".join(parts),
    }
