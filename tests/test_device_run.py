"""The GPU device run's own machinery (tools/device_run, docs/gpu.md), on the CPU and without network: the step
runner's limits and results, what comes back from $OUT, the size accounting of one device-tool call, the ComfyUI
subset, the plans' arguments against the benchmarks' parsers, and that the call the docs give is the one the code
makes. The GPU steps themselves need a lent GPU (scripts/gpu_check.sh --bare); --dry-run proves the packing here."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import host
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.append(str(REPO / "tools"))

from device_run import fixtures, machine, pack, plan, runner  # noqa: E402

PY = sys.executable


def python_step(name: str, code: str, budget_s: float, **kwargs) -> runner.Step:
    return runner.Step(name, [PY, "-c", code], budget_s, **kwargs)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_step_limit_passes_saved_time_on_but_never_takes_a_later_steps_budget() -> None:
    budgets = [10.0, 20.0, 30.0]
    assert runner.step_limit(budgets, 0, 0.0, 60.0, stretch=1.5) == 10.0  # total - later budgets = 10
    assert runner.step_limit(budgets, 0, 0.0, 80.0, stretch=1.5) == 15.0  # stretch caps it
    assert runner.step_limit(budgets, 1, 2.0, 60.0, stretch=1.5) == 28.0  # step 0 used 2 of its 10 s
    assert runner.step_limit(budgets, 1, 25.0, 60.0, stretch=1.5) == 5.0  # step 0 overran: step 1 pays, not step 2
    assert runner.step_limit(budgets, 2, 59.0, 60.0, stretch=1.5) == 1.0
    assert runner.step_limit(budgets, 2, 70.0, 60.0, stretch=1.5) == 0.0


def test_an_overrunning_step_is_cut_off_with_its_children_and_the_next_steps_still_run(tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    hang = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "print('started a child, sleeping', flush=True)\n"
        "time.sleep(60)\n"
    )
    write_json = (
        f"import json; json.dump({{'value': 3}}, open({str(tmp_path / 'work' / 'result.json')!r}, 'w')); "
        "print('wrote result.json')"
    )
    steps = [
        python_step("ok", "print('hello')", 5),
        python_step("hang", hang, 2),
        python_step("fails", "import sys; print('bad input'); sys.exit(3)", 5),
        python_step("tiny", "print('never runs')", 1),
        python_step(
            "measured",
            write_json,
            5,
            keep=["result.json"],
            summarize=lambda work: {
                "value": json.loads((work / "result.json").read_text())["value"],
                "targets": [{"name": "value", "value": 3, "wanted": "<= 2", "met": False}],
            },
        ),
    ]
    console: list[str] = []
    run = runner.Run(
        repo=REPO,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        total_s=20.0,
        stretch=1.0,
        min_limit_s=1.5,
        echo=console.append,
    )  # "tiny" (1 s) is skipped
    start = time.monotonic()
    summary = runner.run_steps(steps, run)
    assert time.monotonic() - start < 10
    status = {step["name"]: step["status"] for step in summary["steps"]}
    assert status == {"ok": "passed", "hang": "timed_out", "fails": "failed", "tiny": "skipped", "measured": "passed"}
    hung = summary["steps"][1]
    assert hung["limit_s"] == 2.0 and 2.0 <= hung["seconds"] < 2.0 + runner.KILL_GRACE_S
    assert "started a child, sleeping" in hung["tail"]
    deadline = time.monotonic() + 3
    while alive(int(child_pid.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(child_pid.read_text())), "the step's child outlived the cut-off"
    assert summary["steps"][2]["exit_code"] == 3 and "bad input" in summary["steps"][2]["tail"]
    assert summary["steps"][4]["results"]["value"] == 3
    assert summary["status"] == "failed" and summary["targets_missed"] == ["measured: value"]
    written = json.loads((tmp_path / "out" / runner.SUMMARY_NAME).read_text())
    assert [step["status"] for step in written["steps"]] == list(status.values())
    assert runner.check_out(tmp_path / "out") == []
    import tarfile

    with tarfile.open(tmp_path / "out" / runner.TARBALL_NAME) as tar:
        assert {"ok.log", "hang.log", "fails.log", "measured.log", "result.json"} <= set(tar.getnames())
    assert "cut off after" in (tmp_path / "out" / "hang.log").read_text()
    assert any(line.startswith("| hang | timed_out |") for line in console[-1].splitlines())


KILLED_RUN = r"""
import sys
from pathlib import Path
from device_run import runner
out, pid_file = Path(sys.argv[1]), sys.argv[2]
hang = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({pid_file!r}, 'w').write(str(child.pid)); time.sleep(60)")
steps = [runner.Step("first", [sys.executable, "-c", "print(1)"], 5), runner.Step("hang", [sys.executable, "-c", hang], 30),
         runner.Step("later", [sys.executable, "-c", "print(2)"], 5)]
runner.run_steps(steps, runner.Run(repo=Path.cwd(), out_dir=out, work_dir=out.parent / "work", total_s=60))
"""


def test_a_killed_run_stops_its_step_and_leaves_its_summary(tmp_path: Path) -> None:
    """The device tool kills the command at its timeout; the steps run in sessions of their own, so the runner
    must stop them itself, and what it has written must say so."""
    import signal

    pid_file = tmp_path / "child.pid"
    process = subprocess.Popen(
        [PY, "-c", KILLED_RUN, str(tmp_path / "out"), str(pid_file)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "tools")},
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "out" / runner.SUMMARY_NAME).read_text())
    assert summary["status"] == "interrupted"
    assert [step["status"] for step in summary["steps"]] == ["passed", "interrupted", "pending"]
    deadline = time.monotonic() + 3
    while alive(int(pid_file.read_text())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid_file.read_text())), "the running step's child outlived the killed run"


def test_a_summary_that_cannot_read_its_output_is_recorded(tmp_path: Path) -> None:
    def broken(work: Path) -> dict:
        return json.loads((work / "missing.json").read_text())

    summary = runner.run_steps(
        [python_step("crashed", "import sys; sys.exit(1)", 5, summarize=broken)],
        runner.Run(repo=REPO, out_dir=tmp_path / "out", work_dir=tmp_path / "work", total_s=10, echo=lambda line: None),
    )
    assert summary["steps"][0]["results"]["unreadable"].startswith("FileNotFoundError")


def test_the_run_refuses_budgets_over_its_total(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceed"):
        runner.run_steps(
            [python_step("a", "pass", 10), python_step("b", "pass", 10)],
            runner.Run(repo=REPO, out_dir=tmp_path, work_dir=tmp_path, total_s=15),
        )


def test_what_comes_back_from_out_is_checked(tmp_path: Path) -> None:
    for index in range(8):
        (tmp_path / f"f{index}.log").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.json").write_text("{}")
    (tmp_path / "bad name.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as big:
        big.truncate(17 * 2**20)
    problems = "\n".join(runner.check_out(tmp_path))
    assert "a/b/c/deep.json: more than 2 folders down" in problems
    assert "bad name.txt: a name with characters" in problems
    assert "big.bin: 17.0 MiB, over 16 MiB" in problems
    assert "11 files, over 8" in problems


def test_long_logs_come_back_as_head_and_tail(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    log.write_bytes(b"HEAD\n" + b"x" * (6 * 2**20) + b"\nTAIL\n")
    runner._copy_capped(log, tmp_path / "copy.log", cap=2**20)
    copy = (tmp_path / "copy.log").read_bytes()
    assert len(copy) < 2**20 + 200 and copy.startswith(b"HEAD") and copy.endswith(b"TAIL\n")
    assert b"bytes left out" in copy


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_account_counts_the_working_tree_and_the_carried_paths(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("/.gpu-pack/\n/ignored/\n")
    (repo / "tracked.txt").write_bytes(b"t" * 1000)
    _git(repo, "add", ".gitignore", "tracked.txt")
    (repo / "untracked.txt").write_bytes(b"u" * 500)
    (repo / "ignored").mkdir()
    with open(repo / "ignored" / "big.bin", "wb") as big:  # ignored and not carried: does not travel
        big.truncate(100 * 2**20)
    (repo / ".gpu-pack").mkdir()
    with open(repo / ".gpu-pack" / "wheel.whl", "wb") as wheel:
        wheel.truncate(10 * 2**20)
    report = pack.account(repo, [".gpu-pack"])
    assert report["ok"] and report["problems"] == []
    assert report["tree_files"] == 3 and report["tree_bytes"] == 1500 + len("/.gpu-pack/\n/ignored/\n")
    assert report["carried_bytes"] == {".gpu-pack": 10 * 2**20}
    assert report["largest"][0]["path"] == ".gpu-pack/wheel.whl"
    with open(repo / ".gpu-pack" / "wheel.whl", "wb") as wheel:
        wheel.truncate(64 * 2**20)
    over = pack.account(repo, [".gpu-pack", "missing", "untracked.txt"])
    assert not over["ok"]
    assert any("over 64 MiB" in problem for problem in over["problems"])
    assert any(problem.startswith("missing: not there") for problem in over["problems"])
    assert any(problem.startswith("untracked.txt: not ignored") for problem in over["problems"])
    assert not pack.account(repo, [".gpu-pack"] * 9)["ok"]


def test_the_comfyui_subset_rules() -> None:
    kept = [
        "comfy/text_encoders/spiece_tokenizer.py",
        "comfy/sd1_tokenizer/vocab.json",
        "comfy/sd1_clip_config.json",
        "comfy_api/latest/__init__.py",
        "comfy_extras/nodes_mask.py",
        "app/tests_helpers.py",
        "comfy/ldm/tests/x.py",
    ]
    dropped = [
        "comfy/text_encoders/t5_tokenizer/tokenizer.json",
        "comfy_api_nodes/nodes_openai.py",
        "tests/x.py",
        "tests-unit/a/b.py",
        "blueprints/Brightness.json",
        "openapi.yaml",
        "comfy/__pycache__/sd.cpython-312.pyc",
    ]
    assert [path for path in kept if pack.left_out(path)] == []
    assert [path for path in dropped if not pack.left_out(path)] == []
    assert pack.left_out("comfy/text_encoders/llama_tokenizer", is_dir=True)
    assert not pack.left_out("comfy/sd1_tokenizer", is_dir=True)


def test_wheel_tags_for_the_machine() -> None:
    fits = [
        "av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl",
        "torchsde-0.2.6-py3-none-any.whl",
        "blake3-1.0.11-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "comfy_aimdo-0.4.11-cp39-abi3-manylinux2010_x86_64.manylinux2014_x86_64.whl",
    ]
    misfits = [
        "blake3-1.0.11-cp311-cp311-manylinux_2_17_x86_64.whl",
        "av-18.1.0-cp313-abi3-manylinux_2_28_x86_64.whl",
        "x-1.0-cp312-cp312-manylinux_2_28_aarch64.whl",
        "x-1.0-cp312-cp312-win_amd64.whl",
    ]
    assert [name for name in fits if not pack.wheel_fits_machine(Path(name))] == []
    assert [name for name in misfits if pack.wheel_fits_machine(Path(name))] == []
    assert not [wheel for wheel in pack.WHEELS if machine.on_machine(wheel.name)], "carried but already there"


@pytest.mark.default_host_only  # the pack is built from the default host (0.30)
def test_one_call_with_the_real_tree_and_the_carried_files_fits(tmp_path: Path) -> None:
    comfy = host.host_dir() / "ComfyUI"
    copied = pack.copy_comfy_tree(comfy, tmp_path / "ComfyUI")
    assert (tmp_path / "ComfyUI/comfy/text_encoders/spiece_tokenizer.py").is_file()
    assert (tmp_path / "ComfyUI/comfy/sd1_tokenizer/vocab.json").is_file()
    assert not (tmp_path / "ComfyUI/comfy_api_nodes").exists()
    tree = sum(size for name, size in pack.travelling_files(REPO) if not name.startswith(pack.PACK_DIR + "/"))
    wheels = sum(wheel.mib for wheel in pack.WHEELS) * 2**20
    total = tree + copied["bytes"] + wheels + 64 * 1024  # + the manifest
    assert total <= machine.TREE_LIMIT_BYTES - 2**20, (
        f"one GPU call would send {total / 2**20:.1f} MiB (working tree {tree / 2**20:.1f}, ComfyUI "
        f"{copied['bytes'] / 2**20:.1f}, wheels {wheels / 2**20:.1f}) of {machine.TREE_LIMIT_BYTES / 2**20:.0f}: "
        f"leave 1 MiB to spare"
    )
    coverage = pack.requirement_coverage(comfy / "requirements.txt")
    assert [name for name, where in coverage.items() if where == "UNACCOUNTED"] == []


def test_the_fixture_table_is_the_tests_own() -> None:
    tree = ast.parse((REPO / "tests" / "conftest.py").read_text())
    table = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(getattr(target, "id", None) == "FIXTURE_FILES" for target in node.targets)
    )
    assert ast.literal_eval(table) == fixtures.FIXTURES


def _contexts(tmp_path: Path) -> plan.Context:
    return plan.Context(
        python=PY,
        repo=REPO,
        work=tmp_path / "work",
        site=tmp_path / "site",
        fixture_cache=tmp_path / "fixtures",
        host_dir=REPO / pack.PACK_DIR,
    )


PARSE_BENCHMARK_ARGS = r"""
import importlib.util, json, sys

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

sampling = load("benchmarks/sampling.py", "bench_sampling")
llava = load("benchmarks/llava_encode.py", "bench_llava")
for script, argv in json.loads(sys.argv[1]):
    if script == "benchmarks/sampling.py":
        sampling.parse_args(argv)
    else:
        llava.build_parser().parse_args(argv)
"""


def test_every_plan_is_within_its_limits_and_its_benchmark_arguments_parse(tmp_path: Path) -> None:
    context = _contexts(tmp_path)
    plans = {"bare": plan.bare_plan(context), "host": plan.host_plan(context), "dry": plan.dry_plan(context)}
    bare = plans["bare"]
    assert sum(step.budget_s for step in bare) <= plan.BARE_TOTAL_S <= plan.DEVICE_TIMEOUT_S - 30
    assert len({step.name for step in bare}) + 2 <= machine.OUT_MAX_FILES  # one log each, summary, tarball
    for steps in plans.values():
        for step in steps:
            for argument in step.argv:
                if argument.startswith(("tests/", "benchmarks/")):
                    assert (REPO / argument).is_file(), f"{step.name}: {argument} does not exist"
    cases = [
        (step.argv[1], step.argv[2:])
        for steps in plans.values()
        for step in steps
        if step.argv[1].startswith("benchmarks/")
    ]
    assert {script for script, _ in cases} == {"benchmarks/sampling.py", "benchmarks/llava_encode.py"}
    result = subprocess.run(
        [PY, "-c", PARSE_BENCHMARK_ARGS, json.dumps(cases)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from device_run import imports

    # the node ids the imports step requires: read from the graphs of the tests and the sampling benchmark
    assert {
        "KSampler",
        "LoadImage",
        "ImageBatch",
        "MomaApply",
        "MomaFeatureGrab",
        "MomaSaveContext",
        "SaveLatent",
    } <= set(imports.run_node_ids())


def test_the_documented_device_call_is_the_one_the_code_makes() -> None:
    from device_run.__main__ import device_call

    call = device_call()
    assert len(plan.DEVICE_COMMAND) <= machine.COMMAND_MAX_CHARS and len(pack.CARRY) <= machine.CARRY_MAX_PATHS
    assert plan.DEVICE_TIMEOUT_S <= machine.COMMAND_LIMIT_S
    for document in ("docs/gpu.md", "scripts/gpu_check.sh"):
        assert call in (REPO / document).read_text(), f"{document} does not give the call {call}"
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", pack.PACK_DIR]).returncode == 0
    assert ignored, f"{pack.PACK_DIR} must be git-ignored (it is carried, not committed)"


def test_the_summaries_hold_the_results_to_their_targets(tmp_path: Path) -> None:
    variant = {"per_step_s": 0.03, "ratio": 1.0, "ratio_per_repeat": [1.0], "peak_cuda_mb": 3000.0}
    report = {
        "sampling": {
            "512": {"variants": {"plain": variant, "moma 30%": {**variant, "ratio": 1.31, "peak_cuda_mb": 3040.0}}},
            "768": {"variants": {"plain": variant, "moma 30%": {**variant, "ratio": 1.1}}},
        },
        "op_counts": {
            "variants": {
                "plain": {"ops_per_call": 2027, "host_reads_per_call": 0},
                "moma 30%": {
                    "ops_per_call": 2302,
                    "added_ops_per_call": 275,
                    "host_reads_per_call": 0,
                    "added_host_reads_per_call": 0,
                },
            }
        },
        "reference_pass": {"30%": {"total_s": 0.08, "plain_cfg_steps": 2.7}},
    }
    (tmp_path / "sampling.json").write_text(json.dumps(report))
    sampling = plan.summarize_sampling(tmp_path / "sampling.json", on_cuda=True)
    assert [target["met"] for target in sampling["targets"]] == [False, True, True], sampling["targets"]
    assert sampling["sizes"]["512"]["moma 30%"]["over_plain_mb"] == 40.0
    assert "512: plain 30 ms/step, 30% 1.31x" in sampling["headline"]
    assert plan.summarize_sampling(tmp_path / "sampling.json", on_cuda=False)["targets"] == []

    def row(placement, cap, **values):
        return {
            "precision": "fp16",
            "placement": placement,
            "cap": cap,
            "load_s": 3.0,
            "encode_first_s": 1.4,
            "encode_warm_s": 0.1,
            "load_peak_cuda_mb": 13000.0,
            "encode_peak_cuda_mb": 13200.0,
            **values,
        }

    rows = [
        row("gpu", None),
        row("stream", None, tokens_vs_resident="equal"),
        row(
            "stream",
            6.0,
            encode_warm_s=0.25,
            load_peak_cuda_mb=900.0,
            encode_peak_cuda_mb=2100.0,
            tokens_vs_resident="equal",
        ),
        {"precision": "fp16", "placement": "gpu", "cap": 8.0, "oom": "CUDA out of memory"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    (tmp_path / "llava.log").write_text("writing ...\n  written in 21.5 s\n")
    llava = plan.summarize_llava(tmp_path / "llava.json", tmp_path / "llava.log", on_cuda=True)
    assert [(target["value"], target["met"]) for target in llava["targets"]] == [
        (2100.0, True),
        (2.5, True),
        (True, True),
    ]
    assert llava["write_s"] == 21.5 and "fp16 gpu@8GB OOM" in llava["headline"]
    rows[1]["tokens_vs_resident"] = "max diff 1.2e-03"
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    assert plan.summarize_llava(tmp_path / "llava.json", tmp_path / "llava.log", True)["targets"][2]["met"] is False

    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="tests.a" name="test_ok"/><testcase classname="tests.a" name="test_bad">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.a" name="test_skip"><skipped/></testcase></testsuite></testsuites>'
    )
    junit = plan.summarize_junit("t")(tmp_path)
    assert junit["passed"] == 1 and junit["failed_tests"] == ["tests.a::test_bad: assert 1 == 2"]
