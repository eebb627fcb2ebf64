"""SD1.5 attention layout: ComfyUI block keys <-> MoMA adapter indices (diffusers order down, up, mid)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .limits import BLOCK_WEIGHTS_CHARS, shown

CROSS_ATTENTION_DIM = 768
NUM_HEADS = 8
NUM_MOMA_TOKENS = 4
MAX_BLOCK_WEIGHT = 5.0  # a block_weights entry: 0..5


@dataclass(frozen=True)
class AttentionLayer:
    """One SD1.5 transformer block: where ComfyUI calls it and which adapter weights it uses."""

    block: tuple[str, int]  # ComfyUI patch key, e.g. ("input", 1)
    self_index: int  # adapter index of its attn1 processor (even)
    channels: int

    @property
    def cross_index(self) -> int:
        """Adapter index of the attn2 processor (the odd one after attn1)."""
        return self.self_index + 1


# Adapter indices follow diffusers' attn_processors order: down_blocks, up_blocks, mid_block.
LAYERS: tuple[AttentionLayer, ...] = (
    AttentionLayer(("input", 1), 0, 320),
    AttentionLayer(("input", 2), 2, 320),
    AttentionLayer(("input", 4), 4, 640),
    AttentionLayer(("input", 5), 6, 640),
    AttentionLayer(("input", 7), 8, 1280),
    AttentionLayer(("input", 8), 10, 1280),
    AttentionLayer(("output", 3), 12, 1280),
    AttentionLayer(("output", 4), 14, 1280),
    AttentionLayer(("output", 5), 16, 1280),
    AttentionLayer(("output", 6), 18, 640),
    AttentionLayer(("output", 7), 20, 640),
    AttentionLayer(("output", 8), 22, 640),
    AttentionLayer(("output", 9), 24, 320),
    AttentionLayer(("output", 10), 26, 320),
    AttentionLayer(("output", 11), 28, 320),
    AttentionLayer(("middle", 0), 30, 1280),
)
LAYER_BY_BLOCK: dict[tuple[str, int], AttentionLayer] = {layer.block: layer for layer in LAYERS}
CHANNELS_BY_INDEX: dict[int, int] = {
    index: layer.channels for layer in LAYERS for index in (layer.self_index, layer.cross_index)
}


BLOCK_GROUPS = ("input", "middle", "output")


def block_name(block: tuple[str, int]) -> str:
    """The name a user writes for one block in ``block_weights``, e.g. ``input_4``."""
    return f"{block[0]}_{block[1]}"


def parse_block_weights(text: str) -> dict[tuple[str, int], float]:
    """Per-layer weights from a ``block_weights`` string; every layer not named gets 1.0.

    Two forms: 16 numbers in the order of ``LAYERS`` (input_1 input_2 input_4 input_5 input_7 input_8,
    output_3 ... output_11, middle_0), separated by commas, semicolons or spaces; or ``name=value`` pairs
    where the name is a group (``input``, ``middle``, ``output``) or one block (``output_5``); a block
    overrides its group. Spaces around ``=`` or ``:``, a trailing separator and upper case names are fine,
    e.g. ``Input = 1, MIDDLE: 0.5,``. Raises ValueError with what is wrong.
    """
    weights = {layer.block: 1.0 for layer in LAYERS}
    if len(text) > BLOCK_WEIGHTS_CHARS:
        raise ValueError(f"it is {len(text):,} characters long; {BLOCK_WEIGHTS_CHARS:,} are plenty for 16 weights")
    parts = _block_weight_parts(text)
    if not parts:
        return weights
    if all("=" not in part for part in parts):
        if len(parts) != len(LAYERS):
            raise ValueError(
                f"{len(parts)} numbers given; write all {len(LAYERS)} (one per layer, in the order "
                f"{', '.join(block_name(layer.block) for layer in LAYERS)}) or name=value pairs"
            )
        for layer, part in zip(LAYERS, parts):
            weights[layer.block] = _weight(part)
        return weights
    by_name = {block_name(layer.block): layer.block for layer in LAYERS}
    groups, blocks = {}, {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"'{part}' is not name=value (mixing plain numbers and name=value pairs is not allowed)")
        name = name.lower()
        if not name:
            raise ValueError(f"'{part}' has no block name before '='")
        if not value:
            raise ValueError(f"'{name}=' has no value")
        if "=" in value:
            raise ValueError(f"'{part}' is missing a value or a separator (write name=value, name=value)")
        if name in groups or by_name.get(name) in blocks:
            raise ValueError(f"'{name}' is given twice")
        if name in BLOCK_GROUPS:
            groups[name] = _weight(value)
        elif name in by_name:
            blocks[by_name[name]] = _weight(value)
        else:
            raise ValueError(f"unknown block '{name}': use input, middle, output or one of {', '.join(by_name)}")
    for block in weights:
        weights[block] = blocks.get(block, groups.get(block[0], 1.0))
    return weights


def _block_weight_parts(text: str) -> list[str]:
    """The entries of a ``block_weights`` string, with spaces around ``=`` / ``:`` removed and ``:`` read as ``=``
    ('input = 1' / 'input: 1' -> 'input=1'). Linear in the text's length: each run of separators is matched once
    (a pattern such as ``\\s*[=:]\\s*`` would rescan a run of spaces from each of its positions)."""
    pieces = re.split(r"([\s,;]+)", text.strip())
    parts: list[str] = []
    for index in range(0, len(pieces), 2):
        piece = pieces[index]
        if not piece:
            continue
        joined_by_space = index > 0 and pieces[index - 1].isspace()
        if parts and joined_by_space and (parts[-1][-1] in "=:" or piece[0] in "=:"):
            parts[-1] += piece
        else:
            parts.append(piece)
    return [part.replace(":", "=") for part in parts]


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"weight {text!r} is not a finite number (use 0..{MAX_BLOCK_WEIGHT:g})")
    if not 0.0 <= value <= MAX_BLOCK_WEIGHT:
        raise ValueError(f"weight {value} is outside 0..{MAX_BLOCK_WEIGHT:g}")
    return value
