"""The context encoder end to end on the fixture files, against a re-derivation of spec 2 written here:
token ids from plain sentencepiece, pixels from PIL/numpy, the vision tower from transformers' own
``CLIPVisionModel.from_pretrained``, and the projector, the Llama decoder, the mapping and the 4-token projector
by hand from the raw checkpoint tensors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image

from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.checkpoint import reference_cast
from comfyui_moma.moma.model import MomaModel, encode_context

SUBJECT = "teddy bear"
PROMPT = "A teddy bear on the beach at sunset."
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _reference_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).resize((300, 400), Image.BICUBIC))
    mask = np.zeros((400, 300), np.uint8)
    mask[80:330, 60:250] = 255
    return rgb, mask


# ----------------------------------------------------------------------------------- re-derivation


def _expected_ids(llava_dir: Path) -> list[int]:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llava_dir / "tokenizer.model"))
    first = [sp.piece_to_id(p) for p in sp.encode("USER: ", out_type=str)]
    second_text = f"\n A photo of a {SUBJECT}. Describe a new image of the same {SUBJECT} in: {PROMPT}. ASSISTANT: *"
    second = [sp.piece_to_id(p) for p in sp.encode(second_text, out_type=str)]
    return [sp.bos_id()] + first + [-200] + second


def _expected_pixels(rgb: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    picture = np.asarray(Image.fromarray(rgb).resize((512, 512), Image.BILINEAR))
    foreground = np.asarray(Image.fromarray(mask).resize((512, 512), Image.BILINEAR)) > 0
    white = np.where(foreground[..., None], picture, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(white).resize((336, 336), Image.BICUBIC))
    scaled = (small.astype(np.float64) / 255).astype(np.float32)
    return torch.from_numpy(((scaled - MEAN) / STD).transpose(2, 0, 1)[None].copy())


def _checkpoint(llava_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(llava_dir.glob("pytorch_model-*.bin")):
        state.update({k: v.float() for k, v in torch.load(shard, map_location="cpu", weights_only=True).items()})
    return state


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Llama's rotary embedding on [heads, L, d] for positions 0..L-1 (half-split convention)."""
    length, dim = x.shape[1], x.shape[2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
    return x * cos + rotated * sin


def _llama_last_hidden(sd: dict[str, torch.Tensor], embeds: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """Bare LlamaModel by hand: causal self-attention + SwiGLU per layer, final RMSNorm. embeds [L, 4096]."""
    h = embeds
    length, width = h.shape
    head_dim = width // heads
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(layers):
        p = f"model.layers.{i}."
        x = _rms_norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (F.linear(x, sd[p + f"self_attn.{n}_proj.weight"]).view(length, heads, head_dim).transpose(0, 1)
                   for n in "qkv")
        q, k = _rotate(q), _rotate(k)
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal, dim=-1)
        h = h + F.linear((probs @ v).transpose(0, 1).reshape(length, width), sd[p + "self_attn.o_proj.weight"])
        x = _rms_norm(h, sd[p + "post_attention_layernorm.weight"])
        mlp = F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"])
        h = h + F.linear(mlp, sd[p + "mlp.down_proj.weight"])
    return _rms_norm(h, sd["model.norm.weight"])


def _expected_context(llava_dir: Path, clip_vision_dir: Path, adapter_file: Path, rgb: np.ndarray,
                      mask: np.ndarray) -> dict[str, torch.Tensor]:
    import json

    from transformers import CLIPVisionModel

    config = json.loads((llava_dir / "config.json").read_text())
    ids = _expected_ids(llava_dir)
    vision = CLIPVisionModel.from_pretrained(str(clip_vision_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden_states = vision(pixel_values=_expected_pixels(rgb, mask), output_hidden_states=True).hidden_states
        patches = hidden_states[-2][0, 1:]  # penultimate layer, CLS dropped: [576, 1024]
        sd = _checkpoint(llava_dir)
        picture = F.linear(F.gelu(F.linear(patches, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
                           sd["model.mm_projector.2.weight"], sd["model.mm_projector.2.bias"])
        cut = ids.index(-200)
        table = sd["model.embed_tokens.weight"]
        embeds = torch.cat([table[ids[:cut]], picture, table[ids[cut + 1:]]])
        last = _llama_last_hidden(sd, embeds, config["num_hidden_layers"], config["num_attention_heads"])[-1]
        adapter = {k: {kk: vv.float() for kk, vv in v.items()}
                   for k, v in torch.load(adapter_file, map_location="cpu", weights_only=True).items()}
        m = adapter["llm_mapping"]
        llava_emb = F.linear(F.silu(F.linear(last, m["mapping.gate_proj.weight"])) * F.linear(last, m["mapping.up_proj.weight"]),
                             m["mapping.down_proj.weight"])[None]
        p = adapter["projectors"]

        def tokens(x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, p["proj.weight"], p["proj.bias"]).reshape(1, 4, 768)
            y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
            return y * p["norm.weight"] + p["norm.bias"]

        return {"llava_emb": llava_emb, "cond": tokens(llava_emb), "uncond": tokens(torch.zeros(1, 1024)),
                "length": torch.tensor(embeds.shape[0])}


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
    context = encode_context(encoder_fp32, moma_model, torch.from_numpy(rgb / 255.0).float(),
                             torch.from_numpy(mask / 255.0).float(), SUBJECT, PROMPT,
                             progress=lambda done, total: progress.append((done, total)))
    return context, progress


def test_fp32_context_equals_the_re_derivation(fp32_context, encoder_fp32, llava_dir: Path, clip_vision_dir: Path,
                                               adapter_file: Path) -> None:
    rgb, mask = _reference_inputs()
    context, progress = fp32_context
    expected = _expected_context(llava_dir, clip_vision_dir, adapter_file, rgb, mask)
    assert int(expected["length"]) == 576 + len(_expected_ids(llava_dir)) - 1
    assert context.llava_emb.shape == (1, 1024) and context.cond_tokens.shape == context.uncond_tokens.shape == (1, 4, 768)
    torch.testing.assert_close(context.llava_emb, expected["llava_emb"], rtol=1e-4, atol=1e-4)
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
        encode_context(encoder_fp32, moma_model, torch.from_numpy(rgb / 255.0).float(),
                       torch.from_numpy(mask / 255.0).float(), SUBJECT, PROMPT, interrupt=interrupt)
    assert len(checks) == 2
    for layer in encoder_fp32.language_model.layers:
        assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_bf16_follows_fp32_closely(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path, fp32_context) -> None:
    rgb, mask = _reference_inputs()
    picture, object_mask = torch.from_numpy(rgb / 255.0).float(), torch.from_numpy(mask / 255.0).float()
    exact = fp32_context[0]
    bf16_model = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="bf16")
    encoder = bf16_model.load_encoder("cpu")
    assert encoder.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert next(encoder.vision_tower.parameters()).dtype == torch.bfloat16
    reduced = encode_context(encoder, bf16_model, picture, object_mask, SUBJECT, PROMPT)
    del encoder
    assert reduced.llava_emb.dtype == torch.float32
    cosine = F.cosine_similarity(reduced.llava_emb, exact.llava_emb).item()
    assert cosine > 0.99, cosine
    assert F.cosine_similarity(reduced.cond_tokens.flatten(), exact.cond_tokens.flatten(), dim=0) > 0.99


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
        load_context_encoder(moma_model.llava_dir, moma_model.clip_vision_path, moma_model.adapter,
                             quantization="4bit", device="cpu")
