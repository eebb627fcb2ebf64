"""The CLIP ViT-L/14-336 vision tower (transformers ``CLIPVisionModel``) from a folder or one safetensors file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import (
    check_complete,
    iter_weights,
    parameters_on_meta,
    read_json,
    reference_cast,
    safetensors_header,
    set_parameter,
    weight_files,
)
from .errors import MomaError
from .limits import check_tensor
from .transformers_compat import vision_transformer_prefix

CLIP_WHERE_TO_GET = (
    "Download openai/clip-vit-large-patch14-336 from Hugging Face (config.json, model.safetensors, "
    "preprocessor_config.json) into a folder under ComfyUI/models/clip_vision/."
)

_VISION_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _vision_state(items: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The vision transformer's tensors, keyed relative to it: files name them ``vision_model.*`` (full CLIP, or
    CLIPVisionModel saved by transformers 4.x) or bare ``embeddings.*`` / ``encoder.*`` (saved by 5.x)."""
    prefixed: dict[str, torch.Tensor] = {}
    bare: dict[str, torch.Tensor] = {}
    for key, tensor in items:
        if key.startswith("vision_model."):
            prefixed[key[len("vision_model.") :]] = tensor
        elif key.startswith(_VISION_PARTS):
            bare[key] = tensor
    return prefixed or bare


def _clip_vision_config_from_keys(state: dict[str, torch.Tensor], path: Path):
    """A ``CLIPVisionConfig`` read off a single-file state dict (widths, depth, patch and picture size)."""
    from transformers import CLIPVisionConfig

    try:
        patch = state["embeddings.patch_embedding.weight"]  # [hidden, 3, p, p]
        positions = state["embeddings.position_embedding.weight"]  # [(size/p)^2 + 1, hidden]
        fc1 = state["encoder.layers.0.mlp.fc1.weight"]  # [intermediate, hidden]
    except KeyError as error:
        raise MomaError(
            f"{path} is not a transformers CLIPVisionModel state dict (no {error.args[0]!r}); MoMA needs the vision "
            f"tower of openai/clip-vit-large-patch14-336 (keys 'vision_model.*'). {CLIP_WHERE_TO_GET}"
        ) from None
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(round((positions.shape[0] - 1) ** 0.5))
    layers = {int(match.group(1)) for key in state if (match := re.match(r"encoder\.layers\.(\d+)\.", key))}
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=max(1, hidden // 64),
        patch_size=patch_size,
        image_size=grid * patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def check_clip_vision_path(path: str | Path) -> None:
    """Cheap check before anything loads: a folder with a readable config.json and all its weight files, or a
    ``.safetensors`` file with a readable header."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MomaError(f"{path} has no config.json; it is not a CLIP vision folder. {CLIP_WHERE_TO_GET}")
        read_json(path / "config.json")
        files = weight_files(path, CLIP_WHERE_TO_GET)
        check_complete(path, files, (), CLIP_WHERE_TO_GET)
    elif path.is_file() and path.suffix.lower() == ".safetensors":
        safetensors_header(path, CLIP_WHERE_TO_GET)
    else:
        raise MomaError(
            f"CLIP vision model not found (or not a folder / .safetensors file): {path}. {CLIP_WHERE_TO_GET}"
        )


def load_clip_vision(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """transformers ``CLIPVisionModel`` from a Hugging Face folder (full CLIP or vision-only) or one safetensors file.

    Text-tower and projection keys are ignored; every vision-transformer parameter must be present.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MomaError(f"{path} has no config.json; it is not a CLIP vision folder. {CLIP_WHERE_TO_GET}")
        try:
            config = CLIPVisionConfig.from_pretrained(str(path))
        except Exception as error:
            raise MomaError(
                f"Could not read {path / 'config.json'} as a CLIP config ({error}). {CLIP_WHERE_TO_GET}"
            ) from None
        files = weight_files(path, CLIP_WHERE_TO_GET)
        state = _vision_state(item for file in files for item in iter_weights(file))
    elif path.is_file() and path.suffix == ".safetensors":
        state = _vision_state(iter_weights(path))
        config = _clip_vision_config_from_keys(state, path)
    else:
        raise MomaError(
            f"CLIP vision model not found (or not a folder / .safetensors file): {path}. {CLIP_WHERE_TO_GET}"
        )
    config._attn_implementation = "eager"  # the reference's transformers (4.37) had no SDPA path for CLIP
    with parameters_on_meta():
        model = CLIPVisionModel(config)
    expected = dict(model.named_parameters())
    inner_prefix = vision_transformer_prefix(model)  # transformers 4 and 5 name them differently
    relative = {name: name[len(inner_prefix) :] for name in expected}
    problems = [
        f"vision_model.{relative[name]} {tuple(state[relative[name]].shape)} (expected {tuple(param.shape)})"
        for name, param in expected.items()
        if relative[name] in state and state[relative[name]].shape != param.shape
    ]
    missing = ["vision_model." + relative[name] for name in expected if relative[name] not in state]
    if problems or missing:
        raise MomaError(
            f"{path} does not match its CLIP vision config: missing {missing[:8]} ({len(missing)}), "
            f"wrong shapes {problems[:8]}. {CLIP_WHERE_TO_GET}"
        )
    for name in expected:  # each tensor checked as it lands (one pass: NaN, infinities, beyond fp16)
        tensor = reference_cast(state.pop(relative[name]), dtype).to(device)
        set_parameter(model, name, check_tensor(tensor, str(path), "vision_model." + relative[name], CLIP_WHERE_TO_GET))
    return model.to(device).requires_grad_(False).eval()  # .to: the position-id buffer was built on the CPU
