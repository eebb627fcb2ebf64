"""Apply MoMA Attention says what it does with what it is given: a preset's fixed strength is named as such in the
``strength`` tooltip, and a strength set under a non-custom preset (so not used) is warned about once; a Feature Grab
subject other than the context's is warned about once, naming both. Graphs run through ComfyUI's real validator and
executor (saved context -> Feature Grab at 64 -> Apply -> one euler step at 64x64)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import comfy_exec
import numpy as np
import pytest
from comfy_exec import run_api_workflow
from comfyui_moma.moma.context import save_context
from comfyui_moma.nodes.apply import PRESET_STRENGTH, preset_strength
from PIL import Image

CONTEXT = "moma/apply_warnings_car.safetensors"  # subject 'car'
PRESET_WARNING = "Apply MoMA Attention: preset "
SUBJECT_WARNING = "Apply MoMA Attention: Self-Attention Feature Grab's subject"


@pytest.fixture(scope="module")
def warnings_setup(comfy_host, sd15_checkpoint, adapter_file, test_images, moma_context):
    import folder_paths

    models = comfy_host.models_dir
    for folder, path in (("checkpoints", sd15_checkpoint), ("moma", adapter_file)):
        comfy_exec.link(models / folder / path.name, path)
    input_dir = Path(folder_paths.get_input_directory())
    image_path, mask_path = test_images["rgb"]
    shutil.copy(image_path, input_dir / "apply_warnings_ref.png")
    Image.open(mask_path).convert("L").save(input_dir / "apply_warnings_mask.png")
    assert moma_context.subject == "car"
    save_context(moma_context, Path(folder_paths.get_output_directory()) / CONTEXT)
    return sd15_checkpoint.name


def run(ckpt: str, caplog, preset: str = "context", strength: float = 1.0, grab_subject: str = "car"):
    """The run's saved image and the Apply warnings it logged."""
    import folder_paths

    prompt = comfy_exec.saved_context_graph(
        ckpt, CONTEXT, "apply_warnings_ref.png", "apply_warnings_mask.png", seed=5, steps=1
    )
    prompt["apply"]["inputs"].update(preset=preset, strength=strength)
    prompt["grab"]["inputs"]["subject"] = grab_subject
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "moma_warn"}}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (entry,) = run_api_workflow(prompt)["save"]["images"]
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith((PRESET_WARNING, SUBJECT_WARNING))
    ]
    path = Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]
    with Image.open(path) as image:
        return np.asarray(image), warnings


def test_a_strength_set_under_a_fixed_preset_is_warned_about_once_and_not_used(warnings_setup, caplog):
    texture_image, warnings = run(warnings_setup, caplog, preset="texture", strength=0.7)
    assert warnings == [
        "Apply MoMA Attention: preset 'texture' samples with its fixed strength 0.4; the strength "
        "0.7 you set is not used. Choose preset 'custom' to use it."
    ]
    custom_image, warnings = run(warnings_setup, caplog, preset="custom", strength=0.4)
    assert warnings == []
    assert np.array_equal(texture_image, custom_image)  # the preset's 0.4 sampled, not the 0.7


@pytest.mark.parametrize(
    "preset, strength, used",
    [
        ("context", 1.0, 1.0),
        ("texture", 1.0, 0.4),  # the widget's default, untouched: nothing to say
        ("texture", 0.4, 0.4),  # the preset's own value
        ("custom", 0.7, 0.7),
        ("custom", 1.0, 1.0),
    ],
)
def test_no_warning_where_nothing_set_is_lost(preset, strength, used, caplog):
    with caplog.at_level(logging.WARNING):
        assert preset_strength(preset, strength) == used
    assert not caplog.records


def test_the_strength_tooltip_says_which_presets_fix_it(comfy_host):
    import nodes

    schema = nodes.NODE_CLASS_MAPPINGS["MomaApply"].GET_SCHEMA()
    tooltips = {item.id: item.tooltip for item in schema.inputs}
    assert "ONLY with preset 'custom'" in tooltips["strength"] and "ignored, with a warning" in tooltips["strength"]
    for preset, value in PRESET_STRENGTH.items():
        assert f"{preset} {value}" in tooltips["strength"] and f"fixed at {value}" in tooltips["preset"]


def test_subjects_that_differ_between_feature_grab_and_the_context_are_warned_about_once(warnings_setup, caplog):
    _, warnings = run(warnings_setup, caplog, grab_subject="dog")
    assert len(warnings) == 1
    assert (
        "Self-Attention Feature Grab's subject is 'dog' but the context's (LLaVA Context Encoder or Load MoMA "
        "Context) is 'car'"
    ) in warnings[0]
    _, warnings = run(warnings_setup, caplog, grab_subject="  Car ")  # the same word: case and spaces aside
    assert warnings == []
