"""From LLaVA's last hidden state to MoMA's 4 context tokens (spec 2, "Forward" and "Projector").

- ``SwiGLUMapping`` (upstream ``LlamaMLP_mapping(4096, 1024)``): down_proj(silu(gate_proj(h)) * up_proj(h)),
  no biases; its unused tanh is left out. Output = ``llava_emb`` [B, 1024].
- ``ImageProjModel`` (IP-Adapter's): Linear(1024 -> 4*768, bias) -> reshape [B, 4, 768] -> LayerNorm(768).
  The cond tokens are projector(llava_emb); the uncond tokens are projector(zeros): bias -> LayerNorm, not zeros.
- ``mean_llava_embedding``: several pictures (views) of one object -> the mean of their ``llava_emb`` (the pack's
  extension; MoMA itself encodes one picture), which the projector turns into the cond tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MomaError
from .sd15 import CROSS_ATTENTION_DIM, NUM_MOMA_TOKENS
from .weights import LLAVA_EMBED_DIM, LLM_HIDDEN, MomaAdapterWeights


class SwiGLUMapping(nn.Module):
    """LLaVA hidden state [..., 4096] -> [..., 1024]: down_proj(silu(gate_proj(h)) * up_proj(h))."""

    def __init__(self, hidden_size: int = LLM_HIDDEN, out_size: int = LLAVA_EMBED_DIM) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, out_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, out_size, bias=False)
        self.down_proj = nn.Linear(out_size, out_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


class ImageProjModel(nn.Module):
    """llava_emb [B, 1024] -> [B, 4, 768] context tokens (Linear, reshape, LayerNorm eps 1e-5)."""

    def __init__(
        self, embed_dim: int = LLAVA_EMBED_DIM, token_dim: int = CROSS_ATTENTION_DIM, num_tokens: int = NUM_MOMA_TOKENS
    ) -> None:
        super().__init__()
        self.token_dim = token_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, llava_emb: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(llava_emb).reshape(-1, self.num_tokens, self.token_dim)  # [B, 4, 768]
        return self.norm(tokens)


def build_mapping(
    weights: MomaAdapterWeights, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> SwiGLUMapping:
    """The SwiGLU head with the adapter file's ``llm_mapping`` weights (strict load)."""
    with torch.device("meta"):
        mapping = SwiGLUMapping()
    state = {key: value.to(device=device, dtype=dtype) for key, value in weights.mapping.items()}
    mapping.load_state_dict(state, strict=True, assign=True)
    return mapping.requires_grad_(False).eval()


def build_projector(
    weights: MomaAdapterWeights, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> ImageProjModel:
    """The 4-token projector with the adapter file's ``projectors`` weights (strict load)."""
    with torch.device("meta"):
        projector = ImageProjModel()
    state = {key: value.to(device=device, dtype=dtype) for key, value in weights.projector.items()}
    projector.load_state_dict(state, strict=True, assign=True)
    return projector.requires_grad_(False).eval()


@torch.no_grad()
def context_tokens(projector: ImageProjModel, llava_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [B, 4, 768], uncond [B, 4, 768]) = (projector(llava_emb), projector(zeros_like(llava_emb)))."""
    return projector(llava_emb), projector(torch.zeros_like(llava_emb))


def mean_llava_embedding(embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean [1, 1024] (float32) of several views' ``llava_emb`` [1, 1024] (each view of one object
    encoded by LLaVA with the same subject and prompt). One embedding comes back unchanged (as float32)."""
    if not embeddings:
        raise MomaError("Internal: no llava_emb to average (a batch of 0 reference pictures).")
    shapes = {tuple(embedding.shape) for embedding in embeddings}
    if shapes != {(1, LLAVA_EMBED_DIM)}:
        raise MomaError(f"Internal: llava_emb shapes {sorted(shapes)}; expected (1, {LLAVA_EMBED_DIM}) each.")
    if len(embeddings) == 1:
        return embeddings[0].float()
    return torch.cat([embedding.float() for embedding in embeddings]).mean(dim=0, keepdim=True)
