"""MOMA_CONTEXT as .safetensors: exact round trip, strict checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfyui_moma.moma.context import MomaContext, load_context, save_context
from comfyui_moma.moma.errors import MomaError
from safetensors.torch import save_file


def _context() -> MomaContext:
    g = torch.Generator().manual_seed(3)
    return MomaContext(
        cond_tokens=torch.randn(1, 4, 768, generator=g),
        uncond_tokens=torch.randn(1, 4, 768, generator=g),
        llava_emb=torch.randn(1, 1024, generator=g),
        subject="teddy bear",
        prompt="On the beach. ☀",
        sd_prompt="photo of a teddy bear. On the beach. ☀",
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    original = _context()
    loaded = load_context(save_context(original, tmp_path / "sub" / "ctx.safetensors"))
    for name in ("cond_tokens", "uncond_tokens", "llava_emb"):
        assert torch.equal(getattr(loaded, name), getattr(original, name))
    assert (loaded.subject, loaded.prompt, loaded.sd_prompt) == (original.subject, original.prompt, original.sd_prompt)


def test_strict_checks(tmp_path: Path) -> None:
    good = _context()
    metadata = {"format": "moma-context", "version": "1", "subject": "s", "prompt": "p", "sd_prompt": "q"}
    tensors = {"cond_tokens": good.cond_tokens, "uncond_tokens": good.uncond_tokens, "llava_emb": good.llava_emb}

    wrong_shape = dict(tensors, llava_emb=torch.zeros(1, 768))
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"), metadata=metadata)
    with pytest.raises(MomaError, match=r"wrong shapes \['llava_emb \(1, 768\) \(expected \(1, 1024\)\)'\]"):
        load_context(tmp_path / "shape.safetensors")

    extra = dict(tensors, extra=torch.zeros(1))
    del extra["uncond_tokens"]
    save_file(extra, str(tmp_path / "keys.safetensors"), metadata=metadata)
    with pytest.raises(MomaError, match=r"missing tensors \['uncond_tokens'\], unexpected tensors \['extra'\]"):
        load_context(tmp_path / "keys.safetensors")

    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MomaError, match="not a MoMA context file"):
        load_context(tmp_path / "other.safetensors")

    full = save_context(good, tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(full[: len(full) // 2])
    with pytest.raises(MomaError, match="truncated"):
        load_context(tmp_path / "short.safetensors")
    with pytest.raises(MomaError, match="not found"):
        load_context(tmp_path / "absent.safetensors")


def test_moma_model_remembers_contexts_by_input_content() -> None:
    from comfyui_moma.moma.model import CONTEXT_CACHE_SIZE, MomaModel

    model = MomaModel(adapter=None, adapter_path=Path("a"), llava_dir=Path("l"), clip_vision_path=Path("c"))
    image, mask = torch.rand(8, 8, 3), torch.ones(8, 8)
    key = model.context_key(image, mask, "car", "red")
    assert key == model.context_key(image.clone(), mask.clone(), "car", "red")
    assert (
        len(
            {
                key,
                model.context_key(image, mask, "car", "blue"),
                model.context_key(image, mask * 0, "car", "red"),
                model.context_key(image[:4], mask, "car", "red"),
                model.context_key(image, mask, "ca", "rred"),
            }
        )
        == 5
    )
    # several views: the key covers every picture and mask of the batch
    views, view_masks = torch.rand(3, 8, 8, 3), torch.ones(3, 8, 8)
    other_view, other_mask = views.clone(), view_masks.clone()
    other_view[2, 0, 0, 0] += 0.5
    other_mask[1, 3, 3] = 0.0
    batch_keys = {
        model.context_key(views, view_masks, "car", "red"),
        model.context_key(other_view, view_masks, "car", "red"),
        model.context_key(views, other_mask, "car", "red"),
        model.context_key(views[:2], view_masks[:2], "car", "red"),
    }
    assert len(batch_keys) == 4 and key not in batch_keys
    context = _context()
    model.remember_context(key, context)
    assert model.remembered_context(key) is context
    for index in range(CONTEXT_CACHE_SIZE):
        model.remember_context(str(index), context)
    assert model.remembered_context(key) is None  # least recently used goes first
