"""MOMA_CONTEXT: what the LLaVA context encoder hands to the sampler side, and its .safetensors file.

A context file holds three float32 tensors (``cond_tokens`` [1,4,768], ``uncond_tokens`` [1,4,768],
``llava_emb`` [1,1024]) and the metadata ``format`` = "moma-context", ``version``, ``subject``, ``prompt``,
``sd_prompt`` and (since this was added) ``adapter_sha256``, the fingerprint of the adapter that made the tokens. With it a user can skip LLaVA entirely next time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MomaError
from .sd15 import CROSS_ATTENTION_DIM, NUM_MOMA_TOKENS
from .weights import LLAVA_EMBED_DIM

CONTEXT_FORMAT = "moma-context"
CONTEXT_VERSION = "1"
TENSOR_SHAPES = {
    "cond_tokens": (1, NUM_MOMA_TOKENS, CROSS_ATTENTION_DIM),
    "uncond_tokens": (1, NUM_MOMA_TOKENS, CROSS_ATTENTION_DIM),
    "llava_emb": (1, LLAVA_EMBED_DIM),
}
TEXT_FIELDS = ("subject", "prompt", "sd_prompt")
ADAPTER_FIELD = "adapter_sha256"


@dataclass
class MomaContext:
    """The 4 context tokens for cond and uncond, the LLaVA embedding they came from, and the texts.

    ``prompt`` is the user's prompt as typed; ``sd_prompt`` is the text for the positive CLIPTextEncode
    ("photo of a {subject}. {prompt}"), whose subject words locate the subject mask.
    """

    cond_tokens: torch.Tensor  # [1, 4, 768] float32
    uncond_tokens: torch.Tensor  # [1, 4, 768] float32, projector(zeros)
    llava_emb: torch.Tensor  # [1, 1024] float32 (several views of the object: the mean of theirs)
    subject: str
    prompt: str
    sd_prompt: str
    adapter_sha256: str = ""  # adapter_fingerprint() of the adapter that made the tokens ("" in older files)


def save_context(context: MomaContext, path: str | Path) -> Path:
    """Write ``context`` as .safetensors (tensors + text metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: getattr(context, name).detach().float().contiguous().cpu() for name in TENSOR_SHAPES}
    metadata = {"format": CONTEXT_FORMAT, "version": CONTEXT_VERSION}
    metadata.update({name: getattr(context, name) for name in TEXT_FIELDS})
    if context.adapter_sha256:
        metadata[ADAPTER_FIELD] = context.adapter_sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_context(path: str | Path) -> MomaContext:
    """Read a context file written by ``save_context``; exact keys, shapes and metadata are required."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MomaError(f"MoMA context file not found: {path}. Save one with the 'Save MoMA Context' node.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors' own error types for bad headers / short files
        raise MomaError(f"Could not read {path} as safetensors ({type(error).__name__}: {error}); the file is "
                        f"truncated or not a MoMA context.") from None
    if metadata.get("format") != CONTEXT_FORMAT:
        raise MomaError(f"{path} is not a MoMA context file (metadata format {metadata.get('format')!r}, expected "
                        f"{CONTEXT_FORMAT!r}). Save one with the 'Save MoMA Context' node.")
    missing = [key for key in TENSOR_SHAPES if key not in tensors]
    unexpected = [key for key in tensors if key not in TENSOR_SHAPES]
    wrong = [f"{key} {tuple(tensors[key].shape)} (expected {shape})" for key, shape in TENSOR_SHAPES.items()
             if key in tensors and tuple(tensors[key].shape) != shape]
    wrong += [f"{key} has dtype {tensors[key].dtype} (expected float)" for key in TENSOR_SHAPES
              if key in tensors and not tensors[key].is_floating_point()]
    missing_text = [name for name in TEXT_FIELDS if name not in metadata]
    if missing or unexpected or wrong or missing_text:
        raise MomaError(f"{path} is not a valid MoMA context: missing tensors {missing}, unexpected tensors "
                        f"{unexpected}, wrong shapes {wrong}, missing metadata {missing_text}. Save it again.")
    return MomaContext(
        cond_tokens=tensors["cond_tokens"].float(),
        uncond_tokens=tensors["uncond_tokens"].float(),
        llava_emb=tensors["llava_emb"].float(),
        **{name: metadata[name] for name in TEXT_FIELDS},
        adapter_sha256=str(metadata.get(ADAPTER_FIELD, "")),
    )


def adapter_mismatch(context: MomaContext, fingerprint: str) -> str | None:
    """Why ``context`` may not fit the adapter with ``fingerprint`` (None when it fits or cannot be told)."""
    made_with = getattr(context, "adapter_sha256", "")
    if not made_with or not fingerprint or made_with == fingerprint:
        return None
    return (f"the context (subject {context.subject!r}) was encoded with another MoMA adapter (sha256 "
            f"{made_with[:12]}...) than the one in MoMA Loader ({fingerprint[:12]}...): its tokens were made by that "
            f"adapter's mapping and projector, so results will differ. Choose the same adapter file, or encode the "
            f"context again with this one.")
