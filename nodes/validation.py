"""The checks every MoMA node's ``validate_inputs`` runs, from one place (limits in ``moma/limits.py``).

ComfyUI converts FLOAT widgets with ``float()`` and compares them with min and max: NaN passes (JSON ``NaN``,
the string ``"nan"``), and for an input a node's ``validate_inputs`` takes it checks nothing at all. It checks no
length of any text, and ComfyUI 0.3.x checks no V3 combo value. So each node's ``validate_inputs`` takes its
FLOAT, STRING and choice inputs and ``input_problems`` checks them: every FLOAT finite and within the schema's
min..max, every text within its limit (``TEXT_LIMITS``), before any node-specific check reads a file.

How a problem reaches the user (``verdict``): ComfyUI shows a text returned by ``validate_inputs`` under *every*
input the method takes (a missing adapter appeared five times on MoMA Loader). A node whose method takes one
input returns the text (shown once, under that input); a node whose method takes several raises the
``MomaError`` instead, which ComfyUI reports once, on the node ("failed to validate"). Either way the text starts
with the input it concerns. Linked inputs reach ``validate_inputs`` as None (their value is not known yet) and
inputs missing from the workflow not at all: both are checked where the value is used.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..moma.errors import MomaError
from ..moma.limits import (
    BLOCK_WEIGHTS_CHARS,
    CHOICE_CHARS,
    NAME_CHARS,
    PROMPT_CHARS,
    SUBJECT_CHARS,
    TEXT_CHARS,
    check_number,
    check_text,
    shown,
)
from ..moma.sd15 import parse_block_weights

log = logging.getLogger(__name__)

# node id -> STRING and combo input -> the most characters it takes (every one the nodes have; tests check that)
TEXT_LIMITS: dict[str, dict[str, int]] = {
    "MomaLoader": {
        "adapter_name": NAME_CHARS,
        "llava_name": NAME_CHARS,
        "clip_vision_name": NAME_CHARS,
        "precision": CHOICE_CHARS,
        "quantization": CHOICE_CHARS,
        "llava_placement": CHOICE_CHARS,
    },
    "MomaContextEncoder": {"subject": SUBJECT_CHARS, "prompt": PROMPT_CHARS},
    "MomaSaveContext": {"filename_prefix": NAME_CHARS},
    "MomaLoadContext": {"context_file": NAME_CHARS, "path": NAME_CHARS},
    "MomaObjectMasker": {"rembg_model": CHOICE_CHARS},
    "MomaFeatureGrab": {"subject": SUBJECT_CHARS},
    "MomaTextEncode": {"text": TEXT_CHARS},
    "MomaApply": {"preset": CHOICE_CHARS, "block_weights": BLOCK_WEIGHTS_CHARS, "prompt": TEXT_CHARS},
    "MomaSubjectMaskPreview": {},
}


@functools.cache
def float_ranges(node_cls: type) -> dict[str, tuple[float | None, float | None]]:
    """FLOAT input -> (min, max) of a node, read from its schema (so the ranges live in one place)."""
    from .node_api import io

    return {
        item.id: (item.min, item.max) for item in node_cls.define_schema().inputs if isinstance(item, io.Float.Input)
    }


@functools.cache
def _names(node_cls: type) -> tuple[str, str]:
    """(node id, display name) of a node class."""
    schema = node_cls.define_schema()
    return schema.node_id, schema.display_name


def input_problems(node_cls: type, values: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``values`` (input -> value) of a node: a FLOAT not finite or out of its range, a text
    over its limit or not valid Unicode. None (a linked input) is skipped."""
    floats = float_ranges(node_cls)
    texts = TEXT_LIMITS[_names(node_cls)[0]]
    problems = []
    for name, value in values.items():
        if value is None:
            continue
        try:
            if name in floats:
                check_number(name, value, *floats[name])
            elif name in texts:
                check_text(name, value, texts[name])
        except MomaError as error:
            problems.append(str(error))
    return problems


def checked_inputs(node_cls: type, values: Mapping[str, Any]) -> None:
    """``input_problems`` where the values are used (a linked input's value, only known then): raises the first,
    prefixed with the node's name."""
    problems = input_problems(node_cls, values)
    if problems:
        raise MomaError(f"{_names(node_cls)[1]}: {problems[0]}")


def choice_problem(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str | None:
    """The problem of a combo value that is not among ``choices`` (ComfyUI 0.3.x does not check V3 combos)."""
    if value is None or value in choices:
        return None
    return f"{name}: {shown(value)} is not one of {', '.join(choices)}."


def verdict(problems: list[str], values: Mapping[str, Any]) -> bool | str:
    """What a node's ``validate_inputs`` answers: True, or the problems reported once (see the module's notes):
    returned when the method takes one input (``values``), raised as a MomaError when it takes several."""
    if not problems:
        return True
    message = " | ".join(problems)
    if len(values) <= 1:
        return message
    raise MomaError(message)


# ------------------------------------------------------------------------------------ Apply MoMA Attention


WINDOWS = (
    ("start_percent", "end_percent"),
    ("object_start_percent", "object_end_percent"),
    ("context_start_percent", "context_end_percent"),
)


def apply_problems(node_cls: type, values: Mapping[str, Any]) -> list[str]:
    """Apply's inputs: the generic checks, then each start before its end and block_weights parsed."""
    problems = input_problems(node_cls, values)
    bad = {problem.split(":", 1)[0] for problem in problems}
    for start, end in WINDOWS:
        low, high = values.get(start), values.get(end)
        if start in bad or end in bad or low is None or high is None:
            continue
        if float(low) > float(high):
            problems.append(f"{start}/{end}: the start ({float(low):g}) is after the end ({float(high):g}).")
    weights = values.get("block_weights")
    if isinstance(weights, str) and "block_weights" not in bad:
        try:
            parse_block_weights(weights)
        except ValueError as error:
            problems.append(f"block_weights {shown(weights)}: {error}.")
    return problems


def apply_settings(node_cls: type, values: Mapping[str, Any]) -> dict[tuple[str, int], float]:
    """Where Apply uses its numbers: the same checks (values from links are only known now); the per-layer
    weights parsed from block_weights. Raises a MomaError naming the node, the input and the value."""
    problems = apply_problems(node_cls, values)
    if problems:
        raise MomaError(f"Apply MoMA Attention: {problems[0]}")
    return parse_block_weights(values.get("block_weights") or "")


def warn_idle_windows(
    start_percent: float,
    end_percent: float,
    object_window: tuple[float, float],
    context_window: tuple[float, float],
    model_sampling: Any = None,
    timestep_ceiling: Callable[[Any], float] | None = None,
) -> list[str]:
    """Warn (once per Apply) about a path whose window can never act: outside start..end, or (the object path,
    given the model's sampling and ``timestep_ceiling``: where the object path starts, t < 950 on SD1.5) entirely
    before the object path starts. Returns the warnings."""
    warnings = []
    for path, (low, high) in (("object", object_window), ("context", context_window)):
        if max(start_percent, low) > min(end_percent, high):
            warnings.append(
                f"the {path} window {low:g}..{high:g} lies outside start/end {start_percent:g}.."
                f"{end_percent:g}, so the {path} path never acts"
            )
        elif path == "object" and model_sampling is not None and timestep_ceiling is not None:
            last = min(end_percent, high)
            if _before_object_path(model_sampling, last, timestep_ceiling):
                warnings.append(
                    f"the object window ends at {last:g}, before t < 950 where the object path starts, so it never acts"
                )
    for warning in warnings:
        log.warning("Apply MoMA Attention: %s; check the *_percent inputs.", warning)
    return warnings


def _before_object_path(model_sampling: Any, end_percent: float, timestep_ceiling: Callable[[Any], float]) -> bool:
    """Whether the whole object window (up to ``end_percent``) lies where the object path is off (t >= 950)."""
    import torch

    try:
        sigma = float(model_sampling.percent_to_sigma(end_percent))
        timestep = float(model_sampling.timestep(torch.tensor([sigma], dtype=torch.float32)).reshape(-1)[0])
        return timestep >= timestep_ceiling(model_sampling)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False
