"""What a workflow or a file may hand the pack, in one place: text lengths, finite numbers, tensor magnitudes.

Workflows come from strangers: every number may be NaN or infinite, every string megabytes long, every file
hostile. The checks here are linear in their input and raise a ``MomaError`` that names the input (or the file
and tensor), the value (shortened) and what to do. ``docs/limits.md`` lists every limit and where it is checked.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import MomaError

# Characters per text input (checked when the workflow is validated, again where the text is used).
SUBJECT_CHARS = 256  # the object's class word(s): Context Encoder and Feature Grab 'subject', a context's subject
PROMPT_CHARS = 8_192  # the LLaVA prompt (Context Encoder 'prompt'); LLaVA's own token limit still applies
TEXT_CHARS = 32_768  # CLIP prompt texts: MoMA Text Encode 'text', Apply's 'prompt', a context's sd_prompt
BLOCK_WEIGHTS_CHARS = 2_048  # Apply's 'block_weights' (16 'name = value' pairs take ~300)
NAME_CHARS = 4_096  # model names, context files, paths and save prefixes (the file system's own limits apply too)
CHOICE_CHARS = 256  # a list choice (precision, preset, rembg model, ...)

FLOAT16_MAX = 65_504.0  # the largest finite float16: weights and tokens may be computed in float16 on a GPU
SHOWN_CHARS = 200  # characters of a refused value quoted in a message (the rest is counted)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, shortened to about ``limit`` characters for long strings."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= 2 * limit else f"{text[: 2 * limit]}..."


def check_text(name: str, value: Any, limit: int) -> str:
    """``value`` if it is a string of at most ``limit`` characters that is valid Unicode; MomaError otherwise."""
    if not isinstance(value, str):
        raise MomaError(f"{name}: expected text, got {type(value).__name__} {shown(value)}.")
    if len(value) > limit:
        raise MomaError(f"{name}: {shown(value)} is longer than the {limit:,} characters this input takes; shorten it.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise MomaError(
            f"{name}: {shown(value)} is not valid Unicode (a lone surrogate at character {error.start}); retype it."
        ) from None
    return value


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is a finite number within ``low``..``high``; MomaError naming ``name`` otherwise.

    ComfyUI converts a FLOAT widget with ``float()`` and compares it with min and max, which NaN passes (and
    JSON's ``NaN`` / ``Infinity`` and the string ``"nan"`` are accepted on the way)."""
    allowed = None if low is None and high is None else f"{_bound(low, '-inf')}..{_bound(high, 'inf')}"
    advice = f"give a number in {allowed}" if allowed else "give a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MomaError(f"{name}: {shown(value)} is not a number; {advice}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise MomaError(f"{name}: {number} is not a finite number; {advice}.")
    if (low is not None and number < low) or (high is not None and number > high):
        raise MomaError(f"{name}: {number:g} is outside {allowed}.")
    return number


def _bound(value: float | None, missing: str) -> str:
    return missing if value is None else f"{value:g}"


def tensor_problem(tensor: torch.Tensor, bound: float = FLOAT16_MAX) -> str | None:
    """Why a floating tensor is not sane (NaN, infinite, or beyond ``bound`` in magnitude), or None.

    One pass over the data (``torch.aminmax``: no temporary of the tensor's size; NaN propagates); integer and
    empty tensors are not checked."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return None  # nothing to check (a meta tensor has no values)
    data = tensor.detach()
    if data.element_size() == 1:  # float8: no aminmax kernel; such tensors are small
        data = data.float()
    low, high = (float(value) for value in torch.aminmax(data))
    if math.isnan(low) or math.isnan(high):
        return "contains NaN"
    if math.isinf(low) or math.isinf(high):
        return "contains an infinite value"
    if max(-low, high) > bound:
        return f"reaches {max(-low, high):.3g}, beyond the plausible {bound:g}"
    return None


def check_tensor(tensor: torch.Tensor, where: str, key: str, advice: str, bound: float = FLOAT16_MAX) -> torch.Tensor:
    """``tensor`` if ``tensor_problem`` finds nothing; else MomaError naming ``where`` (the file) and ``key``."""
    problem = tensor_problem(tensor, bound)
    if problem is not None:
        raise MomaError(f"{where}: tensor {key!r} {problem}, so the file is corrupt or was edited. {advice}".rstrip())
    return tensor
