"""The soft subject mask MoMA builds from text cross-attention (spec 3.5, reference `get_mask_from_cross`).

The reference upsamples every layer's map to 512x512 (nearest), averages, normalises, and later
nearest-downsamples the result to each layer's grid. For grids that divide the latent grid that is
exactly the same as doing it all at the latent grid (H/8 x W/8), which is what these functions do, so
non-square and non-512 sizes work and the work is 64x smaller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_THRESHOLD = 0.2


def _min_max(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """(x - min) / (max - min) over ``dims``; a constant slice (max == min) becomes zeros instead of NaN."""
    if len(dims) == 1:
        lo, hi = torch.aminmax(x, dim=dims[0], keepdim=True)
    else:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    # a zero span has x - lo == 0 everywhere, so dividing by the smallest normal float gives the zeros
    # without a second masked pass (fewer kernels: this runs for every layer grid at every evaluation)
    return (x - lo).div_((hi - lo).clamp_min_(torch.finfo(x.dtype).tiny))


def layer_subject_map(subject_probs: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """One layer's subject map: per-sample min-max, reshape to its grid, nearest-resize (in [0, 1]).

    subject_probs: [..., B, h*w] (subject-column attention mass, head-averaged; leading dims, e.g. several
    layers of the same grid, are maps of their own). Returns [..., B, H, W] at out_grid.
    """
    h, w = grid
    leading = subject_probs.shape[:-1]
    # (x - lo) <= (hi - lo) holds after rounding too, so the min-max is already in [0, 1]: the reference's
    # clamp to [0, 1] would change nothing and is one kernel less per grid
    maps = _min_max(subject_probs.float(), (-1,)).view(-1, 1, h, w)
    if (h, w) != tuple(out_grid):
        maps = F.interpolate(maps, size=tuple(out_grid), mode="nearest")
    return maps.view(*leading, *out_grid)


def subject_mask_and_validity(
    cond_mean: torch.Tensor, uncond_mean: torch.Tensor | None, threshold: float = MASK_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-averaged maps -> the subject mask used at the next model evaluation, without host reads.

    cond_mean / uncond_mean: [B, H, W], each the mean of the 16 layer maps of one half of the CFG batch.
    Per batch item, min-max jointly over both halves, zero values <= threshold, min-max again, keep the
    cond half. Returns (mask [B, H, W], valid: a 0-dim bool tensor, False when a map carries no information,
    e.g. the subject word is not in the prompt: the reference would divide by zero there).
    """
    stacked = cond_mean.unsqueeze(0) if uncond_mean is None else torch.stack([uncond_mean, cond_mean])
    stacked = stacked.float()
    dims = (0, 2, 3)  # jointly over the halves and space, separately per batch item
    lo, hi = stacked.amin(dim=dims, keepdim=True), stacked.amax(dim=dims, keepdim=True)
    span = hi - lo
    valid = span.gt(0).all()
    mask = (stacked - lo).div_(span.clamp_min_(torch.finfo(stacked.dtype).tiny))  # _min_max with lo/hi reused
    mask = torch.where(mask > threshold, mask, 0.0)
    mask = _min_max(mask, dims)
    return mask[-1], valid


def combine_subject_maps(
    cond_mean: torch.Tensor, uncond_mean: torch.Tensor | None, threshold: float = MASK_THRESHOLD
) -> torch.Tensor | None:
    """:func:`subject_mask_and_validity` as a mask or None (reads the validity on the host)."""
    mask, valid = subject_mask_and_validity(cond_mean, uncond_mean, threshold)
    return mask if bool(valid) else None


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] -> [B, h*w, 1] by nearest resize to a layer's grid (the reference's F.interpolate default)."""
    if tuple(mask.shape[-2:]) != tuple(grid):
        mask = F.interpolate(mask.unsqueeze(1), size=tuple(grid), mode="nearest")[:, 0]
    return mask.reshape(mask.shape[0], -1, 1)


def subject_token_positions(token_ids: list[int], subject_ids: set[int]) -> list[int]:
    """Every position whose id is one of the subject words' first BPE ids (reference `get_subject_idx`)."""
    return [i for i, token in enumerate(token_ids) if token in subject_ids]


@dataclass(frozen=True)
class SubjectTokens:
    """One Apply node's subject: its words' first BPE ids and the text it looked them up in when applied."""

    subject: str
    ids: frozenset
    prompt: str

    def positions(self, token_ids: Sequence[int]) -> list[int]:
        return subject_token_positions(list(token_ids), set(self.ids))


@dataclass(frozen=True, eq=False)
class PromptTokens:
    """The text a conditioning was encoded from and its CLIP token ids as the encoder saw them (77-token
    chunks with BOS, EOS and padding; -1 where an embedding stands). MoMA Text Encode tags its conditioning
    with it, so sampling finds the subject tokens in the text the UNet really gets."""

    text: str
    token_ids: tuple

    def __len__(self) -> int:
        return len(self.token_ids)


COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond values


class SubjectMaskTracker:
    """The subject mask across one sampling run.

    Each attn2 layer queues its subject probabilities (``add_probs``) or adds a finished map (``add``)
    for every row of the model batch; after a whole model evaluation (cond and uncond, whether they came
    in one UNet call or several) ``finish_evaluation`` turns the layer means into the mask that the *next*
    evaluation uses. One tracker per Apply node; ``reset`` at the start of every sampling run.

    Sampler steps (``hold`` .. ``release``): inside a step every evaluation reads the mask the step started
    with; a finished evaluation's mask is staged and becomes current at ``release``, so a guidance add-on that
    evaluates the model again after the sampler's evaluation (PAG, SAG) reads the same mask as that evaluation.
    Outside a step a finished evaluation's mask is current at once.

    Animation context windows (``begin_evaluation`` with the window's frame indices): each window is one
    evaluation of some frames of the clip, so the mask is kept per frame of the whole clip: a window's masks
    are written at its frames and a later evaluation reads the latest mask of each of its own frames (in a
    step: as it was when the step began; frames not evaluated yet are unmasked, as every frame is at the first
    step).
    """

    def __init__(self) -> None:
        # [B, H, W] at the latent grid, or None (unmasked); a mask without information is all ones, so the
        # sampling path never reads a device value on the host (``mask`` says None for it, reading it).
        self._mask: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._pending: list[tuple[torch.Tensor, tuple[int, int], tuple[int, int], tuple[int, ...]]] = []
        self._rows_cache: dict[tuple, torch.Tensor] = {}
        self._frames: tuple[int, ...] | None = None  # the current evaluation's frames of the clip, or None
        self._clip: torch.Tensor | None = None  # [frames of the clip, H, W], 1 where no mask is known
        self._held = False  # inside a sampler step: finished masks are staged until ``release``
        self._staged: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # mask, valid, clip
        self._items_cache: dict[tuple, torch.Tensor | None] = {}

    def begin_evaluation(self, frames: list[int] | None) -> None:
        """Start a model evaluation of these frames of the clip (an animation context window), or of the whole
        batch (None)."""
        self._frames = tuple(frames) if frames is not None else None

    @property
    def mask(self) -> torch.Tensor | None:
        """The newest subject mask (inside a step: the one the next step reads), or None when there is none or
        it carries no information (a host read: for callers outside the sampling path)."""
        mask, valid = (self._staged[0], self._staged[1]) if self._staged is not None else (self._mask, self._valid)
        if mask is None or not bool(valid):
            return None
        return mask

    def final_mask_on_cpu(self) -> torch.Tensor | None:
        """The last mask [B, H, W] (with context windows: of every frame of the clip) as a CPU float tensor, or
        None (one host copy: at the end of a run)."""
        clip = self._staged[2] if self._staged is not None else self._clip
        mask = clip if clip is not None else self.mask
        return None if mask is None else mask.detach().float().cpu()

    def reset(self) -> None:
        self._mask = None
        self._valid = None
        self._sums.clear()
        self._counts.clear()
        self._pending.clear()
        self._rows_cache.clear()
        self._frames = None
        self._clip = None
        self._held = False
        self._staged = None
        self._items_cache.clear()

    def hold(self) -> None:
        """A sampler step begins: until ``release`` every evaluation reads the current mask; finished
        evaluations stage theirs."""
        self._held = True

    def release(self) -> None:
        """The step is over: the mask its evaluations staged (if any) becomes current."""
        self._held = False
        if self._staged is not None:
            self._mask, self._valid, self._clip = self._staged
            self._staged = None
            self._rows_cache.clear()
            self._items_cache.clear()

    def add(self, layer_maps: torch.Tensor, chunk_kinds: list[int], layers: int = 1) -> None:
        """layer_maps: [len(chunk_kinds) * B, H, W], rows chunk-major as ComfyUI batches them (the sum of
        ``layers`` layers' maps)."""
        batch = layer_maps.shape[0] // len(chunk_kinds)
        for chunk, kind in enumerate(chunk_kinds):
            part = layer_maps[chunk * batch : (chunk + 1) * batch]
            if kind in self._sums and self._sums[kind].shape == part.shape:
                # (multi-GPU ComfyUI may evaluate parts of one batch on several devices)
                self._sums[kind] += part.to(self._sums[kind].device)
                self._counts[kind] += layers
            else:
                self._sums[kind] = part.clone()
                self._counts[kind] = layers

    def add_probs(
        self, subject_probs: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int], chunk_kinds: list[int]
    ) -> None:
        """Queue one layer's subject probabilities [len(chunk_kinds) * B, h*w]. They become maps at
        ``finish_evaluation``, the layers of one grid together: a few kernels per grid instead of per layer
        (on a GPU, sampling SD1.5 at common sizes is bound by kernel launches)."""
        self._pending.append((subject_probs, tuple(grid), tuple(out_grid), tuple(chunk_kinds)))

    def _add_pending(self) -> None:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for probs, grid, out_grid, kinds in self._pending:
            groups.setdefault((grid, out_grid, kinds, tuple(probs.shape), probs.device), []).append(probs)
        self._pending.clear()
        # the grids' sums are added up before they are split by chunk (the same additions in the same order)
        totals: dict[tuple, tuple[torch.Tensor, int]] = {}
        for (grid, out_grid, kinds, _, device), layers in groups.items():
            summed = layer_subject_map(torch.stack(layers), grid, out_grid).sum(0)  # [rows, H, W]
            key = (kinds, tuple(summed.shape), device)
            total = totals.get(key)
            totals[key] = (summed, len(layers)) if total is None else (total[0] + summed, total[1] + len(layers))
        for (kinds, _, _), (summed, count) in totals.items():
            self.add(summed, list(kinds), layers=count)

    def discard_partial(self) -> None:
        """Drop maps of an evaluation that will not be finished (or not count)."""
        self._pending.clear()
        self._sums.clear()
        self._counts.clear()

    def finish_evaluation(self) -> None:
        """Close one model evaluation: new mask from its layer maps (kept as is if no cond map arrived)."""
        self._add_pending()
        if COND in self._sums:
            cond = self._sums[COND] / self._counts[COND]
            uncond = self._sums[UNCOND] / self._counts[UNCOND] if UNCOND in self._sums else None
            if uncond is not None and uncond.shape != cond.shape:
                uncond = None
            if uncond is not None:
                uncond = uncond.to(cond.device)
            mask, valid = subject_mask_and_validity(cond, uncond)
            mask = torch.where(valid, mask, 1.0)
            if self._held:  # the step's evaluations keep reading the current mask; this one is next
                clip = self._staged[2] if self._staged is not None else self._clip
                if self._frames is not None and len(self._frames) == mask.shape[0]:
                    clip = self._store_frames(clip, mask, self._frames, in_place=clip is not self._clip)
                self._staged = (mask, valid, clip)
            else:
                self._mask, self._valid = mask, valid
                if self._frames is not None and len(self._frames) == mask.shape[0]:
                    self._clip = self._store_frames(self._clip, mask, self._frames, in_place=True)
                self._rows_cache.clear()
                self._items_cache.clear()
        self._sums.clear()
        self._counts.clear()

    @staticmethod
    def _store_frames(
        clip: torch.Tensor | None, mask: torch.Tensor, frames: tuple[int, ...], in_place: bool
    ) -> torch.Tensor:
        """``clip`` with a window's masks [len(frames), H, W] written at its frames (device ops only); a new
        tensor unless ``in_place`` (the current clip stays as it is while a step is held)."""
        length = max(frames) + 1
        if clip is None or clip.shape[0] < length or clip.shape[1:] != mask.shape[1:]:
            grown = torch.ones((length, *mask.shape[1:]), device=mask.device, dtype=mask.dtype)
            if clip is not None and clip.shape[1:] == mask.shape[1:]:
                grown[: clip.shape[0]] = clip.to(mask.device)
            clip = grown
        elif not in_place:
            clip = clip.clone()
        clip[list(frames)] = mask.to(clip.dtype)
        return clip

    def _current(self) -> torch.Tensor | None:
        """The mask for the current evaluation's batch: of its frames when it is a context window."""
        if self._frames is not None and self._clip is not None:
            if max(self._frames) < self._clip.shape[0]:
                return self._clip[list(self._frames)]
            return None
        return self._mask

    def current_items(self) -> torch.Tensor | None:
        """The current mask of the current evaluation's batch items, [B, H, W] float, or None (unmasked); one
        device op per step for an animation context window, none otherwise."""
        if self._mask is None:
            return None
        if self._frames not in self._items_cache:
            self._items_cache[self._frames] = self._current()
        return self._items_cache[self._frames]

    def rows(self, grid: tuple[int, int], chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The current mask for a layer: [chunks * B, h*w, 1] (same mask for cond and uncond rows), or None."""
        if self._mask is None:
            return None
        key = (tuple(grid), chunks, str(device), dtype, self._frames)
        rows = self._rows_cache.get(key)
        if rows is None:
            current = self._current()
            if current is None:
                return None
            rows = mask_to_grid(current, grid).to(device=device, dtype=dtype).repeat(chunks, 1, 1)
            self._rows_cache[key] = rows
        return rows
