"""The example workflows against the real host: workflows/*.json (UI format, what the browser saves and
ComfyUI's template browser lists) and workflows/api/*.json (API format, for scripts and the runner).

- ComfyUI's own template routes list exactly the UI files and serve them;
- every node type exists and every input name and value is valid for its node: our own checks (names,
  required inputs, value types, ranges, combo choices, link types) plus ComfyUI's ``execution.validate_prompt``,
  with the fixture models placed under the file names the workflows expect;
- a UI file is converted to the API format the way the frontend does it (widget values in the order of each
  node's widget inputs, seed control values and the image upload button skipped, Note nodes dropped) and must
  equal its API twin: same nodes, links, values and titles (that ComfyUI's web app itself exports exactly the
  twin and saves each file back unchanged is tested on the --gui --demo server, tests/test_runner.py);
- the layout reads left to right (every link goes rightwards, no nodes overlap) and each file has a Note;
- each API workflow executes end to end through the real executor on the fixtures, shrunk to 64x64, 2 steps
  and a Feature Grab resolution of 128 (on the run's one loaded full-layout SD1.5 fixture).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import comfy_exec
import fixtures
import host
import pytest
from moma_runner import common, demo, models
from moma_runner import workflow as graph
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "workflows"
API_DIR = EXAMPLES / "api"
UI_FILES = sorted(p.name for p in EXAMPLES.glob("*.json"))
API_FILES = sorted(p.name for p in API_DIR.glob("*.json"))
API_ONLY = {"plain_sd15.json"}  # the plain SD1.5 graph the runner tests use: not a MoMA example, no template
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the browser, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
TITLE_BAR = 30  # the frontend draws a node's title above its ``pos``
REFERENCE_NAME = "moma_reference.jpg"
SAVED_CONTEXT = "moma/context_00001_.safetensors"  # what MomaSaveContext writes first (prefix moma/context)
TEST_SIZE, TEST_STEPS, TEST_RESOLUTION = 64, 2, 128
PACK = common.PACK_LINK_NAME  # the pack's folder under custom_nodes/: what the template browser lists


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --------------------------------------------------------------------------------------------------
# node definitions, as the host serves them


def node_class(class_type: str):
    import nodes

    assert class_type in nodes.NODE_CLASS_MAPPINGS, f"node type {class_type!r} does not exist in this ComfyUI"
    return nodes.NODE_CLASS_MAPPINGS[class_type]


def input_specs(class_type: str) -> dict[str, tuple[Any, dict, bool]]:
    """name -> (type, options, optional) in schema order (required, then optional)."""
    info = node_class(class_type).INPUT_TYPES()
    specs = {}
    for section in ("required", "optional"):
        for name, spec in info.get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 else {}, section == "optional")
    return specs


def type_name(input_type: Any) -> str:
    return "COMBO" if isinstance(input_type, list) else str(input_type)


def combo_options(input_type: Any, options: dict) -> list:
    return list(input_type) if isinstance(input_type, list) else list(options.get("options", []))


def is_widget(input_type: Any, options: dict) -> bool:
    return type_name(input_type) in WIDGET_TYPES and not options.get("forceInput")


def node_info(class_type: str) -> tuple[str, list[tuple[str, str]]]:
    """(display name, [(output name, output type)]) as /object_info gives them to the frontend."""
    import nodes

    cls = node_class(class_type)
    if hasattr(cls, "GET_NODE_INFO_V1"):
        info = cls.GET_NODE_INFO_V1()
        return info["display_name"], list(zip(info["output_name"], [str(t) for t in info["output"]]))
    types = [str(t) for t in cls.RETURN_TYPES]
    names = list(getattr(cls, "RETURN_NAMES", None) or types)
    return nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type), list(zip(names, types))


def widget_layout(class_type: str) -> list[str | None]:
    """The node's ``widgets_values`` slots as the frontend creates them: each widget input in schema order,
    with None for a value the frontend keeps but never sends: the seed's control_after_generate after an INT
    that has one, and the upload button that the frontend appends to the required inputs of a node with an
    image/video upload combo."""
    layout: list[str | None] = []
    specs = input_specs(class_type)
    for section_optional in (False, True):
        upload = False
        for name, (input_type, options, optional) in specs.items():
            if optional != section_optional or not is_widget(input_type, options):
                continue
            layout.append(name)
            kind = type_name(input_type)
            if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
                layout.append(None)
            if kind == "COMBO" and options.get("control_after_generate"):
                raise NotImplementedError(
                    f"{class_type}.{name}: a combo with control_after_generate (a control "
                    "and a filter value) is not used by the examples"
                )
            upload = upload or (not optional and any(options.get(flag) for flag in UPLOAD_FLAGS))
        if upload:
            layout.append(None)
    return layout


# --------------------------------------------------------------------------------------------------
# UI format -> API format, as the frontend's "Export (API)" does it


# Core nodes that gained an output between the two supported hosts (0.3.75 -> 0.30): SaveImage and PreviewImage
# now pass their images on.
OUTPUT_ADDED_IN_0_30 = {"SaveImage": ("images", "IMAGE"), "PreviewImage": ("images", "IMAGE")}


def ui_to_api(ui: dict) -> dict:
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        layout = widget_layout(node["type"])
        values = node.get("widgets_values", [])
        assert len(values) == len(layout), (
            f"node {node['id']} {node['type']}: {len(values)} widget values {values}, expected {len(layout)} for "
            f"{[name or '(control/upload)' for name in layout]}"
        )
        inputs = {name: value for name, value in zip(layout, values) if name is not None}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        display_name, _ = node_info(node["type"])
        prompt[str(node["id"])] = {
            "inputs": inputs,
            "class_type": node["type"],
            "_meta": {"title": node.get("title") or display_name},
        }
    return prompt


# --------------------------------------------------------------------------------------------------
# checks of an API graph (names, values, links) beyond ComfyUI's validator, which only looks at the inputs a
# node declares, skips nodes no output depends on, and does not check V3 combo choices


def api_problems(prompt: dict) -> list[str]:
    problems = []
    for nid, node in prompt.items():
        class_type = node.get("class_type")
        if class_type in FRONTEND_ONLY:
            problems.append(f"node {nid}: {class_type} is frontend-only and cannot be in an API workflow")
            continue
        specs = input_specs(class_type)
        inputs = node.get("inputs", {})
        for name in inputs:
            if name not in specs:
                problems.append(f"node {nid} {class_type}: unknown input {name!r}")
        for name, (input_type, options, optional) in specs.items():
            kind = type_name(input_type)
            if name not in inputs:
                if not optional:
                    problems.append(f"node {nid} {class_type}: required input {name!r} missing")
                continue
            value = inputs[name]
            where = f"node {nid} {class_type}.{name} = {value!r}"
            if is_link(value):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{where}: links to a missing node")
                    continue
                _, outputs = node_info(source["class_type"])
                if value[1] >= len(outputs):
                    problems.append(f"{where}: {source['class_type']} has {len(outputs)} outputs")
                elif outputs[value[1]][1] != kind and "*" not in (kind, outputs[value[1]][1]):
                    problems.append(f"{where}: gets {outputs[value[1]][1]}, needs {kind}")
                continue
            if not is_widget(input_type, options):
                problems.append(f"{where}: a {kind} input needs a link")
            elif kind == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
                problems.append(f"{where}: not an integer")
            elif kind == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                problems.append(f"{where}: not a number")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: not a boolean")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: not a string")
            elif kind == "COMBO" and value not in combo_options(input_type, options):
                problems.append(f"{where}: not one of {combo_options(input_type, options)[:20]}")
            elif kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
                problems.append(f"{where}: outside {options.get('min')}..{options.get('max')}")
    return problems


def comfy_validation(prompt: dict) -> tuple[bool, Any, dict]:
    import execution

    valid, error, _outputs, node_errors = asyncio.run(execution.validate_prompt(uuid.uuid4().hex, prompt, None))
    return valid, error, node_errors


# --------------------------------------------------------------------------------------------------
# fixtures: the fixture models under the examples' file names, the reference picture, a saved context


@pytest.fixture(scope="module")
def example_host(comfy_host, sd15_checkpoint, llava_dir, clip_vision_dir, adapter_file, test_images, moma_context):
    """The host with every model the examples name linked to its fixture, the reference picture in input/
    and a context saved where Save MoMA Context writes it first (encoded by the fixture LLaVA)."""
    import folder_paths
    from comfyui_moma.moma.context import save_context
    from fixtures import lora, rembg

    by_folder = {
        "checkpoints": sd15_checkpoint,
        "vae": demo.demo_model_builders()["vae"](),  # the fixture's VAE cut out as a VAE-only file
        "loras": fixtures.cached("moma_test_sd15_lora.safetensors", lora.write_sd15_lora),
        "moma": adapter_file,
        "LLM": llava_dir,
        "clip_vision": clip_vision_dir,
        "rembg": fixtures.cached("u2net.onnx", rembg.write_u2net_onnx),
    }
    table = models.load_models_table()
    for name in API_FILES:
        for use in models.model_uses(graph.load_workflow(API_DIR / name), table["loader_inputs"]):
            comfy_exec.link(comfy_host.models_dir / use.folder / use.name, by_folder[use.folder])
    picture, _mask = test_images["rgb"]
    with Image.open(picture) as image:
        image.convert("RGB").save(Path(folder_paths.get_input_directory()) / REFERENCE_NAME, quality=95)
    for sample in sorted((EXAMPLES / "input").iterdir()):  # the other pictures they load (a second subject's)
        if sample.name != REFERENCE_NAME:
            shutil.copyfile(sample, Path(folder_paths.get_input_directory()) / sample.name)
    save_context(moma_context, Path(folder_paths.get_output_directory()) / SAVED_CONTEXT)
    return comfy_host


def shrunk(prompt: dict) -> dict:
    """The workflow as shipped, at 64x64, 2 steps and a Feature Grab resolution of 128."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=TEST_SIZE, height=TEST_SIZE)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = TEST_STEPS
        elif node["class_type"] == "MomaFeatureGrab":
            inputs["resolution"] = TEST_RESOLUTION
    return prompt


# --------------------------------------------------------------------------------------------------
# the template browser


def test_template_browser_lists_exactly_the_ui_workflows(comfy_host):
    """ComfyUI's own /workflow_templates routes (app/custom_node_manager.py) list and serve the UI files."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from app.custom_node_manager import CustomNodeManager

    import nodes

    assert UI_FILES and set(UI_FILES) <= set(API_FILES)

    async def fetch() -> tuple[dict, dict]:
        app = web.Application()
        routes = web.RouteTableDef()
        CustomNodeManager().add_routes(routes, app, nodes.LOADED_MODULE_DIRS.items())
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            listing = await (await client.get("/workflow_templates")).json()
            served = {}
            for name in listing.get(PACK, []):
                response = await client.get(f"/api/workflow_templates/{PACK}/{name}.json")
                assert response.status == 200, name
                served[name] = json.loads(await response.read())
        return listing, served

    listing, served = asyncio.run(fetch())
    assert sorted(listing[PACK]) == sorted(Path(name).stem for name in UI_FILES)
    for name in UI_FILES:
        assert served[Path(name).stem] == load(EXAMPLES / name)
    # workflows/ is the project's layout; ComfyUI serves it (logging a debug-level hint that example_workflows/
    # is its preferred name) and lists only the UI files directly inside it, so models.json stays at the root.


def test_every_ui_workflow_has_an_api_twin_and_back():
    assert {name for name in API_FILES if name not in API_ONLY} == set(UI_FILES)
    assert API_ONLY <= set(API_FILES)


# --------------------------------------------------------------------------------------------------
# UI format: what the frontend saves


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_is_a_well_formed_frontend_file(name, comfy_host):
    ui = load(EXAMPLES / name)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in ui, key
    assert ui["version"] == 0.4 and ui["extra"].get("frontendVersion")
    ids = [node["id"] for node in ui["nodes"]]
    assert len(set(ids)) == len(ids) and ui["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] >= max(link_ids)
    by_id = {node["id"]: node for node in ui["nodes"]}
    assert sorted(node["order"] for node in ui["nodes"]) == list(range(len(ui["nodes"])))
    assert any(node["type"] in FRONTEND_ONLY for node in ui["nodes"]), "each example explains itself in a Note"

    for node in ui["nodes"]:
        for key in (
            "id",
            "type",
            "pos",
            "size",
            "flags",
            "order",
            "mode",
            "inputs",
            "outputs",
            "properties",
            "widgets_values",
        ):
            assert key in node, f"node {node['id']}: no {key}"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and min(node["size"]) > 0
        if node["type"] in FRONTEND_ONLY:
            assert not node["inputs"] and not node["outputs"] and isinstance(node["widgets_values"][0], str)
            continue
        specs = input_specs(node["type"])
        _, outputs = node_info(node["type"])
        assert node["properties"].get("Node name for S&R") == node["type"]
        saved_outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        if node["type"] in OUTPUT_ADDED_IN_0_30 and not outputs:
            # the files are what ComfyUI 0.30's frontend writes; 0.3.75's keeps the unlinked output it added
            assert saved_outputs == [OUTPUT_ADDED_IN_0_30[node["type"]]] and not node["outputs"][0]["links"]
        else:
            assert saved_outputs == outputs, f"node {node['id']} outputs"
        # the frontend saves every socket (connected or not) first, then the inputs of its widgets
        sockets = [slot for slot in node["inputs"] if "widget" not in slot]
        assert node["inputs"][: len(sockets)] == sockets, f"node {node['id']}: sockets after widget inputs"
        expected_sockets = [(n, type_name(t)) for n, (t, o, _) in specs.items() if not is_widget(t, o)]
        assert [(s["name"], s["type"]) for s in sockets] == expected_sockets, f"node {node['id']} sockets"
        for slot in sockets:
            _, _, optional = specs[slot["name"]]
            assert optional or slot["link"] is not None, f"node {node['id']}: {slot['name']} not connected"
            assert (slot.get("shape") == 7) == optional  # the frontend draws optional sockets hollow
        widget_names = [n for n in widget_layout(node["type"]) if n is not None]
        for slot in node["inputs"]:
            if "widget" in slot:
                assert slot["widget"]["name"] == slot["name"]
                assert slot["name"] in widget_names or slot["type"] == "IMAGEUPLOAD", slot

    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        output = by_id[source]["outputs"][source_slot]
        slot = by_id[target]["inputs"][target_slot]
        assert link_id in (output["links"] or []), f"link {link_id} not listed by node {source}"
        assert slot["link"] == link_id, f"link {link_id} not on node {target} input {slot['name']}"
        assert output["type"] == slot["type"] == link_type, f"link {link_id}: {output['type']} -> {slot['type']}"
        assert by_id[source]["order"] < by_id[target]["order"]
    for node in ui["nodes"]:
        for slot in node["inputs"]:
            assert slot["link"] is None or slot["link"] in link_ids
        for output in node["outputs"]:
            assert all(link in link_ids for link in output["links"] or [])


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_reads_left_to_right_without_overlaps(name):
    ui = load(EXAMPLES / name)
    by_id = {node["id"]: node for node in ui["nodes"]}
    for link_id, source, _, target, _, _ in ui["links"]:
        src, dst = by_id[source], by_id[target]
        assert src["pos"][0] + src["size"][0] <= dst["pos"][0], (
            f"link {link_id} runs right to left: node {source} {src['type']} -> node {target} {dst['type']}"
        )

    def box(node):
        x, y = node["pos"]
        w, h = node["size"]
        return x, y - TITLE_BAR, x + w, y + h

    boxes = [(node["id"], box(node)) for node in ui["nodes"]]
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(boxes):
        for b, (bx0, by0, bx1, by1) in boxes[i + 1 :]:
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"nodes {a} and {b} overlap"


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_and_api_variants_describe_the_same_graph(name, comfy_host):
    converted = ui_to_api(load(EXAMPLES / name))
    api = load(API_DIR / name)
    assert converted.keys() == api.keys()
    for nid in api:
        assert converted[nid] == api[nid], f"node {nid} differs"


# --------------------------------------------------------------------------------------------------
# validity on the host


@pytest.mark.parametrize("variant", ["api", "ui"])
@pytest.mark.parametrize("name", API_FILES)
def test_workflow_is_valid_for_the_host(name, variant, example_host):
    if variant == "ui":
        if name in API_ONLY:
            pytest.skip(f"{name} has no UI variant")
        prompt = ui_to_api(load(EXAMPLES / name))
    else:
        prompt = load(API_DIR / name)
    assert api_problems(prompt) == []
    valid, error, node_errors = comfy_validation(prompt)
    assert valid, f"{error}\n{json.dumps(node_errors, indent=1)}"


def test_checks_catch_bad_workflows(example_host):
    """The checks above can fail: each kind of mistake is reported."""
    prompt = load(API_DIR / "moma_context.json")
    (apply_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "MomaApply"]
    (grab_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "MomaFeatureGrab"]
    (sampler_id,) = [nid for nid, node in prompt.items() if node["class_type"] == "KSampler"]
    broken = copy.deepcopy(prompt)
    broken[apply_id]["inputs"]["preset"] = "contxt"  # V3 combo: ComfyUI's validator lets this through
    broken[apply_id]["inputs"]["strenght"] = 1.0
    broken[grab_id]["inputs"]["resolution"] = 4096
    del broken[sampler_id]["inputs"]["cfg"]
    broken[sampler_id]["inputs"]["model"] = [grab_id, 0]
    problems = "\n".join(api_problems(broken))
    for expected in (
        "MomaApply.preset = 'contxt': not one of",
        "unknown input 'strenght'",
        "MomaFeatureGrab.resolution = 4096: outside 0..1024",
        "required input 'cfg' missing",
        "KSampler.model",
        "gets MOMA_REF, needs MODEL",
    ):
        assert expected in problems, problems

    ui = load(EXAMPLES / "moma_context.json")
    sampler = next(node for node in ui["nodes"] if node["type"] == "KSampler")
    sampler["widgets_values"].remove("randomize")  # a file without the seed control value
    with pytest.raises(AssertionError, match="7 for"):
        ui_to_api(ui)


# --------------------------------------------------------------------------------------------------
# execution


@pytest.mark.slow
@pytest.mark.parametrize("name", host.cases_for_hosts(API_FILES, {"moma_context.json", "moma_saved_context.json"}))
def test_api_workflow_executes_on_fixtures(name, example_host, caplog):
    import folder_paths
    from comfyui_moma.moma.context import load_context

    prompt = shrunk(load(API_DIR / name))
    with caplog.at_level(logging.WARNING):
        outputs = comfy_exec.run_api_workflow(prompt)

    saved = [
        (nid, image)
        for nid, output in outputs.items()
        for image in output.get("images", [])
        if prompt[nid]["class_type"] == "SaveImage"
    ]
    assert saved, outputs
    for _nid, image in saved:
        path = Path(folder_paths.get_directory_by_type(image["type"])) / image["subfolder"] / image["filename"]
        with Image.open(path) as picture:
            assert picture.size == (TEST_SIZE, TEST_SIZE)
    for nid, node in prompt.items():
        if node["class_type"] == "PreviewImage":  # the object on white: the reference picture's size
            (preview,) = outputs[nid]["images"]
            path = (
                Path(folder_paths.get_directory_by_type(preview["type"])) / preview["subfolder"] / preview["filename"]
            )
            with Image.open(path) as picture:
                assert picture.size == (512, 512)
        if node["class_type"] == "MomaSaveContext":
            (entry,) = outputs[nid]["moma_context"]
            context = load_context(Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"])
            encoder = next(n for n in prompt.values() if n["class_type"] == "MomaContextEncoder")["inputs"]
            assert context.subject == encoder["subject"] and context.prompt == encoder["prompt"]
    for nid, node in prompt.items():
        if node["class_type"] == "LoraLoader":
            # ComfyUI warns for every LoRA key it cannot map and every patch no model takes: none in the run
            unloaded = [
                r.getMessage()
                for r in caplog.records
                if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()
            ]
            assert unloaded == []
            assert_lora_patches_every_module(prompt, nid)


def assert_lora_patches_every_module(prompt: dict, lora_id: str) -> None:
    """The workflow's LoraLoader, on its checkpoint, patches each module of the fixture LoRA: the UNet's in the
    MODEL, the text encoder's in the CLIP."""
    import gc

    from moma_demo.lora import lora_modules

    import nodes

    inputs = prompt[lora_id]["inputs"]
    source = prompt[inputs["model"][0]]
    assert source["class_type"] == "CheckpointLoaderSimple" and inputs["clip"][0] == inputs["model"][0]
    model, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(source["inputs"]["ckpt_name"])[:3]
    patched_model, patched_clip = nodes.LoraLoader().load_lora(
        model, clip, inputs["lora_name"], inputs["strength_model"], inputs["strength_clip"]
    )
    modules = lora_modules()
    unet = [name for name in modules if name.startswith("lora_unet_")]
    assert len(patched_model.patches) == len(unet) and not model.patches
    assert len(patched_clip.patcher.patches) == len(modules) - len(unet) and not clip.patcher.patches
    assert all(patch[0] == inputs["strength_model"] for patches in patched_model.patches.values() for patch in patches)
    del model, clip, _vae, patched_model, patched_clip
    gc.collect()


# --------------------------------------------------------------------------------------------------
# workflows saved by earlier releases (2026-11, before Apply's per-path inputs, Loader's llava_placement and
# Feature Grab's latent) still load: same node ids and input names, every new input optional with a default

OLD_EXAMPLES = REPO / "tests" / "data" / "workflows-2026-11"


@pytest.mark.parametrize("name", sorted(p.name for p in (OLD_EXAMPLES / "api").glob("*.json")))
def test_workflows_saved_before_the_new_inputs_still_validate(name, example_host):
    prompt = load(OLD_EXAMPLES / "api" / name)
    assert api_problems(prompt) == []
    valid, error, node_errors = comfy_validation(prompt)
    assert valid, (error, node_errors)


@pytest.mark.parametrize("name", sorted(p.name for p in OLD_EXAMPLES.glob("*.json")))
def test_ui_workflows_saved_before_the_new_inputs_keep_their_widget_values(name, example_host):
    """What the frontend does with an old file: the widget values it has go to the inputs they were saved for
    (the new inputs come after them), the new ones take their defaults; the result is the old API twin."""
    ui = load(OLD_EXAMPLES / name)
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        layout = widget_layout(node["type"])
        values = node.get("widgets_values", [])
        assert len(values) <= len(layout), f"node {node['id']}: more values than widgets"
        specs = input_specs(node["type"])
        for name_ in layout[len(values) :]:
            assert name_ is None or specs[name_][2], f"node {node['id']}: new widget {name_} is not optional"
            values.append(None if name_ is None else specs[name_][1].get("default"))
        node["widgets_values"] = values
    converted = ui_to_api(ui)
    old_api = load(OLD_EXAMPLES / "api" / name)
    for nid, node in old_api.items():
        new_inputs = {k: v for k, v in converted[nid]["inputs"].items() if k not in node["inputs"]}
        assert {k: v for k, v in converted[nid]["inputs"].items() if k in node["inputs"]} == node["inputs"], nid
        for input_name in new_inputs:
            assert input_specs(node["class_type"])[input_name][2], f"node {nid}: {input_name} is not optional"
    valid, error, node_errors = comfy_validation(converted)
    assert valid, (error, node_errors)
