"""The runner's server-mode check (ComfyUI's validation rules applied to /object_info) against ComfyUI's own
validate_prompt, in this process's ComfyUI, on the demo stand-ins of every model the examples use.
(The runner's other tests, tests/test_runner.py, start their ComfyUI in subprocesses.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import host  # noqa: F401  (puts tools/ on sys.path)
import pytest
from moma_runner import demo, models
from moma_runner import workflow as graph
from moma_runner.common import API_DIR

TABLE = models.load_models_table()


def object_info_in_process() -> dict:
    """/object_info as server.py's node_info builds it, for the fields ComfyUI's validation reads."""
    import nodes

    info = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            info[name] = cls.GET_NODE_INFO_V1()
        else:
            info[name] = {
                "input": cls.INPUT_TYPES(),
                "output": list(cls.RETURN_TYPES),
                "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
            }
    return json.loads(json.dumps(info, default=str))  # as it travels: tuples become lists


def _mutations(prompt: dict) -> dict[str, dict]:
    """Broken variants of a MoMA example (each one mistake), and the graph as shipped."""
    (apply_id,) = graph.ids_of(prompt, "MomaApply")
    (grab_id,) = graph.ids_of(prompt, "MomaFeatureGrab")
    (sampler_id,) = graph.ids_of(prompt, "KSampler")
    variants: dict[str, dict] = {"as shipped": prompt}

    def variant(name: str, node: str, **changes) -> None:
        broken = copy.deepcopy(prompt)
        for key, value in changes.items():
            if value is None:
                del broken[node]["inputs"][key]
            else:
                broken[node]["inputs"][key] = value
        variants[name] = broken

    variant("strength over max", apply_id, strength=2.5)
    variant("resolution over max", grab_id, resolution=4096)
    variant("resolution under min", grab_id, resolution=-64)
    variant("combo typo", apply_id, preset="contxt")
    variant("required input missing", sampler_id, cfg=None)
    variant("link of the wrong type", sampler_id, model=[grab_id, 0])
    variant("not a number", sampler_id, steps="many")
    variant("output index out of range", sampler_id, model=[grab_id, 7])
    return variants


@pytest.fixture(scope="module")
def demo_models_in_host(comfy_host):
    """The test host with the demo stand-ins under every name the examples use, and the sample picture."""
    import folder_paths
    from moma_runner import gui

    uses = {}
    for path in sorted(API_DIR.glob("*.json")):
        for use in models.model_uses(graph.load_workflow(path), TABLE["loader_inputs"]):
            uses.setdefault((use.folder, use.name), use)
    demo.link_demo_models(comfy_host.models_dir, list(uses.values()), demo.demo_model_builders())
    gui.place_samples(Path(folder_paths.get_input_directory()))
    return comfy_host


@pytest.mark.parametrize("workflow", ["moma_context.json", "moma_texture.json", "moma_community_lora.json"])
def test_object_info_validation_agrees_with_comfyui(workflow, demo_models_in_host):
    """The server-mode check (ComfyUI's rules on /object_info) rejects exactly what ComfyUI's own
    validate_prompt rejects, with the same failing nodes; a graph that fails only some outputs counts as
    rejected (ComfyUI would skip them)."""
    import asyncio
    import uuid

    import execution
    from moma_runner.validation import validate_with_object_info

    info = object_info_in_process()
    for name, prompt in _mutations(graph.load_workflow(API_DIR / workflow)).items():
        ok, _error, _outputs, node_errors = asyncio.run(
            execution.validate_prompt(uuid.uuid4().hex, copy.deepcopy(prompt), None)
        )
        ours_ok, _ours_error, _ours_outputs, ours_errors = validate_with_object_info(copy.deepcopy(prompt), info)
        comfy_verdict = ok and not node_errors
        assert (ours_ok and not ours_errors) == comfy_verdict, (name, node_errors, ours_errors)
        assert comfy_verdict == (name == "as shipped"), (name, node_errors)
        if node_errors and name != "output index out of range":  # (ComfyUI raises there: the output node errs)
            assert set(ours_errors) == set(node_errors), (name, node_errors, ours_errors)
            for nid in node_errors:
                if prompt[nid]["class_type"].startswith("Moma"):
                    # a MoMA node checks its FLOAT and choice inputs in its own validate_inputs (which
                    # /object_info cannot show): the same node fails, with the node's own error type
                    continue
                assert {e["type"] for e in ours_errors[nid]["errors"]} == {
                    e["type"] for e in node_errors[nid]["errors"]
                }, (name, nid)
