"""Smoke test through the real ComfyUI host: the pack is registered, the SD1.5 fixture loads, KSampler
calls attention replace patches on all 16 SD1.5 blocks, and a plain API workflow runs through the executor."""

from __future__ import annotations

import asyncio
import collections
import sys
from pathlib import Path

import comfy_exec
import numpy as np
import pytest
import torch
from comfyui_moma.moma.sd15 import LAYERS, NUM_HEADS
from moma_runner import common

PACK = "comfyui_moma"  # the import alias of the loaded pack (tests/host.py)
FOLDER = common.PACK_LINK_NAME  # its folder under custom_nodes/, as a Manager or registry install names it
LATENT_SIZE = 8  # 64x64 pixels
STEPS = 2
BATCH = 2  # cond and uncond run as one batch on CPU
TEXT_TOKENS = 77
PUBLIC_NODES = {  # node id -> display name
    "MomaLoader": "MoMA Loader",
    "MomaContextEncoder": "LLaVA Context Encoder",
    "MomaSaveContext": "Save MoMA Context",
    "MomaLoadContext": "Load MoMA Context",
    "MomaObjectMasker": "MoMA Object Masker",
    "MomaFeatureGrab": "Self-Attention Feature Grab",
    "MomaApply": "Apply MoMA Attention",
    "MomaSubjectMaskPreview": "MoMA Subject Mask Preview",
    "MomaTextEncode": "MoMA Text Encode",
}


def test_comfyui_registered_the_pack_and_its_nodes(comfy_host) -> None:
    from comfy_api.latest import ComfyExtension

    import nodes

    pack = sys.modules[comfy_host.pack_module_name]
    assert sys.modules[PACK] is pack
    assert Path(nodes.LOADED_MODULE_DIRS[FOLDER]) == comfy_host.base_dir / "custom_nodes" / FOLDER
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")  # so ComfyUI took the V3 comfy_entrypoint path
    extension = asyncio.run(pack.comfy_entrypoint())
    assert isinstance(extension, ComfyExtension)
    # The oracle is the pack's public API written out here (node ids are what saved workflows refer to), not the
    # pack's own list: what ComfyUI registered from this folder must be exactly these nodes.
    registered = {
        node_id: cls
        for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items()
        if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == f"custom_nodes.{FOLDER}"
    }
    assert set(registered) == set(PUBLIC_NODES), sorted(registered)
    for node_id, display_name in PUBLIC_NODES.items():
        info = registered[node_id].GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == node_id and info["display_name"] == display_name
        assert info["category"] == "MoMA"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, display_name) == display_name
    assert {cls.GET_SCHEMA().node_id for cls in asyncio.run(extension.get_node_list())} == set(PUBLIC_NODES)


@pytest.fixture(scope="module")
def ckpt_name(comfy_host, sd15_checkpoint: Path) -> str:
    return comfy_exec.place_model("checkpoints", sd15_checkpoint, comfy_host.models_dir)


def plain_txt2img_workflow(ckpt_name: str, prefix: str) -> dict:
    """API-format graph: checkpoint -> two prompts -> 64x64 empty latent -> 2-step KSampler -> decode -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a sks dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 0,
                "steps": STEPS,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


# Runs before the module's loaded checkpoint exists, so the two model copies are never in memory together.
@pytest.mark.slow
def test_api_workflow_runs_through_the_executor(ckpt_name: str) -> None:
    import folder_paths
    from PIL import Image

    outputs = comfy_exec.run_api_workflow(plain_txt2img_workflow(ckpt_name, "moma_smoke"))
    (saved,) = outputs["7"]["images"]
    assert saved["type"] == "output" and saved["filename"].startswith("moma_smoke")
    path = Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"]
    with Image.open(path) as image:
        assert (image.mode, image.size) == ("RGB", (64, 64))
        pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100  # a varied picture, not a flat fill


def test_api_workflow_errors_name_the_node() -> None:
    graph = plain_txt2img_workflow("no_such_model.safetensors", "moma_smoke_bad")
    with pytest.raises(comfy_exec.WorkflowError) as failure:
        comfy_exec.run_api_workflow(graph)
    assert "1" in failure.value.node_errors


@pytest.fixture(scope="module")
def sd15_graph_inputs(ckpt_name: str):
    """(MODEL, positive, negative, latent) for a 64x64 KSampler run on the fixture checkpoint."""
    import nodes

    model, clip, _vae = comfy_exec.load_checkpoint(ckpt_name)
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of a sks dog")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    (latent,) = nodes.EmptyLatentImage().generate(8 * LATENT_SIZE, 8 * LATENT_SIZE, 1)
    yield model, positive, negative, latent


def expected_tokens(block: tuple[str, int], channels: int) -> int:
    """Image tokens a block attends over at this latent size: one 2x downsample per channel step, 3 at the middle."""
    downsamples = 3 if block[0] == "middle" else {320: 0, 640: 1, 1280: 2}[channels]
    return (LATENT_SIZE >> downsamples) ** 2


@pytest.mark.slow
def test_ksampler_calls_attention_patches_on_all_16_blocks(sd15_graph_inputs) -> None:
    from comfy.ldm.modules.attention import optimized_attention

    import nodes

    model, positive, negative, latent = sd15_graph_inputs
    calls: dict[tuple[str, tuple[str, int]], list] = collections.defaultdict(list)

    def recording_attention(kind: str):
        def attention(q, k, v, extra_options):
            seen = (q.shape, k.shape, v.shape, extra_options["n_heads"], sorted(extra_options["cond_or_uncond"]))
            calls[(kind, tuple(extra_options["block"]))].append(seen)
            return optimized_attention(q, k, v, extra_options["n_heads"])

        return attention

    patched = model.clone()
    for layer in LAYERS:
        patched.set_model_attn1_replace(recording_attention("attn1"), *layer.block)
        patched.set_model_attn2_replace(recording_attention("attn2"), *layer.block)

    (out,) = nodes.KSampler().sample(patched, 0, STEPS, 7.0, "euler", "normal", positive, negative, latent)
    assert torch.isfinite(out["samples"]).all()
    assert set(calls) == {(kind, layer.block) for kind in ("attn1", "attn2") for layer in LAYERS}
    for layer in LAYERS:
        image_tokens = (BATCH, expected_tokens(layer.block, layer.channels), layer.channels)
        text_tokens = (BATCH, TEXT_TOKENS, layer.channels)
        cond_and_uncond = [0, 1]  # one call per step carries both halves of classifier-free guidance
        attn1_call = (image_tokens, image_tokens, image_tokens, NUM_HEADS, cond_and_uncond)
        attn2_call = (image_tokens, text_tokens, text_tokens, NUM_HEADS, cond_and_uncond)
        assert calls[("attn1", layer.block)] == [attn1_call] * STEPS, layer.block
        assert calls[("attn2", layer.block)] == [attn2_call] * STEPS, layer.block
