"""The fixture writers give real-format files: an SD1.5 checkpoint ComfyUI loads as SD15, and test pictures."""

from __future__ import annotations

import ast
import json
import math
import struct
from pathlib import Path

import comfy_exec
import numpy as np
import pytest
import torch
from comfyui_moma.moma.sd15 import CROSS_ATTENTION_DIM, LAYERS, NUM_HEADS
from fixtures import images, sd15
from PIL import Image
from safetensors import safe_open

LATENT_SIZE = 8  # 64x64 pixels


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _block(diffusion_model: torch.nn.Module, block: tuple[str, int]) -> torch.nn.Module:
    name, number = block
    if name == "middle":
        return diffusion_model.middle_block
    return {"input": diffusion_model.input_blocks, "output": diffusion_model.output_blocks}[name][number]


def _state_dict_from_file(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _fp16_unet_weights(model, path: Path) -> dict[str, torch.Tensor]:
    """The file's fp16 UNet tensors. When ComfyUI keeps them as they are (the CPU tests' --fp16-unet), its own
    copies are those very values: shared rather than read again (a second 1.7 GB UNet in the process)."""
    from_comfy = model.model.diffusion_model.state_dict()
    with safe_open(path, "pt") as f:
        file_keys = {k[len(sd15.UNET_PREFIX) :] for k in f.keys() if k.startswith(sd15.UNET_PREFIX)}
        same = set(from_comfy) == file_keys and all(t.dtype == torch.float16 for t in from_comfy.values())
        if same:  # spot-check that they are the file's values
            key = sorted(file_keys)[len(file_keys) // 2]
            same = torch.equal(f.get_tensor(sd15.UNET_PREFIX + key), from_comfy[key].cpu())
    return dict(from_comfy) if same else _state_dict_from_file(path, sd15.UNET_PREFIX)


# --- the checkpoint file itself (cheap: reads the header and a few tensors) ---


def test_checkpoint_has_the_sd15_single_file_layout(sd15_checkpoint: Path) -> None:
    header = _safetensors_header(sd15_checkpoint)
    metadata = header.pop("__metadata__")
    assert metadata == {"format": "pt"}
    assert set(header) == set(sd15.sd15_shapes()) | {sd15.POSITION_IDS_KEY}
    prefixes = (sd15.UNET_PREFIX, sd15.VAE_PREFIX, sd15.CLIP_PREFIX + "text_model.")
    assert all(key.startswith(prefixes) for key in header)
    assert {p: sum(k.startswith(p) for k in header) for p in prefixes} == {
        sd15.UNET_PREFIX: 686,
        sd15.VAE_PREFIX: 248,
        sd15.CLIP_PREFIX + "text_model.": 197,
    }
    assert not any("text_projection" in key for key in header)
    assert header.pop(sd15.POSITION_IDS_KEY)["dtype"] == "I64"
    assert {entry["dtype"] for entry in header.values()} == {"F16"}
    assert header[sd15.UNET_PREFIX + "input_blocks.1.1.proj_in.weight"]["shape"] == [320, 320, 1, 1]
    assert header[sd15.UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"]["shape"] == [320, 768]
    with safe_open(sd15_checkpoint, "pt") as f:
        torch.testing.assert_close(f.get_tensor(sd15.POSITION_IDS_KEY), torch.arange(77)[None])


def test_checkpoint_values_are_seeded_and_scaled(sd15_checkpoint: Path) -> None:
    shapes = sd15.sd15_shapes()
    conv = sd15.UNET_PREFIX + "input_blocks.4.0.in_layers.2.weight"  # [640, 320, 3, 3]
    norm_scale = sd15.VAE_PREFIX + "decoder.norm_out.weight"
    norm_bias = sd15.CLIP_PREFIX + "text_model.final_layer_norm.bias"
    with safe_open(sd15_checkpoint, "pt") as f:
        stored = {key: f.get_tensor(key) for key in (conv, norm_scale, norm_bias)}
    for key, tensor in stored.items():
        assert tensor.dtype == torch.float16 and tuple(tensor.shape) == shapes[key]
        np.testing.assert_array_equal(tensor.numpy().ravel(), sd15.random_weight(key, shapes[key]))
    assert (stored[norm_scale] == 1).all() and (stored[norm_bias] == 0).all()
    conv_weight = stored[conv].float()
    assert conv_weight.std().item() == pytest.approx(1 / math.sqrt(320 * 9), rel=0.01)
    assert abs(conv_weight.mean().item()) < 1e-4
    # another seed gives other values
    assert not np.array_equal(sd15.random_weight(conv, shapes[conv], seed=1), sd15.random_weight(conv, shapes[conv]))


# --- the checkpoint as ComfyUI loads it (the run's one load) ---


@pytest.fixture(scope="module")
def loaded_sd15(comfy_host, sd15_checkpoint: Path, checkpoint_load_log):
    """(MODEL, CLIP, VAE, what ComfyUI logged while it loaded the file) from CheckpointLoaderSimple (the run's
    one load of the fixture, tests/conftest.py)."""
    ckpt_name = comfy_exec.place_model("checkpoints", sd15_checkpoint, comfy_host.models_dir)
    model, clip, vae = comfy_exec.load_checkpoint(ckpt_name)
    yield model, clip, vae, checkpoint_load_log(sd15_checkpoint)


@pytest.mark.slow
def test_comfyui_detects_sd15_with_all_16_attention_blocks(loaded_sd15) -> None:
    from comfy.ldm.modules.attention import SpatialTransformer

    model = loaded_sd15[0]
    assert type(model.model.model_config).__name__ == "SD15"
    diffusion_model = model.model.diffusion_model
    assert sum(isinstance(m, SpatialTransformer) for m in diffusion_model.modules()) == len(LAYERS) == 16
    for layer in LAYERS:
        (transformer,) = [m for m in _block(diffusion_model, layer.block) if isinstance(m, SpatialTransformer)]
        (block,) = transformer.transformer_blocks
        assert transformer.in_channels == layer.channels
        assert block.attn1.to_q.in_features == block.attn1.to_k.in_features == layer.channels
        assert block.attn2.to_k.in_features == block.attn2.to_v.in_features == CROSS_ATTENTION_DIM
        assert block.attn2.heads == NUM_HEADS


@pytest.mark.slow
def test_comfyui_fills_every_weight_from_the_file(loaded_sd15) -> None:
    messages = loaded_sd15[3]
    problem_prefixes = ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys")
    problems = [m for m in messages if m.startswith(problem_prefixes)]
    assert problems == []
    # What ComfyUI also reports for real SD1.5 files: no projection in the file, position_ids not in its module.
    clip_missing = [k for m in messages if m.startswith("clip missing: ") for k in ast.literal_eval(m[14:])]
    assert all(key.endswith(("text_projection.weight", "logit_scale")) for key in clip_missing), clip_missing
    clip_unexpected = [k for m in messages if m.startswith("clip unexpected ") for k in ast.literal_eval(m[16:-1])]
    assert clip_unexpected == ["clip_l.transformer.text_model.embeddings.position_ids"]


@pytest.mark.slow
def test_fp32_models_give_finite_varied_outputs(loaded_sd15) -> None:
    import nodes

    model, clip, vae, _ = loaded_sd15
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of a sks dog")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    cond, uncond = positive[0][0], negative[0][0]
    assert cond.shape == (1, 77, CROSS_ATTENTION_DIM) and torch.isfinite(cond).all()
    assert (cond - uncond).std() > 0.1  # the text matters

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    with torch.no_grad():
        eps = model.model.diffusion_model(latent, torch.tensor([500.0]), context=cond)
    assert torch.isfinite(eps).all() and 0.05 < eps.std() < 20

    (pixels,) = nodes.VAEDecode().decode(vae, {"samples": 5 * latent})  # real SD latents have std ~5
    assert pixels.shape == (1, 64, 64, 3)
    assert pixels.std() > 0.1
    assert ((pixels == 0) | (pixels == 1)).float().mean() < 0.5
    assert torch.unique((pixels * 255).round()).numel() > 200


@pytest.mark.slow
def test_fp16_activations_stay_finite_and_match_fp32(loaded_sd15, sd15_checkpoint: Path) -> None:
    """The fp16 file weights run in fp16 (as on a GPU) without overflow, close to ComfyUI's fp32 run."""
    model, clip, vae, _ = loaded_sd15
    modules = sd15.sd15_modules("meta")
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    context = torch.randn(1, 77, CROSS_ATTENTION_DIM, generator=generator)
    timestep = torch.tensor([999.0])

    unet16 = modules[sd15.UNET_PREFIX]
    unet16.load_state_dict(_fp16_unet_weights(model, sd15_checkpoint), strict=True, assign=True)
    with torch.no_grad():
        eps16 = unet16(latent.half(), timestep.half(), context=context.half()).float()
        eps32 = model.model.diffusion_model(latent, timestep, context=context)
    del unet16, modules[sd15.UNET_PREFIX]
    assert torch.isfinite(eps16).all()
    torch.testing.assert_close(eps16, eps32, rtol=0, atol=0.02 * eps32.abs().max().item())

    vae16 = modules[sd15.VAE_PREFIX]
    vae16.load_state_dict(_state_dict_from_file(sd15_checkpoint, sd15.VAE_PREFIX), strict=True, assign=True)
    small_latent = 5 * latent[:, :, :2, :2]  # fp16 convolutions are slow on CPU; activations are local
    with torch.no_grad():
        decoded16 = vae16.decode(small_latent.half()).float()
        decoded32 = vae.first_stage_model.decode(small_latent)
    assert torch.isfinite(decoded16).all() and decoded16.std() > 0.1
    torch.testing.assert_close(decoded16, decoded32, rtol=0, atol=0.02 * decoded32.abs().max().item())

    clip16 = modules[sd15.CLIP_PREFIX]
    missing, unexpected = clip16.load_state_dict(
        _state_dict_from_file(sd15_checkpoint, sd15.CLIP_PREFIX), strict=False, assign=True
    )
    assert missing == [sd15.TEXT_PROJECTION_KEY] and unexpected == ["text_model.embeddings.position_ids"]
    tokens = torch.tensor([[token for token, _weight in clip.tokenize("a photo of a dog")["l"][0]]])
    with torch.no_grad():
        hidden16 = clip16.text_model(tokens, dtype=torch.float16)[0].float()
        hidden32 = clip.cond_stage_model.clip_l.transformer.text_model(tokens)[0]
    assert torch.isfinite(hidden16).all()
    torch.testing.assert_close(hidden16, hidden32, rtol=0, atol=0.02 * hidden32.abs().max().item())


# --- test pictures ---

EXPECTED_PICTURES = {
    "rgb": ("RGB", (512, 512)),
    "rgba": ("RGBA", (128, 128)),
    "grey": ("L", (96, 96)),
    "wide": ("RGB", (96, 64)),
}


def test_pictures_have_the_expected_modes_sizes_and_masks(test_images: dict[str, tuple[Path, Path]]) -> None:
    assert set(test_images) == set(EXPECTED_PICTURES)
    for name, (image_path, mask_path) in test_images.items():
        image, mask = Image.open(image_path), Image.open(mask_path)
        assert (image.mode, image.size) == EXPECTED_PICTURES[name], name
        assert (mask.mode, mask.size) == ("L", image.size), name
        subject = np.asarray(mask)
        assert set(np.unique(subject)) == {0, 255}, name
        assert 0.2 <= (subject > 0).mean() <= 0.4, name
        if image.mode == "RGBA":
            np.testing.assert_array_equal(np.asarray(image)[..., 3], subject)  # alpha is the cut-out
        luminance = np.asarray(image.convert("L"), dtype=np.float64)
        inside, outside = luminance[subject > 0], luminance[subject == 0]
        assert inside.mean() - outside.mean() > 20, name  # the object stands out, even in grey
        assert inside.std() > 5 and outside.std() > 5, name  # both are textured


def test_pictures_are_deterministic(test_images: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    images.write_test_images(tmp_path / "again")
    for name, paths in images.index(tmp_path / "again").items():
        for cached, fresh in zip(test_images[name], paths):
            np.testing.assert_array_equal(np.asarray(Image.open(cached)), np.asarray(Image.open(fresh)))
