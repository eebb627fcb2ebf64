"""An independent re-derivation of MoMA's context encoder (spec 2) for the tests: token ids from plain
sentencepiece, pixels from PIL/numpy, the vision tower from transformers' own ``CLIPVisionModel.from_pretrained``,
and the projector, the Llama decoder (RoPE tables rounded to fp16 as the reference's transformers 4.37 stored
them), the mapping and the 4-token projector by hand from the raw checkpoint tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def expected_ids(llava_dir: Path, subject: str, prompt: str) -> list[int]:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llava_dir / "tokenizer.model"))
    first = [sp.piece_to_id(p) for p in sp.encode("USER: ", out_type=str)]
    second_text = f"\n A photo of a {subject}. Describe a new image of the same {subject} in: {prompt}. ASSISTANT: *"
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
    """Llama's rotary embedding on [heads, L, d] for positions 0..L-1 (half-split convention), with the cos/sin
    tables rounded to fp16 as the reference's transformers (4.37) stored them when loading in fp16."""
    length, dim = x.shape[1], x.shape[2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cos, sin = cos.half().float(), sin.half().float()
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
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
        q, k, v = (
            F.linear(x, sd[p + f"self_attn.{n}_proj.weight"]).view(length, heads, head_dim).transpose(0, 1)
            for n in "qkv"
        )
        q, k = _rotate(q), _rotate(k)
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal, dim=-1)
        h = h + F.linear((probs @ v).transpose(0, 1).reshape(length, width), sd[p + "self_attn.o_proj.weight"])
        x = _rms_norm(h, sd[p + "post_attention_layernorm.weight"])
        mlp = F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"])
        h = h + F.linear(mlp, sd[p + "mlp.down_proj.weight"])
    return _rms_norm(h, sd["model.norm.weight"])


def expected_context(
    llava_dir: Path,
    clip_vision_dir: Path,
    adapter_file: Path,
    rgb: np.ndarray,
    mask: np.ndarray,
    subject: str,
    prompt: str,
) -> dict[str, torch.Tensor]:
    """llava_emb [1, 1024], cond / uncond tokens [1, 4, 768] and the LLaVA input length, in fp32, for an 8-bit
    RGB picture [H, W, 3] and its 8-bit mask [H, W]."""
    import json

    from transformers import CLIPVisionModel

    config = json.loads((llava_dir / "config.json").read_text())
    ids = expected_ids(llava_dir, subject, prompt)
    # loaded as stored, then fp32 (exact from fp16): the same on transformers 4 (keyword torch_dtype, default fp32)
    # and 5 (keyword dtype, default the file's)
    vision = CLIPVisionModel.from_pretrained(str(clip_vision_dir)).float().eval()
    with torch.no_grad():
        hidden_states = vision(pixel_values=_expected_pixels(rgb, mask), output_hidden_states=True).hidden_states
        patches = hidden_states[-2][0, 1:]  # penultimate layer, CLS dropped: [576, 1024]
        sd = _checkpoint(llava_dir)
        picture = F.linear(
            F.gelu(F.linear(patches, sd["model.mm_projector.0.weight"], sd["model.mm_projector.0.bias"])),
            sd["model.mm_projector.2.weight"],
            sd["model.mm_projector.2.bias"],
        )
        cut = ids.index(-200)
        table = sd["model.embed_tokens.weight"]
        embeds = torch.cat([table[ids[:cut]], picture, table[ids[cut + 1 :]]])
        last = _llama_last_hidden(sd, embeds, config["num_hidden_layers"], config["num_attention_heads"])[-1]
        adapter = {
            k: {kk: vv.float() for kk, vv in v.items()}
            for k, v in torch.load(adapter_file, map_location="cpu", weights_only=True).items()
        }
        m = adapter["llm_mapping"]
        llava_emb = F.linear(
            F.silu(F.linear(last, m["mapping.gate_proj.weight"])) * F.linear(last, m["mapping.up_proj.weight"]),
            m["mapping.down_proj.weight"],
        )[None]
        p = adapter["projectors"]

        def tokens(x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, p["proj.weight"], p["proj.bias"]).reshape(1, 4, 768)
            y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
            return y * p["norm.weight"] + p["norm.bias"]

        return {
            "llava_emb": llava_emb,
            "cond": tokens(llava_emb),
            "uncond": tokens(torch.zeros(1, 1024)),
            "length": torch.tensor(embeds.shape[0]),
        }
