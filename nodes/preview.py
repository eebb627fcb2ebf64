"""MoMA Subject Mask Preview: where MoMA acted in the last sampling run of a patched MODEL."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..moma.errors import MomaError
from .node_api import io
from .patches import moma_runs_of

OVERLAY_COLOUR = (1.0, 0.15, 0.1)  # the mask is tinted red over the picture
OVERLAY_OPACITY = 0.6


def subject_mask_overlay(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] with ``mask`` [B', h, w] (0..1, resized to H x W; B' = 1 or B) tinted over it."""
    rgb = images[..., :3].float()
    resized = F.interpolate(mask.float().unsqueeze(1), size=rgb.shape[1:3], mode="bilinear", align_corners=False)
    resized = resized.squeeze(1).clamp(0, 1)
    batch = rgb.shape[0]
    if resized.shape[0] < batch:  # one mask for all, or fewer masks than pictures: the last one repeats
        resized = torch.cat([resized, resized[-1:].expand(batch - resized.shape[0], -1, -1)])
    resized = resized[:batch]
    colour = torch.tensor(OVERLAY_COLOUR, dtype=rgb.dtype, device=rgb.device)
    alpha = (OVERLAY_OPACITY * resized).unsqueeze(-1).to(rgb.device)
    return rgb * (1 - alpha) + colour * alpha


class MomaSubjectMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaSubjectMaskPreview",
            display_name="MoMA Subject Mask Preview",
            category="MoMA",
            description=(
                "Shows the subject mask MoMA used in the last sampling run of this MODEL: per batch item, at the "
                "latent size, as a MASK and tinted over the images. It is the mask made from the last model "
                "evaluation of that run (the final step), before an attn_mask is applied. Connect the images "
                "decoded from that sampler, so this node runs after it."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Apply MoMA Attention that the sampler used."),
                io.Image.Input("images", tooltip="The sampler's decoded images (VAE Decode): the overlay's base."),
                io.Int.Input(
                    "apply_index",
                    default=0,
                    min=0,
                    max=15,
                    tooltip="Which Apply MoMA Attention node of this MODEL, in the order they were "
                    "applied (0 = the first; two subjects: 0 and 1).",
                ),
            ],
            outputs=[
                io.Mask.Output(
                    "subject_mask",
                    display_name="subject_mask",
                    tooltip="[B, latent H, latent W], 1 = where MoMA acted.",
                ),
                io.Image.Output("overlay", display_name="overlay", tooltip="The images with the mask tinted red."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> Any:
        return float("nan")  # the mask changes with every sampling run, not with this node's inputs

    @classmethod
    def execute(cls, model: Any, images: torch.Tensor, apply_index: int = 0) -> io.NodeOutput:
        runs = moma_runs_of(model)
        if not runs:
            raise MomaError(
                "MoMA Subject Mask Preview: this MODEL has no MoMA on it; connect the output of "
                "'Apply MoMA Attention' (the one the sampler used)."
            )
        if apply_index >= len(runs):
            raise MomaError(
                f"MoMA Subject Mask Preview: apply_index {apply_index}, but this MODEL has "
                f"{len(runs)} Apply MoMA Attention node(s) (0..{len(runs) - 1})."
            )
        mask = runs[apply_index].last_subject_mask
        if mask is None:
            raise MomaError(
                "MoMA Subject Mask Preview: no subject mask yet. Sample with this MODEL first (connect the "
                "sampler's decoded images), and check that the subject word occurs in the positive prompt "
                "(without it MoMA acts unmasked)."
            )
        return io.NodeOutput(mask.clone(), subject_mask_overlay(images, mask))
