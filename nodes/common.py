"""Small helpers shared by the node files."""
from __future__ import annotations

import inspect
from typing import Any

from ..moma.errors import MomaError
from ..moma.sd15 import CROSS_ATTENTION_DIM


def require_sd15(model: Any, node: str) -> None:
    """MoMA's adapter is trained for SD1.5 UNets (320 base channels, 768-wide text context)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    name = type(config).__name__ if config is not None else type(model).__name__
    if unet.get("model_channels") != 320 or unet.get("context_dim") != CROSS_ATTENTION_DIM or unet.get("adm_in_channels"):
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


def advanced_input() -> dict[str, Any]:
    """Keyword arguments that mark a V3 input as advanced where the host supports it (ComfyUI 0.30's
    ``Input(advanced=True)``), and nothing on older hosts (0.3.75)."""
    from comfy_api.latest import io

    return {"advanced": True} if "advanced" in inspect.signature(io.Float.Input.__init__).parameters else {}
