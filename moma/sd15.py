"""SD1.5 attention layout: ComfyUI block keys <-> MoMA adapter indices (diffusers order down, up, mid)."""
from __future__ import annotations

from dataclasses import dataclass

CROSS_ATTENTION_DIM = 768
NUM_HEADS = 8
NUM_MOMA_TOKENS = 4


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
