"""MoMA's two attention additions as pure functions (spec sections 3.3, 3.5, 4.2).

All tensors use ComfyUI's replace-patch layout: q/k/v are [B, N, heads * dim_head], already projected by
to_q/to_k/to_v, and results are returned before to_out. ``attention_fn`` is any function with ComfyUI's
``optimized_attention`` signature ``(q, k, v, heads, mask=None) -> [B, Nq, heads * dim_head]``; the
node layer passes ComfyUI's own (SDPA, xformers, ...), the default here is torch SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None, **_: object
) -> torch.Tensor:
    """Plain softmax attention through torch SDPA; ``mask`` is an additive bias broadcastable to [B, H, Nq, Nk]."""
    out = F.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), attn_mask=mask
    )
    return merge_heads(out)


def text_attention_with_subject_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    subject_columns: torch.Tensor | None,
    compute_output: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Text cross-attention plus the subject-token attention map the subject mask is built from.

    The softmax is over all text keys (in fp32); the map is the probability mass on ``subject_columns``,
    averaged over heads: ``mean_h sum_{j in S} P[b, h, n, j]`` -> [B, N]. One [B, H, N, L] probability
    tensor serves both the output and the map (L is the text length, 77 per prompt chunk, so it is small).
    Returns (output [B, N, C] in q's dtype or None when ``compute_output`` is False, map [B, N] or None).
    """
    if subject_columns is None and not compute_output:
        return None, None
    scale = 1.0 / math.sqrt(q.shape[-1] // heads)
    probs = torch.matmul(split_heads(q, heads).float(), split_heads(k, heads).float().transpose(-1, -2)).mul_(scale)
    probs = probs.softmax(dim=-1)  # [B, H, N, L]
    subject_map = None
    if subject_columns is not None:
        subject_map = probs.index_select(-1, subject_columns).sum(-1).mean(1)
    out = None
    if compute_output:
        out = merge_heads(torch.matmul(probs, split_heads(v, heads).float())).to(q.dtype)
    return out, subject_map


# --- head-layout forms for the per-step path -------------------------------------------------------
# On fast GPUs SD1.5 sampling is bound by kernel launches, so the node layer runs MoMA's terms through these:
# keys/values that are fixed for a run are split into heads once, and one fused SDPA kernel does each term.

SdpaFn = Callable[..., torch.Tensor]


def subject_indicator_values(
    text_length: int,
    columns: torch.Tensor,
    heads: int,
    dim_head: int,
    rows: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Values for :func:`subject_attention_mass`: 1 at the subject columns, 0 elsewhere, [rows, heads, L, D].

    All D channels of a head carry the same indicator, so fused kernels (which need the value head size to be
    the query's) can run it."""
    indicator = torch.zeros(text_length, device=device, dtype=dtype)
    indicator[columns.to(device)] = 1.0
    return indicator.view(1, 1, -1, 1).expand(rows, heads, -1, dim_head).contiguous()


def subject_attention_mass(
    q_heads: torch.Tensor, k_heads: torch.Tensor, indicator: torch.Tensor, sdpa: SdpaFn = F.scaled_dot_product_attention
) -> torch.Tensor:
    """``mean_h sum_{j in S} softmax(q k^T / sqrt(d))[b, h, n, j]`` -> [B, N], without forming the probabilities.

    Attention over the text keys with values that are 1 at the subject columns and 0 elsewhere returns each
    head's probability mass on those columns; its mean over heads and channels is the subject map.
    q_heads [B, H, N, D], k_heads [B, H, L, D], indicator [B, H, L, D] from :func:`subject_indicator_values`.
    """
    return sdpa(q_heads, k_heads, indicator).mean(dim=(1, 3))


def merge_head_output(out: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """SDPA output [B', H, N', D] -> [batch, tokens, H*D] (a view for the fused kernels' output layout)."""
    return out.transpose(1, 2).reshape(batch, tokens, -1)


def reference_attention_heads(
    q: torch.Tensor, ref_k_heads: torch.Tensor, ref_v_heads: torch.Tensor, sdpa: SdpaFn = F.scaled_dot_product_attention
) -> torch.Tensor:
    """:func:`reference_attention` with the bank already split into heads, [1, H, M, D].

    The bank is the same for every row, so the rows are folded into the query axis ([1, H, B*N, D]): each
    query's softmax is its own, the result is the same, and the bank is never expanded per row. Returns [B, N, C].
    """
    b, n, c = q.shape
    heads, dim_head = ref_k_heads.shape[1], ref_k_heads.shape[-1]
    out = sdpa(q.reshape(1, b * n, heads, dim_head).transpose(1, 2), ref_k_heads, ref_v_heads)
    return merge_head_output(out, b, n)


def decoupled_token_attention(
    q: torch.Tensor,
    token_k: torch.Tensor,
    token_v: torch.Tensor,
    heads: int,
    attention_fn: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """IP-Adapter style attention of every query over a few extra tokens (MoMA's 4 context tokens).

    token_k/token_v: [B, T, C], already through to_k_ip/to_v_ip. Returns [B, N, C].
    """
    return attention_fn(q, token_k, token_v, heads)


def reference_attention(
    q: torch.Tensor,
    ref_k: torch.Tensor,
    ref_v: torch.Tensor,
    heads: int,
    attention_fn: AttentionFn = sdpa_attention,
) -> torch.Tensor:
    """MoMA's object shortcut: a separate softmax of the generated queries over the reference bank.

    ref_k/ref_v: [M, C] or [B, M, C]; the bank holds only the object's keys (the reference blocks the
    background with a -65504 bias, whose softmax weight is exactly zero, so leaving those keys out is the
    same maths without a mask tensor). Returns [B, N, C].
    """
    b = q.shape[0]
    if ref_k.dim() == 2:
        ref_k = ref_k.unsqueeze(0).expand(b, -1, -1)
        ref_v = ref_v.unsqueeze(0).expand(b, -1, -1)
    return attention_fn(q, ref_k, ref_v, heads)


def add_object_shortcut(
    self_out: torch.Tensor,
    ref_out: torch.Tensor,
    gain: float,
    spatial_mask: torch.Tensor | None,
) -> torch.Tensor:
    """h + strength * scale_learnable * mask * h_ref (added before to_out). spatial_mask: [B, N, 1] or None."""
    if spatial_mask is None:
        return torch.add(self_out, ref_out, alpha=gain)
    return torch.addcmul(self_out, ref_out, spatial_mask, value=gain)  # one pass, no [B, N, C] temporaries
