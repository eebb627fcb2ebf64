"""The headless workflow runner (scripts/run_workflow.py -> tools/moma_runner): overrides, the missing-model message, and
real runs through ComfyUI's executor, in process (--demo) and against a ComfyUI server (--server).

Runs that start a ComfyUI are subprocesses with this interpreter (the host venv), as a user runs the script;
the demo runs load the full-layout SD1.5 fixture (~5 GiB RSS while loading), one process at a time. Nothing here
needs ComfyUI in the pytest process itself: scripts/test.sh runs this module in a pytest process that does not
start one (tests/conftest.py, MOMA_TEST_SPLIT), so that checkpoint load does not come beside a booted test host.
The in-process validation comparison is tests/test_runner_validation.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import host
import pytest
from moma_demo import browser
from moma_runner import boot, common, demo, gui, models
from moma_runner import workflow as graph
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "run_workflow.py"
API_DIR = REPO / "workflows" / "api"


TABLE = models.load_models_table()
assert common.API_DIR == API_DIR


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def printed_images(stdout: str) -> list[Path]:
    """The image paths the runner lists after 'images:'."""
    tail = stdout.split("images:\n", 1)
    assert len(tail) == 2, f"no image list in output:\n{stdout}"
    return [Path(line.strip()) for line in tail[1].splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# overrides (pure graph edits)


def test_overrides_touch_the_documented_nodes(tmp_path):
    prompt = graph.load_workflow(API_DIR / "moma_context.json")
    before = copy.deepcopy(prompt)
    image, mask = tmp_path / "ref.png", tmp_path / "ref_mask.png"
    ov = graph.Overrides(
        image=image,
        mask=mask,
        subject="teddy bear",
        prompt="A teddy bear on the moon.",
        seed=77,
        steps=9,
        width=320,
        height=256,
    )
    changes, staged = graph.apply_overrides(prompt, ov)

    masker = graph.ids_of(prompt, "MomaObjectMasker")[0]
    (mask_node,) = graph.ids_of(prompt, "LoadImageMask")
    assert mask_node not in before and prompt[mask_node]["inputs"]["channel"] == "red"
    assert prompt[masker]["inputs"]["mask"] == [mask_node, 0]
    assert {(s.node_id, s.input_name, s.source) for s in staged} == {
        (graph.ids_of(prompt, "LoadImage")[0], "image", image),
        (mask_node, "image", mask),
    }
    for nid in graph.ids_of(prompt, "MomaContextEncoder", "MomaFeatureGrab"):
        assert prompt[nid]["inputs"]["subject"] == "teddy bear"
    (encoder,) = graph.ids_of(prompt, "MomaContextEncoder")
    assert prompt[encoder]["inputs"]["prompt"] == "A teddy bear on the moon."
    # the positive CLIPTextEncode keeps its link to the encoder's sd_prompt
    positives = [
        n for n in prompt.values() if n["class_type"] == "CLIPTextEncode" and graph.is_link(n["inputs"]["text"])
    ]
    assert positives and all(p["inputs"]["text"][0] == encoder for p in positives)
    (sampler,) = graph.ids_of(prompt, "KSampler")
    (grab,) = graph.ids_of(prompt, "MomaFeatureGrab")
    assert prompt[sampler]["inputs"]["seed"] == 77 and prompt[grab]["inputs"]["seed"] == 77
    assert prompt[sampler]["inputs"]["steps"] == 9
    (latent,) = graph.ids_of(prompt, "EmptyLatentImage")
    assert (prompt[latent]["inputs"]["width"], prompt[latent]["inputs"]["height"]) == (320, 256)
    # nothing else changed
    untouched = {k for k in before if k not in (masker, encoder, grab, sampler, latent)}
    assert all(prompt[k] == before[k] for k in untouched)
    assert len(changes) >= 8


def test_prompt_override_on_plain_graph_hits_the_positive_text_only():
    prompt = graph.load_workflow(API_DIR / "plain_sd15.json")
    (sampler,) = graph.ids_of(prompt, "KSampler")
    positive, negative = prompt[sampler]["inputs"]["positive"][0], prompt[sampler]["inputs"]["negative"][0]
    negative_text = prompt[negative]["inputs"]["text"]
    graph.apply_overrides(prompt, graph.Overrides(prompt="a red bicycle"))
    assert prompt[positive]["inputs"]["text"] == "a red bicycle"
    assert prompt[negative]["inputs"]["text"] == negative_text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(subject="car"), "--subject: no node"),
        (dict(image=Path("x.png")), "--image: this workflow has no LoadImage"),
        (dict(mask=Path("m.png")), "--mask: this workflow has no LoadImageMask"),
        (dict(context=Path("c.safetensors")), "--context: this workflow has no MomaLoadContext"),
        (dict(width=100), "multiple of 8"),
        (dict(steps=0), "--steps must be"),
        (dict(reference_resolution=128), "--reference-resolution: no MomaFeatureGrab"),
    ],
)
def test_overrides_without_a_target_are_errors(overrides, message):
    prompt = graph.load_workflow(API_DIR / "plain_sd15.json")
    with pytest.raises(common.RunnerError, match=re.escape(message)):
        graph.apply_overrides(prompt, graph.Overrides(**overrides))


def test_reference_resolution_and_context_overrides():
    prompt = graph.load_workflow(API_DIR / "moma_saved_context.json")
    (loader,) = graph.ids_of(prompt, "MomaLoadContext")
    prompt[loader]["inputs"]["path"] = "/somewhere/else.safetensors"
    assert graph.context_file_inputs(prompt) == []  # a path overrides the file name
    with pytest.raises(common.RunnerError, match="multiple of 64"):
        graph.apply_overrides(copy.deepcopy(prompt), graph.Overrides(reference_resolution=100))
    context = Path("saved.safetensors")
    changes, staged = graph.apply_overrides(prompt, graph.Overrides(reference_resolution=256, context=context))
    (grab,) = graph.ids_of(prompt, "MomaFeatureGrab")
    assert prompt[grab]["inputs"]["resolution"] == 256
    assert prompt[loader]["inputs"]["path"] == ""
    assert [(s.node_id, s.input_name, s.source, s.annotate) for s in staged] == [
        (loader, "context_file", context, True)
    ]
    assert graph.context_file_inputs(prompt) == [(loader, prompt[loader]["inputs"]["context_file"])]


@pytest.mark.parametrize("workflow", sorted(p.name for p in API_DIR.glob("*.json")))
def test_the_gui_demo_shrinks_each_example_and_nothing_else(workflow):
    """--gui --demo's on-prompt handler (demo.shrink_for_demo): each example's latents become 64 pixels on the longer
    side and its sampler 2 steps; every other input stays; a second pass changes nothing; the file is untouched."""
    text = (API_DIR / workflow).read_text()
    prompt = json.loads(text)
    before = copy.deepcopy(prompt)
    changes = demo.shrink_for_demo(prompt)
    for nid, node in prompt.items():
        inputs, old = node["inputs"], before[nid]["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            assert (inputs["width"], inputs["height"]) == (demo.DEMO_SIZE, demo.DEMO_SIZE)
            assert f"image {old['width']}x{old['height']} -> {demo.DEMO_SIZE}x{demo.DEMO_SIZE}" in changes
            inputs, old = ({k: v for k, v in d.items() if k not in ("width", "height")} for d in (inputs, old))
        if node["class_type"] == "KSampler":
            assert inputs["steps"] == demo.DEMO_STEPS and f"steps {old['steps']} -> {demo.DEMO_STEPS}" in changes
            inputs, old = ({k: v for k, v in d.items() if k != "steps"} for d in (inputs, old))
        assert inputs == old, nid
    assert changes and demo.shrink_for_demo(prompt) == []
    assert (API_DIR / workflow).read_text() == text


def test_the_gui_demo_shrink_keeps_the_aspect_and_leaves_small_or_linked_values():
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 512, "batch_size": 1}},
        "2": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 30, "start_at_step": 10}},
        "3": {"class_type": "BasicScheduler", "inputs": {"steps": 20}},
        "4": {"class_type": "MomaFeatureGrab", "inputs": {"resolution": 512}},
        "5": {"class_type": "MomaFeatureGrab", "inputs": {"resolution": 0}},
        "6": {"class_type": "KSampler", "inputs": {"steps": ["9", 0]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 48, "height": 32, "batch_size": 1}},
    }
    changes = demo.shrink_for_demo(prompt)
    assert (prompt["1"]["inputs"]["width"], prompt["1"]["inputs"]["height"]) == (64, 40)
    assert prompt["2"]["inputs"]["steps"] == 30  # starts at step 10: shrinking would skip the whole run
    assert prompt["3"]["inputs"]["steps"] == demo.DEMO_STEPS
    assert prompt["4"]["inputs"]["resolution"] == demo.DEMO_REFERENCE_RESOLUTION
    assert prompt["5"]["inputs"]["resolution"] == 0  # auto follows the shrunk size
    assert prompt["6"]["inputs"]["steps"] == ["9", 0]
    assert (prompt["7"]["inputs"]["width"], prompt["7"]["inputs"]["height"]) == (48, 32)
    assert changes == [
        "image 768x512 -> 64x40",
        f"steps 20 -> {demo.DEMO_STEPS}",
        f"Feature Grab resolution 512 -> {demo.DEMO_REFERENCE_RESOLUTION}",
    ]


def test_only_the_demo_gui_loads_the_shrinking_hook(tmp_path):
    plain = gui.comfy_arguments(tmp_path, 8188, cpu=True)
    demo_args = gui.comfy_arguments(tmp_path, 8188, cpu=True, demo=True)
    assert "--extra-model-paths-config" not in plain
    paths_file = Path(demo_args[demo_args.index("--extra-model-paths-config") + 1])
    assert paths_file == gui.write_demo_paths(tmp_path) and paths_file.parent == tmp_path / "user"
    assert str(gui.DEMO_NODES_DIR) in paths_file.read_text()
    assert sorted(p.name for p in gui.DEMO_NODES_DIR.iterdir() if p.suffix == ".py") == ["moma_demo_sizes.py"]


def test_the_pack_is_linked_under_the_registry_name_and_an_old_link_is_replaced(tmp_path):
    """custom_nodes/comfyui-moma (what a Manager or registry install names the folder: the template browser lists
    the examples under it); a link of an earlier version (comfyui_moma) to this checkout goes, so the pack is not
    loaded twice; another folder of that name is left alone."""
    assert common.PACK_LINK_NAME == "comfyui-moma"
    old = tmp_path / "base" / "custom_nodes" / "comfyui_moma"
    old.parent.mkdir(parents=True)
    old.symlink_to(REPO, target_is_directory=True)
    link = boot.make_base_dir(tmp_path / "base")
    assert link == tmp_path / "base" / "custom_nodes" / "comfyui-moma" and link.resolve() == REPO
    assert not old.is_symlink() and not old.exists()
    other = tmp_path / "other"
    (other / "custom_nodes" / "comfyui_moma").mkdir(parents=True)  # e.g. a clone of the pack: not ours to remove
    boot.make_base_dir(other)
    assert (other / "custom_nodes" / "comfyui_moma").is_dir() and (other / "custom_nodes" / "comfyui-moma").is_symlink()


def test_ui_format_is_rejected_with_advice(tmp_path):
    ui = tmp_path / "workflow.json"
    ui.write_text(json.dumps({"last_node_id": 2, "nodes": [{"id": 1, "type": "KSampler"}], "links": []}))
    result = run_cli(str(ui), timeout=60)
    assert result.returncode == common.EXIT_USAGE
    assert "UI-format workflow" in result.stderr and "Export (API)" in result.stderr


# --------------------------------------------------------------------------------------------------
# missing models


def _expected_lines(entry: dict, models_dir: Path) -> list[str]:
    target = models_dir / entry["folder"] / entry["name"]
    return [
        entry["name"],
        f"models/{entry['folder']}/",
        str(target),
        entry["download"].replace("{dest}", str(target)),
        entry["source"],
    ]


def test_missing_models_are_listed_with_folder_and_source(tmp_path):
    base = tmp_path.resolve() / "base"
    # a half-downloaded LLaVA folder: present, but without its weight shards
    partial = base / "models" / "LLM" / "MoMA_llava_7b"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")

    result = run_cli(str(API_DIR / "moma_context.json"), "--base-dir", str(base), timeout=300)
    assert result.returncode == common.EXIT_MISSING, result.stdout + result.stderr
    out = result.stderr
    uses = models.model_uses(graph.load_workflow(API_DIR / "moma_context.json"), TABLE["loader_inputs"])
    used = {(use.folder, use.name) for use in uses}
    assert f"needs {len(used)} model file(s)" in out
    for entry in TABLE["models"]:
        listed = (entry["folder"], entry["name"]) in used
        assert (entry["name"] in out) == listed, entry["name"]
        if listed:
            for expected in _expected_lines(entry, base / "models"):
                assert expected in out, f"{expected!r} missing from:\n{out}"
    llava = next(e for e in TABLE["models"] if e["folder"] == "LLM")
    lacking = [f for f in llava["files"] if f != "config.json"]
    assert f"lacks: {', '.join(lacking)}" in out
    # the example's reference picture is the sample the runner places in the base's input/
    assert "Input image" not in out and (base / "input" / "moma_reference.jpg").is_file()
    assert f"sample picture: {base / 'input' / 'moma_reference.jpg'}" in result.stdout


def test_missing_models_of_the_plain_graph_only(tmp_path):
    base = tmp_path.resolve() / "base"
    result = run_cli(str(API_DIR / "plain_sd15.json"), "--base-dir", str(base), timeout=300)
    assert result.returncode == common.EXIT_MISSING, result.stdout + result.stderr
    needed = {
        n["inputs"].get("ckpt_name") or n["inputs"].get("vae_name")
        for n in graph.load_workflow(API_DIR / "plain_sd15.json").values()
    } - {None}
    assert f"needs {len(needed)} model file(s)" in result.stderr
    for entry in TABLE["models"]:
        listed = entry["name"] in result.stderr
        assert listed == (entry["name"] in needed), entry["name"]
        if listed:
            for expected in _expected_lines(entry, base / "models"):
                assert expected in result.stderr
    assert "images:" not in result.stdout


def test_every_model_of_the_table_is_used_by_an_example():
    used = set()
    for path in API_DIR.glob("*.json"):
        used |= {(use.folder, use.name) for use in models.model_uses(graph.load_workflow(path), TABLE["loader_inputs"])}
    assert used == {(entry["folder"], entry["name"]) for entry in TABLE["models"]}


def test_missing_saved_context_is_explained(tmp_path):
    base = tmp_path.resolve() / "base"
    result = run_cli(str(API_DIR / "moma_saved_context.json"), "--base-dir", str(base), timeout=300)
    assert result.returncode == common.EXIT_MISSING, result.stdout + result.stderr
    (node,) = graph.ids_of(graph.load_workflow(API_DIR / "moma_saved_context.json"), "MomaLoadContext")
    assert (
        f"Saved MoMA context 'moma/context_00001_.safetensors [output]' (node {node} MomaLoadContext) is not there"
    ) in result.stderr
    assert "workflows/api/moma_context.json first" in result.stderr and "--context PATH" in result.stderr
    assert "DreamShaper" not in result.stderr  # only the files this graph uses
    # MoMA Loader's llava_name / clip_vision_name are 'none' here: neither is asked for
    uses = models.model_uses(graph.load_workflow(API_DIR / "moma_saved_context.json"), TABLE["loader_inputs"])
    assert {use.folder for use in uses} == {"checkpoints", "vae", "moma", "rembg"}
    assert f"needs {len(uses)} model file(s)" in result.stderr
    for folder in ("LLM", "clip_vision"):
        entry = next(e for e in TABLE["models"] if e["folder"] == folder)
        assert entry["what"] not in result.stderr and f"models/{folder}/" not in result.stderr


def test_none_names_no_file():
    prompt = graph.load_workflow(API_DIR / "moma_saved_context.json")
    (loader,) = graph.ids_of(prompt, "MomaLoader")
    assert (prompt[loader]["inputs"]["llava_name"], prompt[loader]["inputs"]["clip_vision_name"]) == ("none", "none")
    folders = {use.folder for use in models.model_uses(prompt, TABLE["loader_inputs"])}
    assert "moma" in folders and not folders & {"LLM", "clip_vision"}
    prompt[loader]["inputs"].update(llava_name="MoMA_llava_7b", clip_vision_name="clip-vit-large-patch14-336")
    named = {(use.folder, use.name) for use in models.model_uses(prompt, TABLE["loader_inputs"])}
    assert {("LLM", "MoMA_llava_7b"), ("clip_vision", "clip-vit-large-patch14-336")} <= named


# --------------------------------------------------------------------------------------------------
# --check: ComfyUI's validation of every shipped API workflow on the demo models (nothing is executed)


@pytest.mark.parametrize(
    "workflow",
    host.cases_for_hosts(
        sorted(p.name for p in API_DIR.glob("*.json")), {"moma_context.json", "moma_saved_context.json"}
    ),
)
def test_every_api_workflow_passes_the_check_on_demo_models(workflow, tmp_path_factory):
    base = tmp_path_factory.getbasetemp().resolve() / "check-base"  # shared: links are made once
    result = run_cli(str(API_DIR / workflow), "--demo", "--check", "--base-dir", str(base), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed" in result.stdout and "images:" not in result.stdout


def test_mask_override_adds_a_valid_mask_node(test_images, tmp_path_factory):
    image, mask = test_images["wide"]
    base = tmp_path_factory.getbasetemp().resolve() / "check-base"
    result = run_cli(
        str(API_DIR / "moma_context.json"),
        "--demo",
        "--check",
        "--base-dir",
        str(base),
        "--image",
        str(image),
        "--mask",
        str(mask),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LoadImageMask added, wired to MomaObjectMasker" in result.stdout
    staged = base / "input" / mask.name
    assert staged.read_bytes() == mask.read_bytes()


# --------------------------------------------------------------------------------------------------
# real runs (full-layout SD1.5 fixture)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``run_workflow.py --demo`` on the default workflow, into a fresh demo base directory."""
    root = tmp_path_factory.mktemp("demo").resolve()
    result = run_cli("--demo", "--base-dir", str(root / "base"), "--output", str(root / "out"))
    return root, result


@pytest.mark.slow
def test_demo_runs_the_default_workflow(demo_run):
    root, result = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    images = printed_images(result.stdout)
    assert images
    for path in images:
        assert path.is_file() and path.parent == (root / "out").resolve()
        with Image.open(path) as img:
            assert img.size == (demo.DEMO_SIZE, demo.DEMO_SIZE)
    steps = f"step {demo.DEMO_STEPS}/{demo.DEMO_STEPS}"
    assert "KSampler" in result.stdout and steps in result.stdout
    assert common.DEFAULT_WORKFLOW == API_DIR / "moma_context.json"
    assert f"MomaFeatureGrab.resolution = {demo.DEMO_REFERENCE_RESOLUTION}" in result.stdout
    assert "demo: reference image rgb.png (generated test picture)" in result.stdout
    (saved,) = [
        line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("saved MoMA context: ")
    ]
    assert Path(saved).parent == (root / "out" / "moma").resolve() and Path(saved).is_file()
    # models are linked under the real file names of the workflow
    prompt = graph.load_workflow(common.DEFAULT_WORKFLOW)
    for use in models.model_uses(prompt, TABLE["loader_inputs"]):
        assert (root / "base" / "models" / use.folder / use.name).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_in_process_check_rejects_a_value_over_its_max(tmp_path_factory, tmp_path):
    """strength 2.5 (max 2.0) fails only the sampling branch: ComfyUI alone would run the rest and skip
    sampling; --check says so and fails."""
    broken = graph.load_workflow(API_DIR / "moma_context.json")
    (apply_id,) = graph.ids_of(broken, "MomaApply")
    broken[apply_id]["inputs"]["strength"] = 2.5
    path = tmp_path / "strength.json"
    path.write_text(json.dumps(broken))
    base = tmp_path_factory.getbasetemp().resolve() / "check-base"
    result = run_cli(str(path), "--demo", "--check", "--base-dir", str(base), timeout=600)
    assert result.returncode == common.EXIT_USAGE, result.stdout + result.stderr
    # Apply checks its FLOAT inputs itself (finite and in range: ComfyUI lets NaN through), once, on the node
    assert "strength: 2.5 is outside 0..2." in result.stderr and f"node {apply_id} MomaApply" in result.stderr
    assert "would skip output node(s)" in result.stderr and "check passed" not in result.stdout


# --------------------------------------------------------------------------------------------------
# --gui, and the runner against that server


@pytest.fixture(scope="module")
def gui_server(tmp_path_factory):
    """``run_workflow.py --gui --demo`` (what ``bash scripts/run.sh --gui --demo`` runs) on a free port."""
    root = tmp_path_factory.mktemp("gui").resolve()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "gui.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                str(RUNNER),
                "--gui",
                "--demo",
                "--cpu",
                "--port",
                str(port),
                "--base-dir",
                str(root / "base"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(url + "/system_stats", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the GUI server did not start:\n" + log_path.read_text()
                time.sleep(0.5)
        yield type("Gui", (), {"url": url, "port": port, "base": root / "base", "log": log_path})
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_gui_starts_comfyui_with_the_pack_and_a_clean_log(gui_server):
    log = gui_server.log.read_text()
    assert f"open http://127.0.0.1:{gui_server.port}" in log and "To see the GUI go to" in log
    assert "IMPORT FAILED" not in log and "Cannot import" not in log and "Traceback" not in log
    assert "Failed to initialize database" not in log and (gui_server.base / "user" / "comfyui.db").is_file()
    assert f"custom_nodes/{common.PACK_LINK_NAME}" in log  # ComfyUI's import-time line for the pack
    sample = REPO / "workflows" / "input" / "moma_reference.jpg"
    assert (gui_server.base / "input" / sample.name).read_bytes() == sample.read_bytes()
    with urllib.request.urlopen(f"{gui_server.url}/view?filename={sample.name}&type=input") as response:
        assert response.read() == sample.read_bytes()


def test_gui_log_leaves_out_database_migrations_and_kernel_backends(gui_server):
    """The --gui log (comfy_main.py's filters): no alembic migration dump, no comfy-kitchen backend list; ComfyUI's
    own lines around them (device, versions, the URL) stay."""
    log = gui_server.log.read_text()
    for internal in (
        "alembic",
        "Running upgrade",
        "Context impl SQLiteImpl",
        "non-transactional DDL",
        "Revision ID",
        "Database upgraded",
        "Found comfy_kitchen backend",
    ):
        assert internal not in log, internal
    assert "Device: cpu" in log and "ComfyUI version:" in log and "Starting server" in log


def test_gui_lists_the_examples_under_the_pack_folder_name(gui_server):
    """The real server's template routes: the examples under comfyui-moma (Workflow > Browse Templates), served."""
    with urllib.request.urlopen(f"{gui_server.url}/workflow_templates") as response:
        listing = json.load(response)
    ui_files = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert sorted(listing[common.PACK_LINK_NAME]) == ui_files and "comfyui_moma" not in listing
    for stem in ui_files:
        url = f"{gui_server.url}/api/workflow_templates/{common.PACK_LINK_NAME}/{stem}.json"
        with urllib.request.urlopen(url) as response:
            assert json.load(response) == json.loads((REPO / "workflows" / f"{stem}.json").read_text())


@pytest.mark.slow
def test_gui_demo_runs_a_queued_example_at_the_demo_size(gui_server):
    """What the web app's Queue button sends for moma_context (its API twin, 512x512 and 50 steps) runs on the
    --gui --demo server at 64x64 with 2 steps; the server logs one line saying so."""
    prompt = json.loads((API_DIR / "moma_context.json").read_text())
    request = urllib.request.Request(
        f"{gui_server.url}/prompt",
        data=json.dumps({"prompt": prompt}).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(request) as response:
        prompt_id = json.load(response)["prompt_id"]
    while True:
        with urllib.request.urlopen(f"{gui_server.url}/history/{prompt_id}") as response:
            history = json.load(response).get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            break
        assert time.monotonic() - started < 600, "the demo run did not finish in 10 minutes"
        time.sleep(1)
    assert history["status"]["status_str"] == "success", history["status"]
    ran = history["prompt"][2]
    (latent,) = [node for node in ran.values() if node["class_type"] == "EmptyLatentImage"]
    (sampler,) = [node for node in ran.values() if node["class_type"] == "KSampler"]
    assert (latent["inputs"]["width"], latent["inputs"]["height"], sampler["inputs"]["steps"]) == (64, 64, 2)
    images = [
        image
        for output in history["outputs"].values()
        for image in output.get("images", [])
        if image["type"] == "output"
    ]
    assert images
    for image in images:
        with Image.open(gui_server.base / "output" / image["subfolder"] / image["filename"]) as picture:
            assert picture.size == (demo.DEMO_SIZE, demo.DEMO_SIZE)
    log = gui_server.log.read_text()
    assert log.count("[comfyui-moma] demo: run shrunk for a CPU") >= 1
    assert "image 512x512 -> 64x64, steps 50 -> 2" in log
    print(f"moma_context on the --gui --demo server: {time.monotonic() - started:.1f} s from the post to the image")


@pytest.mark.skipif(
    browser.chromium() is None,
    reason="Chromium is not installed: apt-get install chromium (Debian), snap install chromium (Ubuntu), "
    "dnf install chromium (Fedora), or set MOMA_CHROMIUM to a Chromium or Chrome executable",
)
def test_gui_web_app_round_trips_every_example_without_a_missing_file(gui_server, tmp_path):
    """ComfyUI's frontend (the version the host serves), served by --gui --demo, loads every UI file, exports
    exactly its API twin ("Export (API)" = graphToPrompt) and saves it back unchanged: the files are what the
    frontend writes. What it exports passes ComfyUI's validation against that server (every model and the
    reference picture are there). MOMA_DUMP_FRONTEND_SAVES=DIR writes what it saved and exported (to regenerate
    the files after a frontend update)."""
    import asyncio

    from moma_demo import browser
    from moma_runner.validation import validate_with_object_info

    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))}
    debug_port = _free_port()
    with browser.headless_chromium(gui_server.url + "/", debug_port, tmp_path / "profile"):
        results = asyncio.run(browser.frontend_round_trip(gui_server.url + "/", debug_port, workflows))
    dump = os.environ.get("MOMA_DUMP_FRONTEND_SAVES")
    if dump:
        for stem, result in results.items():
            Path(dump, f"{stem}.json").write_text(json.dumps(result["saved"], indent=2) + "\n")
            Path(dump, "api").mkdir(exist_ok=True)
            Path(dump, "api", f"{stem}.json").write_text(json.dumps(result["api"], indent=2) + "\n")
    with urllib.request.urlopen(gui_server.url + "/object_info") as response:
        info = json.load(response)
    assert results.keys() == workflows.keys()
    for stem, result in results.items():
        assert result["api"] == json.loads((API_DIR / f"{stem}.json").read_text()), (
            f"{stem}: the web app exports another graph"
        )
        assert result["saved"] == workflows[stem], f"{stem}: the web app saves it differently"
        if stem == "moma_saved_context":
            continue  # its context file is what moma_context writes first: not there before that run
        ok, error, _outputs, node_errors = validate_with_object_info(result["api"], info)
        assert ok and not node_errors, (stem, error, node_errors)


# frontends that replace the packs' translations when they load their own Chinese bundle (the help pages still work)
FRONTENDS_DROPPING_PACK_TRANSLATIONS = {"1.32.9"}  # ComfyUI 0.3.75's


def _post_setting(url: str, name: str, value: object) -> None:
    request = urllib.request.Request(
        f"{url}/settings/{name}",
        data=json.dumps(value).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()


@pytest.mark.skipif(
    browser.chromium() is None,
    reason="Chromium is not installed: apt-get install chromium (Debian), snap install chromium (Ubuntu), "
    "dnf install chromium (Fedora), or set MOMA_CHROMIUM to a Chromium or Chrome executable",
)
def test_gui_web_app_in_chinese_shows_the_translations_and_help_pages(gui_server, tmp_path):
    """With the frontend's language set to Chinese (the setting Comfy.Locale, as its settings dialog sets it), the web
    app titles the MoMA nodes and labels their inputs from locales/zh, and Apply MoMA Attention's help (the right side
    panel's Info tab; the node library on older frontends) shows web/docs/MomaApply/zh.md; every node's pages are
    served where the frontend asks for them. MOMA_FRONTEND_SCREENSHOTS=DIR keeps the screenshots (docs/*.png)."""
    import asyncio

    zh = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    en = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    workflow = json.loads((REPO / "workflows" / "moma_context.json").read_text())
    shots = {"titles": tmp_path / "frontend_zh_node.png", "help": tmp_path / "frontend_help_panel.png"}
    for name, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False), ("Comfy.Locale", "zh")):
        _post_setting(gui_server.url, name, value)
    debug_port = _free_port()
    try:
        with browser.headless_chromium(gui_server.url + "/", debug_port, tmp_path / "profile"):
            shown = asyncio.run(
                browser.node_titles_and_help(
                    gui_server.url + "/",
                    debug_port,
                    workflow,
                    "MomaApply",
                    shots,
                    focus=["MomaObjectMasker", "MomaContextEncoder", "MomaFeatureGrab"],
                )
            )
    finally:
        _post_setting(gui_server.url, "Comfy.Locale", "en")

    assert shown["help"].startswith(zh["MomaApply"]["display_name"]), shown["help"][:300]
    assert zh["MomaApply"]["inputs"]["strength"]["tooltip"] in shown["help"]
    titled = {node: title for node, title in shown["titles"].items() if node in zh}
    assert len(titled) >= 6, shown["titles"]
    language = en if shown["frontend"] in FRONTENDS_DROPPING_PACK_TRANSLATIONS else zh
    assert titled == {node: language[node]["display_name"] for node in titled}, shown["frontend"]
    assert shown["inputs"]["MomaApply"]["strength"] == language["MomaApply"]["inputs"]["strength"]["name"]

    folder = shown["python_module"].split(".", 1)[1]  # custom_nodes.<the pack's folder>: the help URLs' prefix
    docs_url = f"{gui_server.url}/extensions/{urllib.parse.quote(folder)}/docs"
    for node in en:
        for lang, page in (("zh", f"{node}/zh.md"), ("en", f"{node}.md")):
            with urllib.request.urlopen(f"{docs_url}/{page}") as response:
                assert response.read() == (REPO / "web" / "docs" / page).read_bytes(), (lang, page)
        with pytest.raises(urllib.error.HTTPError, match="404"):  # English: the frontend falls back to <node>.md
            urllib.request.urlopen(f"{docs_url}/{node}/en.md")

    keep = os.environ.get("MOMA_FRONTEND_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for path in shots.values():
            with Image.open(path) as picture:
                picture = picture.convert("RGB")
                picture = picture.resize((1280, round(picture.height * 1280 / picture.width)), Image.LANCZOS)
            picture.quantize(colors=256).save(Path(keep) / path.name, optimize=True)


@pytest.mark.parametrize(
    "workflow",
    host.cases_for_hosts(
        sorted(p.name for p in API_DIR.glob("*.json")), {"moma_context.json", "moma_saved_context.json"}
    ),
)
def test_server_check_passes_every_example_with_demo(workflow, gui_server):
    """--check --server --demo: the server's model lists have every file (u2net.onnx included), the demo
    picture and context are uploaded, and ComfyUI's validation on /object_info accepts the graph."""
    result = run_cli(str(API_DIR / workflow), "--server", gui_server.url, "--demo", "--check", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed" in result.stdout and "u2net.onnx" not in result.stdout + result.stderr


def test_server_check_rejects_what_comfyui_rejects(gui_server, tmp_path):
    broken = graph.load_workflow(API_DIR / "moma_context.json")
    (apply_id,) = graph.ids_of(broken, "MomaApply")
    broken[apply_id]["inputs"]["strength"] = 2.5
    path = tmp_path / "strength.json"
    path.write_text(json.dumps(broken))
    result = run_cli(str(path), "--server", gui_server.url, "--check", timeout=300)
    assert result.returncode == common.EXIT_USAGE, result.stdout + result.stderr
    assert "Value 2.5 bigger than max of 2.0" in result.stderr and f"node {apply_id} MomaApply" in result.stderr


def test_server_reports_missing_models_from_its_own_lists(gui_server, tmp_path):
    broken = graph.load_workflow(API_DIR / "moma_context.json")
    (loader,) = graph.ids_of(broken, "CheckpointLoaderSimple")
    broken[loader]["inputs"]["ckpt_name"] = "not_downloaded_yet.safetensors"
    (moma_loader,) = graph.ids_of(broken, "MomaLoader")
    broken[moma_loader]["inputs"]["llava_name"] = "MoMA_llava_7b"
    llava = gui_server.base / "models" / "LLM" / "MoMA_llava_7b"
    demo_llava = os.readlink(llava)
    half = tmp_path / "half_llava"
    half.mkdir()
    (half / "config.json").write_text("{}")
    llava.unlink()
    llava.symlink_to(half, target_is_directory=True)  # a half-downloaded folder on the server
    try:
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        result = run_cli(str(path), "--server", gui_server.url, "--check", timeout=300)
    finally:
        llava.unlink()
        llava.symlink_to(demo_llava, target_is_directory=True)
    assert result.returncode == common.EXIT_MISSING, result.stdout + result.stderr
    err = result.stderr
    assert str(gui_server.base / "models" / "checkpoints" / "not_downloaded_yet.safetensors") in err
    assert "not in the pack's model table" in err and "u2net.onnx" not in err
    entry = next(e for e in TABLE["models"] if e["folder"] == "LLM")
    assert f"lacks: {', '.join(f for f in entry['files'] if f != 'config.json')}" in err
    assert "needs 2 model file(s)" in err


@pytest.mark.slow
def test_server_mode_runs_the_demo(gui_server, tmp_path):
    """--server --demo: the default graph on the --gui server, at the demo size, images downloaded."""
    out = tmp_path / "out"
    result = run_cli("--server", gui_server.url, "--demo", "--output", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    images = printed_images(result.stdout)
    assert images and all(p.is_file() and p.parent == out.resolve() for p in images)
    for path in images:
        with Image.open(path) as img:
            assert img.size == (demo.DEMO_SIZE, demo.DEMO_SIZE)
    assert "step 2/2" in result.stdout and "saved MoMA context: moma/context_" in result.stdout
    assert "note: when it cuts the subject out with rembg" in result.stdout


def test_download_offline_names_the_file_folder_and_url(tmp_path, capsys, monkeypatch):
    """--download without a network: each entry's exact file, folder, URL and hand command (HF entries too)."""
    import huggingface_hub.constants
    from moma_runner import download

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # read when huggingface_hub is first imported (just above, or earlier by transformers in a run that booted
    # ComfyUI): without this the hub calls wait out their network timeouts (1.5 minutes here)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for entry in TABLE["models"]:
        if not entry.get("hf_repo"):
            entry = {**entry, "url": "http://127.0.0.1:9/" + entry["name"]}  # nothing listens on port 9
        assert download.download(entry, tmp_path / "models") is False
        err = capsys.readouterr().err
        target = tmp_path / "models" / entry["folder"] / entry["name"]
        assert f"folder: {target.parent}" in err and entry["name"] in err
        assert entry.get("url", entry["source"]) in err
        assert entry["download"].replace("{dest}", str(target)) in err
        assert not target.exists() or target.is_dir() and not any(target.iterdir())
    with pytest.raises(common.RunnerError, match="not in the models table"):
        download.download_command(["no_such_model.safetensors"], tmp_path)


def test_every_model_has_one_download_command():
    """A file gets one curl command to its direct URL; a folder one hf command naming exactly its files
    (the adapter in the MoMA_llava_7b repository is not fetched twice)."""
    for entry in TABLE["models"]:
        if entry["type"] == "file":
            assert entry["download"] == f"curl -L --fail -o {{dest}} '{entry['url']}'"
        else:
            assert entry["download"] == (
                f"hf download {entry['hf_repo']} {' '.join(entry['files'])} --local-dir {{dest}}"
            )
        assert entry["licence"]
    llava = next(e for e in TABLE["models"] if e["name"] == "MoMA_llava_7b")
    assert "attn_adapters_projectors.th" not in llava["files"]


def test_readme_models_tables_match_models_json_and_the_workflows():
    """The README's 'Models' tables list exactly models.json's files, each with its folder and size, and
    every model file an example workflow names is among them."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Models", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            name = re.match(r"`([^`]+?)/?`", cells[0]).group(1)
            rows[name] = (cells[1].strip("`").rstrip("/"), cells[2])
    expected = {entry["name"]: (entry["folder"], entry["size"]) for entry in TABLE["models"]}
    assert rows == expected
    listed = {(name, folder) for name, (folder, _) in rows.items()}
    for workflow in sorted(API_DIR.glob("*.json")):
        for use in models.model_uses(graph.load_workflow(workflow), TABLE["loader_inputs"]):
            assert (use.name, use.folder) in listed, (workflow.name, use)


@pytest.mark.skipif(
    os.environ.get("MOMA_TEST_SPLIT") != "processes",
    reason="scripts/test.sh's second pytest run (MOMA_TEST_SPLIT=processes) only",
)
def test_the_pytest_process_of_these_runs_stays_small():
    """Last in the module: nothing here booted ComfyUI or imported torch in this process (0.7 GiB), so each
    demo run's checkpoint load (its child's peak) comes beside a process of well under 0.5 GiB."""
    import psutil

    assert "comfy" not in sys.modules and "torch" not in sys.modules
    assert psutil.Process().memory_info().rss < 0.5 * 2**30
