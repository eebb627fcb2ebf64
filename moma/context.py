"""MOMA_CONTEXT: what the LLaVA context encoder hands to the sampler side, and its .safetensors file.

A context file holds three float32 tensors (``cond_tokens`` [1,4,768], ``uncond_tokens`` [1,4,768],
``llava_emb`` [1,1024]) and the metadata ``format`` = "moma-context", ``version``, ``subject``, ``prompt``,
``sd_prompt`` and (since this was added) ``adapter_sha256``, the fingerprint of the adapter that made the tokens. With it a user can skip LLaVA entirely next time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import safetensors_header
from .errors import MomaError
from .limits import PROMPT_CHARS, SUBJECT_CHARS, TEXT_CHARS, check_tensor, check_text, shown, tensor_problem
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
TEXT_LIMITS = {"subject": SUBJECT_CHARS, "prompt": PROMPT_CHARS, "sd_prompt": TEXT_CHARS}  # characters
ADAPTER_FIELD = "adapter_sha256"
CONTEXT_HEADER_BYTES = 1 << 20  # a context's header: three tensors and its texts (within their limits: < 250 KB)
CONTEXT_HINT = "Save one with 'Save MoMA Context' (it writes to output/), or put the file in input/."


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
    """Write ``context`` as .safetensors (tensors + text metadata); MomaError naming the file if it cannot."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: getattr(context, name).detach().float().contiguous().cpu() for name in TENSOR_SHAPES}
    metadata = {"format": CONTEXT_FORMAT, "version": CONTEXT_VERSION}
    metadata.update({name: getattr(context, name) for name in TEXT_FIELDS})
    if context.adapter_sha256:
        metadata[ADAPTER_FIELD] = context.adapter_sha256
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
    except Exception as error:  # OSError from mkdir; safetensors' own SafetensorError (e.g. file name too long)
        raise MomaError(
            f"Could not write the MoMA context file {path} ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); choose another "
            f"filename_prefix or free the output folder."
        ) from None
    return path


def check_context_texts(metadata: dict, path: str | Path) -> None:
    """A context's texts: each within its limit (``TEXT_LIMITS``) and a subject that is not empty."""
    for name, limit in TEXT_LIMITS.items():
        if name not in metadata:
            raise MomaError(f"{path} is not a valid MoMA context: its metadata has no {name}. Save it again.")
        try:
            check_text(name, metadata[name], limit)
        except MomaError as error:
            raise MomaError(f"{path}: the saved {error}") from None
    if not metadata["subject"].strip():
        raise MomaError(
            f"{path}: the saved subject is empty, so MoMA would find no subject to mask. Encode the "
            f"context again with the object's word as subject (e.g. 'car') and save it."
        )


def context_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a context file's header, read without any tensor (what the folder listing and validation
    check); MomaError for a file that is unreadable, not safetensors, or not a MoMA context."""
    path = Path(path)
    header = safetensors_header(path, CONTEXT_HINT, max_bytes=CONTEXT_HEADER_BYTES)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != CONTEXT_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise MomaError(
            f"{path} is not a MoMA context file (metadata format {shown(found)}, expected "
            f"{CONTEXT_FORMAT!r}). {CONTEXT_HINT}"
        )
    return metadata


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
        raise MomaError(
            f"Could not read {path} as safetensors ({type(error).__name__}: {error}); the file is "
            f"truncated or not a MoMA context."
        ) from None
    if metadata.get("format") != CONTEXT_FORMAT:
        raise MomaError(
            f"{path} is not a MoMA context file (metadata format {metadata.get('format')!r}, expected "
            f"{CONTEXT_FORMAT!r}). Save one with the 'Save MoMA Context' node."
        )
    missing = [key for key in TENSOR_SHAPES if key not in tensors]
    unexpected = [key for key in tensors if key not in TENSOR_SHAPES]
    wrong = [
        f"{key} {tuple(tensors[key].shape)} (expected {shape})"
        for key, shape in TENSOR_SHAPES.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    wrong += [
        f"{key} has dtype {tensors[key].dtype} (expected float)"
        for key in TENSOR_SHAPES
        if key in tensors and not tensors[key].is_floating_point()
    ]
    missing_text = [name for name in TEXT_FIELDS if name not in metadata]
    if missing or unexpected or wrong or missing_text:
        raise MomaError(
            f"{path} is not a valid MoMA context: missing tensors {missing}, unexpected tensors "
            f"{unexpected}, wrong shapes {wrong}, missing metadata {missing_text}. Save it again."
        )
    check_context_texts(metadata, path)
    for key in TENSOR_SHAPES:
        check_tensor(tensors[key], str(path), key, "Encode the context again and save it.")
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
    return (
        f"the context (subject {context.subject!r}) was encoded with another MoMA adapter (sha256 "
        f"{made_with[:12]}...) than the one in MoMA Loader ({fingerprint[:12]}...): its tokens were made by that "
        f"adapter's mapping and projector, so results will differ. Choose the same adapter file, or encode the "
        f"context again with this one."
    )


def token_bound(projector: dict[str, torch.Tensor]) -> float:
    """The largest magnitude a context token made by this adapter's projector can have.

    The projector ends in LayerNorm over the 768 channels: y = w * (x - mean) / sqrt(var + eps) + b. The
    normalised vector has zero mean and at most unit variance, so none of its 768 entries exceeds sqrt(767) in
    magnitude; hence |y_i| <= max|w| * sqrt(767) + max|b| for every token of every context this adapter encodes,
    whatever the picture and prompt (the unconditional tokens too). 1% is added for rounding in bf16/fp16.
    """
    weight, bias = projector["norm.weight"].float(), projector["norm.bias"].float()
    channels = weight.numel()
    return (float(weight.abs().max()) * math.sqrt(channels - 1) + float(bias.abs().max())) * 1.01


def check_context_tokens(context: MomaContext, projector: dict[str, torch.Tensor], node: str) -> None:
    """MomaError when the context's tokens are not finite or larger than ``token_bound`` of the adapter."""
    bound = token_bound(projector)
    for name in ("cond_tokens", "uncond_tokens"):
        problem = tensor_problem(getattr(context, name), bound)
        if problem is not None:
            raise MomaError(
                f"{node}: the context's {name} {problem} (this adapter's projector makes tokens of at "
                f"most {bound:.3g}), so the context was edited, corrupted or made by another model. "
                f"Encode it again with this MoMA adapter."
            )
