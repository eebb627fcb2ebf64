"""Several views of one object in one context (``encode_context_views``): a batch of one is the single-picture
encode bit for bit; a batch of views equals the views encoded alone, their llava_emb averaged by hand and the
adapter file's projector weights applied by hand (F.linear + layer_norm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.model import MomaModel, encode_context, encode_context_views
from comfyui_moma.moma.projection import mean_llava_embedding
from PIL import Image

SUBJECT = "teddy bear"
PROMPT = "A teddy bear on the beach at sunset."


def _view(seed: int, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A 300x400 picture [H, W, 3] (smooth noise) and its object mask [H, W] (a rectangle), as 0..1 floats."""
    rng = np.random.default_rng(seed)
    rgb = np.asarray(
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).resize((300, 400), Image.BICUBIC)
    )
    mask = np.zeros((400, 300), np.float32)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1.0
    return torch.from_numpy(rgb / 255.0).float(), torch.from_numpy(mask)


VIEWS = [_view(11, (80, 330, 60, 250)), _view(12, (40, 380, 20, 200)), _view(13, (100, 300, 90, 290))]


@pytest.fixture(scope="module")
def fp32_model(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> MomaModel:
    return MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32")


@pytest.fixture(scope="module")
def fp32_encoder(fp32_model: MomaModel):
    return fp32_model.load_encoder("cpu")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_of_one_is_the_single_picture_encode_bitwise(
    adapter_file: Path, llava_dir: Path, clip_vision_dir: Path, precision: str
) -> None:
    """bf16 too: there the encoder's own (bf16) projector and an fp32 projection differ, so a batch of one that
    took the averaging path would fail here."""
    moma_model = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision=precision)
    encoder = moma_model.load_encoder("cpu")
    picture, mask = VIEWS[0]
    single = encode_context(encoder, moma_model, picture, mask, SUBJECT, PROMPT)
    batch = encode_context_views(encoder, moma_model, picture[None], mask[None], SUBJECT, PROMPT)
    for name in ("cond_tokens", "uncond_tokens", "llava_emb"):
        assert torch.equal(getattr(batch, name), getattr(single, name)), name
    for name in ("subject", "prompt", "sd_prompt", "adapter_sha256"):
        assert getattr(batch, name) == getattr(single, name), name


def _tokens_by_hand(adapter_file: Path, llava_emb: torch.Tensor) -> torch.Tensor:
    """IP-Adapter's projector from the adapter file's raw tensors: Linear -> [1, 4, 768] -> LayerNorm(eps 1e-5)."""
    projector = {
        key: value.float()
        for key, value in torch.load(adapter_file, map_location="cpu", weights_only=True)["projectors"].items()
    }
    tokens = F.linear(llava_emb, projector["proj.weight"], projector["proj.bias"]).reshape(1, 4, 768)
    return F.layer_norm(tokens, (768,), projector["norm.weight"], projector["norm.bias"], eps=1e-5)


@pytest.mark.parametrize("count", [2, 3])
def test_views_average_llava_emb_then_project(
    fp32_model: MomaModel, fp32_encoder, adapter_file: Path, count: int
) -> None:
    views = VIEWS[:count]
    alone = [encode_context(fp32_encoder, fp32_model, picture, mask, SUBJECT, PROMPT) for picture, mask in views]
    progress: list[tuple[int, int]] = []
    batch = encode_context_views(
        fp32_encoder,
        fp32_model,
        torch.stack([picture for picture, _ in views]),
        torch.stack([mask for _, mask in views]),
        SUBJECT,
        PROMPT,
        progress=lambda done, total: progress.append((done, total)),
    )

    mean = alone[0].llava_emb.clone()
    for context in alone[1:]:
        mean += context.llava_emb
    mean /= count
    # the views really differ, so the mean is none of them
    assert min(float((context.llava_emb - mean).abs().max()) for context in alone) > 1e-3 * float(mean.abs().max())
    torch.testing.assert_close(batch.llava_emb, mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.cond_tokens, _tokens_by_hand(adapter_file, mean), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        batch.uncond_tokens, _tokens_by_hand(adapter_file, torch.zeros(1, 1024)), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(batch.uncond_tokens, alone[0].uncond_tokens)  # uncond = projector(zeros), as for one view
    assert batch.llava_emb.shape == (1, 1024) and batch.cond_tokens.shape == batch.uncond_tokens.shape == (1, 4, 768)
    assert (batch.subject, batch.prompt, batch.sd_prompt) == (SUBJECT, PROMPT, f"photo of a {SUBJECT}. {PROMPT}")
    # one bar over all views: vision, 2 decoder layers, mapping+projector per view
    steps = 4 * count
    assert progress == [(done, steps) for done in range(1, steps + 1)]


def test_mean_llava_embedding() -> None:
    a, b = torch.tensor([[1.0, -2.0] + [0.0] * 1022]), torch.tensor([[3.0, 4.0] + [0.0] * 1022])
    assert torch.equal(mean_llava_embedding([a, b])[0, :2], torch.tensor([2.0, 1.0]))
    assert mean_llava_embedding([a.half()]).dtype == torch.float32
    with pytest.raises(MomaError, match="no llava_emb"):
        mean_llava_embedding([])
    with pytest.raises(MomaError, match="expected"):
        mean_llava_embedding([a, torch.zeros(2, 1024)])
