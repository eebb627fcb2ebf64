"""The reference ("object") path: preparing the reference pass and the bank of object keys/values (spec 3.2).

One UNet evaluation at timestep 0 on the VAE-encoded *original* reference image (not whitened) with the
subject-only prompt; in each of the 16 attn1 layers K_ref = to_k_ip(k), V_ref = to_v_ip(v), kept only at
the object's positions (nearest-resized binary object mask).
"""

from __future__ import annotations

import itertools
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import MomaError

log = logging.getLogger(__name__)

REFERENCE_RESOLUTION = 512  # the reference stretches every reference picture to 512x512
AUTO_RESOLUTION = 0  # Feature Grab's 'resolution' 0: the generation's size, read when sampling starts
SIZE_MULTIPLE = 64  # latent /8, three UNet downsamplings /8: keeps every layer grid whole
MAX_SIDE = 1024  # extreme aspect ratios are stretched rather than giving a huge bank
# The reference pass sees only the first 73 of the 77 subject-prompt tokens: every reference cross
# processor splits the last 4 context tokens off as "MoMA tokens", even when disabled (spec 3.2 step 6).
REFERENCE_TEXT_TOKENS = 73


def reference_pixel_size(height: int, width: int, resolution: int = REFERENCE_RESOLUTION) -> tuple[int, int]:
    """Size the reference is encoded at: its aspect ratio kept, area ~resolution^2, sides multiples of 64.

    A square picture of any size gives resolution x resolution (512x512 is the reference's own size).
    Sides stay within [64, 1024].
    """
    scale = math.sqrt(resolution * resolution / float(height * width))

    def side(length: int) -> int:
        return min(MAX_SIDE, max(SIZE_MULTIPLE, int(round(length * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE))

    return side(height), side(width)


def generation_resolution(latent_height: int, latent_width: int, latent_scale: int = 8) -> int:
    """The ``resolution`` that matches a generation of this latent size: the side of its square-equivalent
    pixel area (the reference pipeline encodes its reference at the size it generates, both 512x512), so
    the bank holds about as many object keys as the image has object queries."""
    side = math.sqrt(latent_height * latent_scale * latent_width * latent_scale)
    return int(min(MAX_SIDE, max(SIZE_MULTIPLE, round(side))))


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] with C in {1, 3, 4} -> [B, H, W, 3] (grey is repeated; alpha is dropped, not composited)."""
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return image.expand(*image.shape[:-1], 3)
    if channels == 4:
        return image[..., :3]
    raise MomaError(f"Reference image has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA).")


def resize_reference_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[1, H, W, C] 0..1 -> [1, h, w, 3] bilinear (antialiased, like PIL's resize used by the reference)."""
    pixels = to_rgb(image).movedim(-1, 1).float()
    if tuple(pixels.shape[-2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    return pixels.clamp(0.0, 1.0).movedim(1, -1)


def binarise_object_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Object mask [H, W] or [1, H, W] -> bool [h, w], as the reference: an antialiased bilinear resize (PIL's,
    on an 8-bit mask picture) then "value > 0", i.e. anything that rounds to at least 1/255 is object."""
    mask = mask.float()
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dim() != 4 or mask.shape[0] != 1 or mask.shape[1] != 1:
        raise MomaError(
            f"Object mask has shape {tuple(mask.shape)}; expected one mask [H, W] (a ComfyUI MASK of batch 1)."
        )
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="bilinear", antialias=True, align_corners=False)
    return mask[0, 0] > 0.5 / 255.0


def object_token_index(object_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
    """Flat indices of the object's tokens on a layer grid (nearest resize); None when the mask is empty there."""
    small = F.interpolate(object_mask[None, None].float(), size=tuple(grid), mode="nearest")[0, 0]
    index = small.flatten().nonzero().flatten()
    return index if index.numel() > 0 else None


def noised_reference_latent(latent: torch.Tensor, sigma0: float, generator: torch.Generator) -> torch.Tensor:
    """x = z + sigma0 * eps: with ComfyUI's EPS input scaling 1/sqrt(sigma^2+1) the UNet sees
    sqrt(abar_0) z + sqrt(1 - abar_0) eps, i.e. diffusers' add_noise at t=0."""
    noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32, device="cpu").to(
        latent.device, latent.dtype
    )
    return latent + sigma0 * noise


def sample_latent_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the VAE posterior N(mean, exp(logvar)), as diffusers' latent_dist.sample() (logvar clamped
    to [-30, 20] like both libraries)."""
    std = torch.exp(0.5 * logvar.float().clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu").to(mean.device)
    return mean.float() + std * eps


@dataclass
class ReferenceBank:
    """MOMA_REF: per attn1 layer, the reference's object keys/values after to_k_ip/to_v_ip.

    keys/values: block (e.g. ("input", 1)) -> [M, C] where M is the number of object tokens on that layer's
    grid (all tokens when the mask is empty there). Small: a few MB at 512^2 in fp16.
    """

    keys: dict[tuple[str, int], torch.Tensor]
    values: dict[tuple[str, int], torch.Tensor]
    grids: dict[tuple[str, int], tuple[int, int]]
    pixel_size: tuple[int, int]
    object_mask: torch.Tensor  # bool [h, w] at pixel_size (of several views: where any view has the object)
    subject: str
    resolution: int = REFERENCE_RESOLUTION  # the 'resolution' the reference was encoded at
    views: int = 1  # pictures of the object whose keys/values the bank holds (concatenated in batch order)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
        """(keys, values) on device/dtype; converted once and cached, so the per-step path never copies."""
        cache_key = (str(device), dtype)
        if cache_key not in self._device_cache:
            self._device_cache.clear()  # keep at most one device copy alive
            self._device_cache[cache_key] = (
                {b: t.to(device=device, dtype=dtype) for b, t in self.keys.items()},
                {b: t.to(device=device, dtype=dtype) for b, t in self.values.items()},
            )
        return self._device_cache[cache_key]

    def release_device_copy(self) -> None:
        self._device_cache.clear()

    def __deepcopy__(self, memo: dict) -> ReferenceBank:
        return self  # immutable tensors; ComfyUI deep-copies model_options on every clone

    def layer_token_counts(self) -> dict[tuple[str, int], int]:
        return {b: int(t.shape[0]) for b, t in self.keys.items()}


def capture_reference_layer(
    k: torch.Tensor,
    v: torch.Tensor,
    to_k_ip: torch.Tensor,
    to_v_ip: torch.Tensor,
    token_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K_ref = to_k_ip(k), V_ref = to_v_ip(v) for one attn1 layer of the reference pass, object tokens only.

    k, v: [1, N, C] (the layer's projected keys/values); to_k_ip/to_v_ip: [C, C] nn.Linear weights.
    """
    if token_index is not None:
        k = k[:, token_index.to(k.device)]
        v = v[:, token_index.to(v.device)]
    k_ref = F.linear(k[0], to_k_ip.to(device=k.device, dtype=k.dtype))
    v_ref = F.linear(v[0], to_v_ip.to(device=v.device, dtype=v.dtype))
    return k_ref, v_ref


# What an AutoReferenceBank needs to run its reference pass (the MODEL, the VAE) is kept here, not in the bank:
# the bank travels inside ComfyUI's transformer_options, where only small tensors belong. Each entry lives as
# long as its bank.
_REFERENCE_PASSES: dict[int, Callable[[int], ReferenceBank]] = {}
_pass_ids = itertools.count()


class AutoReferenceBank:
    """MOMA_REF for Feature Grab's ``resolution`` 0 ("auto"): the bank is made when sampling starts, at the
    generation's size (``generation_resolution`` of the latent being sampled), as MoMA's own pipeline encodes
    its reference at the size it generates. A 512x512 generation gets exactly the ``resolution`` 512 bank.
    Banks are kept per size (a hires pass at another size gets its own)."""

    KEPT_SIZES = 4

    def __init__(self, reference_pass: Callable[[int], ReferenceBank], subject: str, views: int = 1) -> None:
        self.subject = subject
        self.views = views
        self._banks: OrderedDict[int, ReferenceBank] = OrderedDict()
        self._pass_id = next(_pass_ids)
        _REFERENCE_PASSES[self._pass_id] = reference_pass
        weakref.finalize(self, _REFERENCE_PASSES.pop, self._pass_id, None)

    def __deepcopy__(self, memo: dict) -> AutoReferenceBank:
        return self

    def bank_for_latent(self, latent_height: int, latent_width: int) -> ReferenceBank:
        """The bank for a generation of this latent size (made on first use, then kept)."""
        return self.bank_at(generation_resolution(latent_height, latent_width))

    def bank_at(self, resolution: int) -> ReferenceBank:
        bank = self._banks.get(resolution)
        if bank is None:
            reference_pass = _REFERENCE_PASSES.get(self._pass_id)
            if reference_pass is None:
                raise MomaError("Feature Grab (resolution auto): its inputs are gone; run the workflow again.")
            log.info("Feature Grab: reference pass at resolution %d (auto, the size being sampled).", resolution)
            bank = reference_pass(resolution)
            self._banks[resolution] = bank
            while len(self._banks) > self.KEPT_SIZES:
                self._banks.popitem(last=False)
        else:
            self._banks.move_to_end(resolution)
        return bank
