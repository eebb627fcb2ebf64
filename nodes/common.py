"""Small helpers shared by the node files."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from ..moma.context import adapter_mismatch
from ..moma.errors import MomaError
from ..moma.sd15 import CROSS_ATTENTION_DIM
from ..moma.weights import adapter_fingerprint


def require_sd15(model: Any, node: str) -> None:
    """MoMA's adapter is trained for SD1.5 UNets (320 base channels, 768-wide text context)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    name = type(config).__name__ if config is not None else type(model).__name__
    if (
        unet.get("model_channels") != 320
        or unet.get("context_dim") != CROSS_ATTENTION_DIM
        or unet.get("adm_in_channels")
    ):
        raise MomaError(
            f"{node}: the MODEL is {name}, but MoMA's adapter only fits SD1.5 models (320-channel UNet, "
            f"768-wide CLIP-L text context). Wire an SD1.5 checkpoint (e.g. Realistic Vision, Anything v4); "
            f"SDXL, SD2, SD3 and Flux are not supported."
        )


def adapter_of(moma_model: Any) -> Any:
    """The MoMA adapter weights (to_k_ip / to_v_ip / scale_learnable dicts) inside a MOMA_MODEL."""
    adapter = getattr(moma_model, "adapter", None)
    if adapter is None or not hasattr(adapter, "to_k_ip"):
        raise MomaError("moma_model: expected the output of a 'MoMA Loader' node.")
    return adapter


log = logging.getLogger(__name__)
SINGLE_COLOUR_SHARE = 0.98  # pixels of one colour that make a reference picture 'single colour'


def warn_if_other_adapter(context: Any, moma_model: Any, node: str = "Apply MoMA Attention") -> str | None:
    """Log (and return) a warning when ``context`` was encoded with another adapter than ``moma_model``'s."""
    adapter = getattr(moma_model, "adapter", None)
    if adapter is None or not getattr(context, "adapter_sha256", ""):
        return None
    reason = adapter_mismatch(context, adapter_fingerprint(adapter))
    if reason:
        log.warning("%s: %s", node, reason)
    return reason


def warn_if_constant_picture(picture: torch.Tensor, node: str) -> str | None:
    """Log (and return) a warning when a reference picture [.., H, W, C] is (almost: >= 98% of its pixels) one colour."""
    rgb = (
        picture[..., :3].float().contiguous().reshape(-1, min(3, picture.shape[-1]))
    )  # median() of a stride-0 (expanded) tensor gives NaN
    if rgb.numel() == 0:
        return None
    colour = rgb.median(dim=0).values
    share = float(((rgb - colour).abs() <= 1.0 / 512).all(dim=1).float().mean())
    if share < SINGLE_COLOUR_SHARE:
        return None
    shown = ", ".join(f"{value:.3f}" for value in colour.tolist())
    cause = (
        "a 16-bit PNG, which Load Image of ComfyUI 0.3.x turns white: save the picture as 8-bit"
        if bool((colour >= 1.0 - 1.0 / 512).all())
        else "a blank or failed picture, or the wrong input wired"
    )
    message = (
        f"{node}: the reference picture is a single colour ({shown} in {share:.0%} of it), so there is no "
        f"object for MoMA to copy. Likely cause: {cause}."
    )
    log.warning(message)
    return message


def advanced_input() -> dict[str, Any]:
    """Keyword arguments that mark a V3 input as advanced where the host supports it (ComfyUI 0.30's
    ``Input(advanced=True)``), and nothing on older hosts (0.3.75)."""
    from .node_api import io

    return {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}


def schema_extras(**fields: Any) -> dict[str, Any]:
    """The ``io.Schema`` fields among ``fields`` that this host's V3 API has (ComfyUI 0.30 added
    ``search_aliases``; 0.3.75 has no such field and gets nothing)."""
    import dataclasses

    from .node_api import io

    known = {field.name for field in dataclasses.fields(io.Schema)}
    return {name: value for name, value in fields.items() if name in known}
