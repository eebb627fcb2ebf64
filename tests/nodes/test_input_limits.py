"""Every FLOAT, text and choice input of every MoMA node is checked when a workflow is validated: the node's
``validate_inputs`` takes it (so ComfyUI hands it over), every text has a documented length limit, and
docs/limits.md states each limit the code enforces."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import comfy_exec
import pytest
from comfyui_moma.moma import limits
from comfyui_moma.nodes import NODES
from comfyui_moma.nodes.node_api import io
from comfyui_moma.nodes.validation import TEXT_LIMITS, float_ranges

DOC = Path(__file__).resolve().parents[2] / "docs" / "limits.md"
CHECKED = (io.Float.Input, io.String.Input, io.Combo.Input)


def _checked_inputs(node) -> list:
    return [item for item in node.define_schema().inputs if isinstance(item, CHECKED)]


@pytest.mark.parametrize("node", NODES, ids=lambda node: node.__name__)
def test_validate_inputs_takes_every_float_text_and_choice(node) -> None:
    inputs = _checked_inputs(node)
    if not inputs:
        return
    parameters = inspect.signature(node.validate_inputs).parameters
    missing = [item.id for item in inputs if item.id not in parameters]
    assert not missing, f"{node.__name__}.validate_inputs does not take {missing}: ComfyUI would not check them"
    # ComfyUI passes nothing for an input missing from the workflow, and None for a linked one
    assert all(parameters[item.id].default is not inspect.Parameter.empty for item in inputs), node.__name__
    assert node.validate_inputs() is True  # nothing given (links, inputs missing from the workflow): nothing to refuse


@pytest.mark.parametrize("node", NODES, ids=lambda node: node.__name__)
def test_every_text_and_choice_has_a_limit(node) -> None:
    texts = [item.id for item in _checked_inputs(node) if not isinstance(item, io.Float.Input)]
    limits_of_node = TEXT_LIMITS[node.define_schema().node_id]
    assert sorted(limits_of_node) == sorted(texts), node.__name__


@pytest.mark.parametrize("node", [node for node in NODES if float_ranges(node)], ids=lambda node: node.__name__)
def test_every_float_refuses_non_finite_values_naming_node_input_and_value(node) -> None:
    for name, (low, high) in float_ranges(node).items():
        assert low is not None and high is not None and math.isfinite(low) and math.isfinite(high), name
        for value in (math.nan, math.inf, -math.inf, high + 1, low - 1):
            message = comfy_exec.validation_message(node.validate_inputs, **{name: value})
            assert isinstance(message, str) and message.startswith(f"{name}: "), (name, value, message)
        assert node.validate_inputs(**{name: (low + high) / 2}) is True


def test_docs_state_every_limit() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for node_id, inputs in TEXT_LIMITS.items():
        for name, limit in inputs.items():
            row = re.search(rf"^\|[^|\n]*`{node_id}`[^|\n]*\|\s*`{name}`\s*\|\s*([\d,]+)\s*\|", doc, re.MULTILINE)
            assert row, f"docs/limits.md has no row for {node_id} {name}"
            assert int(row.group(1).replace(",", "")) == limit, (node_id, name)
    for constant in (
        "SUBJECT_CHARS",
        "PROMPT_CHARS",
        "TEXT_CHARS",
        "BLOCK_WEIGHTS_CHARS",
        "NAME_CHARS",
        "CHOICE_CHARS",
    ):
        assert f"{getattr(limits, constant):,}" in doc, constant
    assert "65,504" in doc and "sqrt(767)" in doc


def test_folder_walks_follow_links_but_not_loops(tmp_path: Path) -> None:
    """Two names for one folder are both listed (a user's links); a link back up (a loop) is not entered."""
    from comfyui_moma.nodes.paths import walk_folders

    models = tmp_path / "LLM"
    (models / "real" / "inner").mkdir(parents=True)
    (models / "real" / "config.json").write_text("{}")
    (models / "other-name").symlink_to(models / "real", target_is_directory=True)
    (models / "real" / "inner" / "up").symlink_to(models, target_is_directory=True)  # a loop
    with comfy_exec.deadline(30, "walking a folder with a loop"):
        walked = {str(Path(folder).relative_to(models)): files for folder, files in walk_folders(models)}
    assert set(walked) == {".", "real", "real/inner", "other-name", "other-name/inner"}, walked
    assert walked["real"] == walked["other-name"] == ["config.json"]
