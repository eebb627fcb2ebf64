"""MoMA Text Encode and the prompt check at sampling: the subject's tokens are found in the text the positive
conditioning was made from (tagged by MoMA Text Encode), and an untagged conditioning of another length than the
text Apply was given is warned about. Graphs run through ComfyUI's real validator and executor."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
from pathlib import Path

import comfy_exec
import numpy as np
import pytest
import torch
from comfy_exec import WorkflowError, run_api_workflow
from comfyui_moma.moma.context import save_context
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.nodes.text_encode import PROMPT_TAG_KEY, MomaTextEncode, clip_token_ids, sd15_token_chunks
from PIL import Image

CAR_CONTEXT = "moma/text_encode_car.safetensors"
DOG_CONTEXT = "moma/text_encode_dog.safetensors"
OTHER_TEXT = "a dog and a cat next to a red car in the snow"  # 'car' at another token than in the sd_prompt
TWO_SUBJECTS = "photo of a car and a dog on a beach"
LONG_TEXT = "photo of a car. " + ", ".join(["a very detailed picture of autumn leaves"] * 12)  # two 77-chunks


def test_text_encode_gives_core_clip_text_encode_numbers_and_tags_the_text(sd15_models, moma_context):
    import nodes

    clip = sd15_models[1]
    text = "photo of a car. A (car:1.2) in autumn with falling leaves."
    (core,) = nodes.CLIPTextEncode().encode(clip, text)[0]
    (ours,) = MomaTextEncode.execute(clip, text).result[0]
    assert torch.equal(ours[0], core[0]) and torch.equal(ours[1]["pooled_output"], core[1]["pooled_output"])
    assert set(ours[1]) - set(core[1]) == {PROMPT_TAG_KEY}
    tag = ours[1][PROMPT_TAG_KEY]
    assert tag.text == text and tag.token_ids == clip_token_ids(clip.tokenize(text)["l"])
    assert len(tag) == ours[0].shape[1] == 77
    # empty text with a context: the context's sd_prompt, i.e. what CLIPTextEncode(sd_prompt) gives
    (from_context,) = MomaTextEncode.execute(clip, "  ", moma_context).result[0]
    (core_sd,) = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    assert torch.equal(from_context[0], core_sd[0]) and from_context[1][PROMPT_TAG_KEY].text == moma_context.sd_prompt
    with pytest.raises(MomaError, match="'text' is empty and no context is connected"):
        MomaTextEncode.execute(clip, "")
    with pytest.raises(MomaError, match="'context' must come from"):
        MomaTextEncode.execute(clip, "a car", object())
    with pytest.raises(MomaError, match=r"text encoders \['g'\], not SD1.5's CLIP-L"):
        sd15_token_chunks({"g": []})


def test_text_encode_warns_when_the_text_lacks_the_context_subject(sd15_models, moma_context, caplog):
    with caplog.at_level(logging.WARNING):
        MomaTextEncode.execute(sd15_models[1], "a dog on a beach", moma_context)
        MomaTextEncode.execute(sd15_models[1], "a red car on a beach", moma_context)
    messages = [r.getMessage() for r in caplog.records if "MoMA Text Encode" in r.getMessage()]
    assert len(messages) == 1 and "'a dog on a beach' does not contain the context's subject 'car'" in messages[0]


# --- through the executor -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_setup(comfy_host, sd15_checkpoint, adapter_file, llava_dir, clip_vision_dir, test_images, moma_context):
    import folder_paths

    models = comfy_host.models_dir
    for folder, path in (
        ("checkpoints", sd15_checkpoint),
        ("moma", adapter_file),
        ("LLM", llava_dir),
        ("clip_vision", clip_vision_dir),
    ):
        comfy_exec.link(models / folder / path.name, path)
    input_dir, output_dir = Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory())
    image_path, mask_path = test_images["wide"]
    shutil.copy(image_path, input_dir / "text_encode_ref.png")
    Image.open(mask_path).convert("L").save(input_dir / "text_encode_mask.png")
    save_context(moma_context, output_dir / CAR_CONTEXT)
    save_context(dataclasses.replace(moma_context, subject="dog"), output_dir / DOG_CONTEXT)
    return sd15_checkpoint.name


def graph(ckpt: str, positive: dict, apply_prompt: str | None = None, dog: bool = False) -> dict:
    """Saved context -> Feature Grab -> Apply MoMA (and a second Apply for a dog with ``dog``) -> 3 euler steps at
    64x64 with ``positive`` as the positive prompt node -> SaveImage."""
    nodes = comfy_exec.saved_context_graph(
        ckpt, CAR_CONTEXT, "text_encode_ref.png", "text_encode_mask.png", seed=3, steps=3
    )
    nodes["pos"] = positive
    nodes["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "moma_text_encode"}}
    if dog:
        nodes["dogctx"] = {
            "class_type": "MomaLoadContext",
            "inputs": {"context_file": f"{DOG_CONTEXT} [output]", "path": ""},
        }
        nodes["apply2"] = {
            "class_type": "MomaApply",
            "inputs": {**nodes["apply"]["inputs"], "model": ["apply", 0], "context": ["dogctx", 0]},
        }
        nodes["ks"]["inputs"]["model"] = ["apply2", 0]
    if apply_prompt is not None:
        for node in ("apply", "apply2") if dog else ("apply",):
            nodes[node]["inputs"]["prompt"] = apply_prompt
    return nodes


def clip_text(text) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}


def moma_text(text, context=True) -> dict:
    inputs = {"text": text, "clip": ["ckpt", 1]}
    if context:
        inputs["context"] = ["ctx", 0]
    return {"class_type": "MomaTextEncode", "inputs": inputs}


def image_of(prompt: dict, caplog=None) -> np.ndarray:
    """Run the graph; its saved image. With ``caplog``: its records are this run's, from INFO on."""
    import folder_paths

    if caplog is not None:
        caplog.clear()
    with caplog.at_level(logging.INFO) if caplog is not None else contextlib.nullcontext():
        outputs = run_api_workflow(prompt)
    (entry,) = outputs["save"]["images"]
    return np.asarray(Image.open(Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]))


def moma_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "Apply MoMA Attention (subject" in record.getMessage()]


@pytest.mark.default_host_only
def test_tagged_sd_prompt_gives_the_same_image_as_clip_text_encode(text_setup, caplog):
    """MoMA Text Encode of the context's sd_prompt (text left empty) = CLIPTextEncode(sd_prompt), today's graph:
    the identical image and no message."""
    today = image_of(graph(text_setup, clip_text(["ctx", 1])), caplog)
    assert moma_messages(caplog) == []
    tagged = image_of(graph(text_setup, moma_text("")), caplog)
    assert moma_messages(caplog) == []
    assert np.array_equal(tagged, today)


def test_tagged_other_text_uses_the_subject_tokens_of_that_text(text_setup, caplog):
    """A positive prompt other than the sd_prompt, from MoMA Text Encode: MoMA takes the subject's tokens from that
    text (the image equals telling Apply the text through its 'prompt' input) and says so once; the same text
    through plain CLIPTextEncode without 'prompt' masks the sd_prompt's token positions and gives another image."""
    tagged = image_of(graph(text_setup, moma_text(OTHER_TEXT)), caplog)
    (message,) = moma_messages(caplog)
    assert re.search(
        r"subject's tokens are taken from the positive prompt .*'a dog and a cat next to a red car in "
        r"the snow' \(positions \[10\]\), not from 'photo of a car\. .*' \(positions \[4, 7\]\)",
        message,
    )
    told = image_of(graph(text_setup, clip_text(OTHER_TEXT), apply_prompt=OTHER_TEXT), caplog)
    assert moma_messages(caplog) == []
    assert np.array_equal(tagged, told)
    untold = image_of(graph(text_setup, clip_text(OTHER_TEXT)))  # the silent mismatch MoMA cannot see
    assert not np.array_equal(untold, tagged)


@pytest.mark.default_host_only
def test_tagged_text_without_the_subject_is_warned_about_at_sampling(text_setup, caplog):
    image_of(graph(text_setup, moma_text("a dog on a beach", context=False)), caplog)
    (message,) = moma_messages(caplog)
    assert "the subject is not in the positive prompt 'a dog on a beach' (from MoMA Text Encode)" in message
    assert "unmasked" in message


@pytest.mark.default_host_only
def test_two_subjects_each_find_their_tokens_in_one_tagged_text(text_setup, caplog):
    """Two Apply nodes (car, dog) on one model and one MoMA Text Encode naming both: the same image as giving both
    Apply nodes the text; each logs where its own subject is."""
    tagged = image_of(graph(text_setup, moma_text(TWO_SUBJECTS, context=False), dog=True), caplog)
    messages = moma_messages(caplog)
    assert len(messages) == 2
    assert any("subject 'car'" in m and "(positions [4])" in m for m in messages)
    assert any("subject 'dog'" in m and "(positions [7])" in m for m in messages)
    told = image_of(graph(text_setup, clip_text(TWO_SUBJECTS), apply_prompt=TWO_SUBJECTS, dog=True))
    assert np.array_equal(tagged, told)


def test_untagged_text_of_another_length_is_warned_about_once(text_setup, caplog):
    """CLIPTextEncode of a text two chunks long while Apply looked the subject up in the one-chunk sd_prompt: one
    warning per sampling run (not per step), naming both lengths and what to do; the run still finishes."""
    image_of(graph(text_setup, clip_text(LONG_TEXT)), caplog)
    (message,) = moma_messages(caplog)
    assert "the positive conditioning has 154 tokens" in message and "has 77" in message
    assert "MoMA Text Encode" in message and "'prompt' input" in message


def test_text_encode_refuses_an_empty_text_without_context(text_setup):
    with pytest.raises(WorkflowError, match="'text' is empty and no context is connected"):
        run_api_workflow(graph(text_setup, moma_text("", context=False)))
