"""The context encoder end to end on the fixture files, against the independent re-derivation of spec 2 in
tests/llava_reference.py (sentencepiece ids, PIL/numpy pixels, transformers' CLIPVisionModel, the Llama decoder,
mapping and projector by hand from the raw checkpoint tensors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from comfyui_moma.moma.checkpoint import reference_cast
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.model import MomaModel, encode_context
from llava_reference import expected_context, expected_ids
from PIL import Image

SUBJECT = "teddy bear"
PROMPT = "A teddy bear on the beach at sunset."


def _reference_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    rgb = np.asarray(
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).resize((300, 400), Image.BICUBIC)
    )
    mask = np.zeros((400, 300), np.uint8)
    mask[80:330, 60:250] = 255
    return rgb, mask


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def moma_model(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> MomaModel:
    return MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32")


@pytest.fixture(scope="module")
def encoder_fp32(moma_model: MomaModel):
    calls: list[tuple[int, int]] = []
    encoder = moma_model.load_encoder("cpu", progress=lambda done, total: calls.append((done, total)))
    encoder.load_progress = calls
    return encoder


@pytest.fixture(scope="module")
def fp32_context(moma_model: MomaModel, encoder_fp32):
    rgb, mask = _reference_inputs()
    progress: list[tuple[int, int]] = []
    context = encode_context(
        encoder_fp32,
        moma_model,
        torch.from_numpy(rgb / 255.0).float(),
        torch.from_numpy(mask / 255.0).float(),
        SUBJECT,
        PROMPT,
        progress=lambda done, total: progress.append((done, total)),
    )
    return context, progress


@pytest.fixture(scope="module")
def fp32_expected(llava_dir: Path, clip_vision_dir: Path, adapter_file: Path) -> dict:
    """The re-derivation's context; asked for before the encoder, so its own copy of the weights is gone before
    the encoder's is loaded."""
    rgb, mask = _reference_inputs()
    return expected_context(llava_dir, clip_vision_dir, adapter_file, rgb, mask, SUBJECT, PROMPT)


def test_fp32_context_equals_the_re_derivation(fp32_expected, fp32_context, encoder_fp32, llava_dir: Path) -> None:
    context, progress = fp32_context
    expected = fp32_expected
    assert int(expected["length"]) == 576 + len(expected_ids(llava_dir, SUBJECT, PROMPT)) - 1
    assert context.llava_emb.shape == (1, 1024) and context.cond_tokens.shape == context.uncond_tokens.shape == (
        1,
        4,
        768,
    )
    # tight enough to see the fp32 (unrounded) RoPE tables, which put llava_emb ~8e-5 (relative) off
    err = float((context.llava_emb - expected["llava_emb"]).abs().max() / expected["llava_emb"].abs().max())
    print(f"llava_emb max relative error vs re-derivation: {err:.2e}")
    assert err < 1e-5, err
    torch.testing.assert_close(context.cond_tokens, expected["cond"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(context.uncond_tokens, expected["uncond"], rtol=1e-5, atol=1e-5)
    assert context.subject == SUBJECT and context.prompt == PROMPT
    assert context.sd_prompt == f"photo of a {SUBJECT}. {PROMPT}"
    # progress: vision, each of the 2 decoder layers, mapping+projector; loading: 2 shards + the vision tower
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert encoder_fp32.load_progress == [(1, 3), (2, 3), (3, 3)]


def test_interrupt_between_layers_stops_and_leaves_no_hooks(moma_model: MomaModel, encoder_fp32) -> None:
    rgb, mask = _reference_inputs()
    checks = []

    class Interrupted(Exception):
        pass

    def interrupt() -> None:
        checks.append(len(checks))
        if len(checks) == 2:  # 1: before the vision tower, 2: before decoder layer 0 (a layer hook)
            raise Interrupted

    with pytest.raises(Interrupted):
        encode_context(
            encoder_fp32,
            moma_model,
            torch.from_numpy(rgb / 255.0).float(),
            torch.from_numpy(mask / 255.0).float(),
            SUBJECT,
            PROMPT,
            interrupt=interrupt,
        )
    assert len(checks) == 2
    for layer in encoder_fp32.language_model.layers:
        assert not layer._forward_pre_hooks and not layer._forward_hooks


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_follows_the_re_derivation(
    fp32_expected, adapter_file: Path, llava_dir: Path, clip_vision_dir: Path, precision: str, dtype: torch.dtype
) -> None:
    """bf16/fp16 against the independent fp32 re-derivation (not against the pack's own fp32 path), within what
    8 (bf16) or 11 (fp16) mantissa bits allow."""
    rgb, mask = _reference_inputs()
    picture, object_mask = torch.from_numpy(rgb / 255.0).float(), torch.from_numpy(mask / 255.0).float()
    expected = fp32_expected
    reduced_model = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision=precision)
    encoder = reduced_model.load_encoder("cpu")
    assert encoder.language_model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert next(encoder.vision_tower.parameters()).dtype == dtype
    reduced = encode_context(encoder, reduced_model, picture, object_mask, SUBJECT, PROMPT)
    del encoder
    assert reduced.llava_emb.dtype == torch.float32
    err = float((reduced.llava_emb - expected["llava_emb"]).abs().max() / expected["llava_emb"].abs().max())
    print(f"{precision}: llava_emb max relative error vs the fp32 re-derivation {err:.2e}")
    assert 0 < err < (0.05 if dtype == torch.bfloat16 else 0.01), err
    assert F.cosine_similarity(reduced.llava_emb, expected["llava_emb"]).item() > 0.995
    tokens_err = float((reduced.cond_tokens - expected["cond"]).abs().max() / expected["cond"].abs().max())
    assert tokens_err < (0.05 if dtype == torch.bfloat16 else 0.01), tokens_err


def test_reference_cast_goes_through_fp16_for_bf16() -> None:
    # 1 + 2^-8 + 2^-12 rounds to 1 + 2^-8 in fp16 (11 bits), then that halfway value rounds to even (1.0) in bf16,
    # while a direct fp32 -> bf16 cast rounds up to 1 + 2^-7: the reference's double rounding is kept.
    value = torch.tensor([1 + 2**-8 + 2**-12], dtype=torch.float32)
    assert value.to(torch.bfloat16).item() == 1 + 2**-7
    assert reference_cast(value, torch.bfloat16).item() == 1.0
    assert reference_cast(value, torch.float32).item() == value.item()
    assert reference_cast(value.half(), torch.bfloat16).item() == value.half().to(torch.bfloat16).item()


def test_quantization_without_cuda_is_a_clear_error(moma_model: MomaModel) -> None:
    from comfyui_moma.moma.llava import load_context_encoder

    with pytest.raises(MomaError, match="needs a CUDA GPU"):
        load_context_encoder(
            moma_model.llava_dir, moma_model.clip_vision_path, moma_model.adapter, quantization="4bit", device="cpu"
        )


def _reference_437_rope_tables(head_dim: int, length: int, max_positions: int, theta: float = 10000.0):
    """transformers 4.37's LlamaRotaryEmbedding as the reference loaded it (from_pretrained(torch_dtype=float16)):
    fp32 inv_freq, fp32 table over max_position_embeddings, stored in the default dtype fp16."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(max_positions, dtype=inv_freq.dtype)
    emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
    return emb.cos().to(torch.float16)[:length], emb.sin().to(torch.float16)[:length]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_tables_are_the_references_fp16_rounded_ones(encoder_fp32, llava_dir: Path, dtype: torch.dtype) -> None:
    import json

    config = json.loads((llava_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    length = 700
    cos_ref, sin_ref = _reference_437_rope_tables(head_dim, length, config["max_position_embeddings"])
    x = torch.zeros(1, length, config["hidden_size"], dtype=dtype)
    cos, sin = encoder_fp32.language_model.rotary_emb(x, torch.arange(length)[None])
    assert cos.dtype == sin.dtype == dtype
    # the reference's model.to(dtype) cast its fp16 tables to dtype
    assert torch.equal(cos[0], cos_ref.to(dtype)) and torch.equal(sin[0], sin_ref.to(dtype))
    if dtype == torch.float32:  # the fp32 tables current transformers builds differ: the test can tell them apart
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        exact = torch.cat([torch.arange(length).float()[:, None] * inv_freq] * 2, -1).cos()
        assert not torch.equal(cos[0], exact)
