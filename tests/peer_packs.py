"""Stand-ins for peer adapter packs, written to their real protocols (not simplified fakes).

``IPAdapterStylePatch`` follows the attn2 protocol that ComfyUI_IPAdapter_plus (commit 9d076a3), PuLID and
InstantID share: the patch keeps parallel lists ``callback`` and ``kwargs``; ``add(callback, **kwargs)``
appends to both and sets every kwarg as an attribute; calling it computes plain attention, reads sigma from
``extra_options["sigmas"]`` and adds ``callback(out, q, k, v, extra_options, **kwargs)`` for every callback
whose ``sigma_start >= sigma >= sigma_end``; ``.to(device)`` keeps per-device copies of tensor kwargs.
``apply_ipadapter_style`` installs it the way those packs do: copy the transformer_options, patches_replace
and attn2 dicts of the clone; if the block's key is free install a new patch, else ``.add()`` onto whatever
patch is there.

The callback adds a real, measurable term: attention of the image queries over a few extra tokens projected
to the layer's width, times ``weight``; every call is recorded in ``CALLS`` with the pack's ``tag``.
"""

from __future__ import annotations

from typing import Any

import torch
from comfyui_moma.moma.sd15 import LAYERS

CALLS: list[tuple[str, tuple]] = []  # (tag, block) per callback call


class IPAdapterStylePatch:
    def __init__(self, callback=None, **kwargs):
        self.callback = [callback]
        self.kwargs = [kwargs]
        self.multigpu_kwargs: dict = {}

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        dtype = q.dtype
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        device_kwargs = self.multigpu_kwargs.get(q.device, self.kwargs)
        for i, callback in enumerate(self.callback):
            if self.kwargs[i]["sigma_start"] >= sigma >= self.kwargs[i]["sigma_end"]:
                out = out + callback(out, q, k, v, extra_options, **device_kwargs[i])
        return out.to(dtype=dtype)

    def to(self, device, *args, **kwargs):
        if not isinstance(device, torch.device) or device.type == "cpu" or device in self.multigpu_kwargs:
            return self
        self.multigpu_kwargs[device] = [
            {key: value.to(device) if torch.is_tensor(value) else value for key, value in kw.items()}
            for kw in self.kwargs
        ]
        return self


def extra_tokens_attention(
    out, q, k, v, extra_options, tag="ipadapter", tokens=None, weight=1.0, sigma_start=0.0, sigma_end=0.0, **kwargs
):
    """The pack's term: q over ``tokens`` [n, 768] projected to the layer width (fixed random map), x weight."""
    from comfy.ldm.modules.attention import optimized_attention

    CALLS.append((tag, tuple(extra_options["block"])))
    width = q.shape[-1]
    projection = torch.Generator().manual_seed(width)
    project = torch.randn(tokens.shape[-1], width, generator=projection).to(q.device, q.dtype) / tokens.shape[-1] ** 0.5
    ip = (tokens.to(q.device, q.dtype) @ project).unsqueeze(0).expand(q.shape[0], -1, -1)
    return optimized_attention(q, ip, ip, extra_options["n_heads"]) * weight


def apply_ipadapter_style(
    model: Any, tag: str, weight: float = 1.0, sigma_start: float = 1e9, sigma_end: float = 0.0, seed: int = 0
) -> Any:
    """A clone of ``model`` with the pack's callback on every SD1.5 attn2 block, installed as those packs do."""
    patched = model.clone()
    tokens = torch.randn(4, 768, generator=torch.Generator().manual_seed(seed))
    patch_kwargs = dict(tag=tag, tokens=tokens, weight=weight, sigma_start=sigma_start, sigma_end=sigma_end)
    for layer in LAYERS:
        to = patched.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        key = layer.block
        if key not in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key] = IPAdapterStylePatch(extra_tokens_attention, **patch_kwargs)
            patched.model_options["transformer_options"] = to
        else:
            to["patches_replace"]["attn2"][key].add(extra_tokens_attention, **patch_kwargs)
    return patched


class IPAdapterStyleNode:
    """A classic (V1) node applying the stand-in pack, for graphs run through ComfyUI's executor."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "tag": ("STRING", {"default": "ipadapter"}),
                "weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "testing"

    def apply(self, model, tag, weight):
        return (apply_ipadapter_style(model, tag, weight),)
