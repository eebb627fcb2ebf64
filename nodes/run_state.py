"""The state of one sampling run of one Apply MoMA Attention node, and the two MoMA terms computed with it.

``MomaRun`` (``patches.py``) holds what an Apply node fixed; each sampling run gets a ``MomaRunState`` for what
the run changes: the subject mask tracker, device copies of the bank and tokens, the gates decided from the
schedule. The helpers below read ComfyUI's ``extra_options`` (layer grid, latent size, animation windows).
All maths lives in ``moma.attention`` / ``moma.subject_mask``.

Compiled models (``torch.compile``, core TorchCompileModel): inside a dynamo trace the patches do not read the run
state, whose Python values (dict sizes, a mask that is None at the first step, gates decided per run) a compiled
frame would either guard on (a recompile each time one changes) or, where the compile drops its guards on
``transformer_options`` (TorchCompileModel on ComfyUI 0.30), bake in. They read a ``CallFrame`` instead: made by
MoMA's APPLY_MODEL wrapper before each UNet call, outside the compiled region, with the same structure at every
call (tensors only: the mask is all ones where there is none, the gates are 0/1 tensors, the rows' cond/uncond
kinds an index tensor); its subject maps go to the tracker after the call.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import comfy.model_sampling
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention

from ..moma import attention as moma_attention
from ..moma.errors import MomaError
from ..moma.reference import AutoReferenceBank, ReferenceBank
from ..moma.sd15 import AttentionLayer
from ..moma.subject_mask import COND, UNCOND, SubjectMaskTracker, mask_to_grid
from .text_encode import prompt_tag

if TYPE_CHECKING:
    from .patches import MomaRun

log = logging.getLogger(__name__)

SELF_PATH_MAX_TIMESTEP = 950  # the object shortcut runs only while t < 950 (spec 3.4)
ReplacePatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
# A gate for one UNet call: True/False when known on the host, else a bool device tensor [1] (a multiplier).
Gate = bool | torch.Tensor


_TIMESTEP_CEILINGS: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def object_timestep_ceiling(model_sampling: Any) -> float:
    """The timestep below which the object path runs, on this model-sampling's own timestep scale.

    SD1.5's discrete schedule (and any other whose timesteps reach the 0..999 scale, as LCM's): 950, as the
    reference. A model-sampling whose timesteps are on another scale (core ModelSamplingContinuousEDM/V, the
    discrete "edm" variant: t = ln(sigma) / 4) has no t = 950; there the gate sits at the same place in its
    schedule, 5% of the way down from its highest sigma (ComfyUI's percent_to_sigma, as start/end percents are
    read), so the first steps still run without the object path instead of the gate being always on. Decided
    once per model-sampling object (the plain discrete one without reading any tensor)."""
    if type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep:
        return float(SELF_PATH_MAX_TIMESTEP)
    try:
        return _TIMESTEP_CEILINGS[model_sampling]
    except (KeyError, TypeError):
        pass
    ceiling = float(SELF_PATH_MAX_TIMESTEP)
    try:
        top = float(model_sampling.timestep(torch.as_tensor([float(model_sampling.sigma_max)])).reshape(-1)[0])
        if top < SELF_PATH_MAX_TIMESTEP:
            sigma = float(model_sampling.percent_to_sigma(1.0 - SELF_PATH_MAX_TIMESTEP / 1000.0))
            ceiling = float(model_sampling.timestep(torch.as_tensor([sigma])).reshape(-1)[0])
    except (AttributeError, TypeError, ValueError, RuntimeError):  # a model-sampling without these: the reference's
        pass
    try:
        _TIMESTEP_CEILINGS[model_sampling] = ceiling
    except TypeError:  # not weak-referenceable
        pass
    return ceiling


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict) -> torch.Tensor:
    """The attention ComfyUI itself runs in this layer (plain self- and text attention stay exactly as without
    MoMA, including another pack's ``optimized_attention_override``)."""
    return optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


# MoMA's own attentions (reference bank, 4 context tokens, subject mass) call torch's fused SDPA directly on
# head-split tensors that are built once per run: one kernel per term. (ComfyUI's CPU default, sub-quadratic,
# would also materialise the [B*heads, N, M] scores: ~400 MB more for a full-frame bank at 256x256.)
_sdpa = F.scaled_dot_product_attention


def latent_size(latent: Any) -> tuple[int, int]:
    """(height, width) of a latent tensor or shape [B, C, H, W] (what Feature Grab 'auto' matches)."""
    shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else tuple(latent or ())
    if len(shape) < 4:
        raise MomaError(
            f"Feature Grab (resolution auto): cannot read the generation's size from a latent of shape "
            f"{shape}; set Feature Grab's resolution (e.g. 512) or connect its latent input."
        )
    return int(shape[-2]), int(shape[-1])


def layer_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of the current layer from ComfyUI's activations_shape (exact also for sizes not /64)."""
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise RuntimeError(f"cannot infer the layer grid of {tokens} tokens (no activations_shape)")
    return side, side


def _latent_grid(extra_options: dict) -> tuple[int, int]:
    shape = extra_options["original_shape"]
    return int(shape[-2]), int(shape[-1])


RUN_STATES_KEY = "moma_run_states"  # transformer_options key: run key -> MomaRunState, per sampling run
FRAMES_KEY = "moma_call_frames"  # transformer_options key of one UNet call: run key -> CallFrame


def use_call_frame() -> bool:
    """Whether MoMA's terms read the UNet call's ``CallFrame`` (inside a torch.compile trace) instead of the run
    state (eager)."""
    return _is_compiling()


_is_compiling: Callable[[], bool] = (
    getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling
)


def window_frames(extra_options: dict) -> list[int] | None:
    """The frames of the current animation context window: AnimateDiff-Evolved's ``ad_params["sub_idxs"]`` or
    ComfyUI's own context windows' ``context_window.index_list``; None outside a window."""
    sub_idxs = (extra_options.get("ad_params") or {}).get("sub_idxs")
    if sub_idxs is None:
        window = extra_options.get("context_window")
        sub_idxs = getattr(window, "index_list", None)
        anchor = getattr(window, "causal_anchor_index", None)  # ComfyUI 0.30 prepends the frame before the window
        if sub_idxs is not None and isinstance(anchor, int) and anchor >= 0:
            sub_idxs = [anchor, *sub_idxs]
    return list(sub_idxs) if sub_idxs is not None else None


def _rows_of(masks: torch.Tensor, batch: int, extra_options: dict) -> torch.Tensor:
    """Per-item masks [N, ...] for the ``batch`` items of this call: one mask for all, one per item, the frames
    of an animation context window, or else repeated/cut to the batch as IPAdapter does."""
    count = masks.shape[0]
    if count == 1:
        return masks.expand(batch, *masks.shape[1:])
    sub_idxs = window_frames(extra_options)
    if sub_idxs is not None and len(sub_idxs) == batch and count >= max(sub_idxs) + 1:
        return masks[list(sub_idxs)]
    if count == batch:
        return masks
    if count > batch:
        return masks[:batch]
    return torch.cat([masks, masks[-1:].expand(batch - count, *masks.shape[1:])])


def _token_count(cond: Any) -> int | None:
    """Text tokens of one positive cond as the sampler holds it (its ``cross_attn`` [B, tokens, 768])."""
    cross_attn = cond.get("cross_attn") if isinstance(cond, dict) else None
    return int(cross_attn.shape[1]) if isinstance(cross_attn, torch.Tensor) and cross_attn.ndim == 3 else None


class MomaRunState:
    """What one sampling run of one Apply node changes: the subject mask, device copies, the gates."""

    def __init__(self, run: MomaRun, model_sampling: Any, idle: bool = False) -> None:
        self.run = run
        self.model_sampling = model_sampling
        (self.object_sigmas, self.context_sigmas) = run.sigma_windows(model_sampling)
        self.object_timestep_ceiling = object_timestep_ceiling(model_sampling)
        self.tracker = SubjectMaskTracker()
        self.device_cache: dict[tuple, Any] = {}  # device tensors (heads-split bank, tokens, masks)
        self.call_cache: dict[tuple, tuple] = {}  # per UNet call: gated masks
        # per device (ComfyUI 0.30 may evaluate cond and uncond in threads, one per GPU): the sigmas of the
        # last call and its gates
        self._gates: dict[torch.device, tuple[torch.Tensor, tuple[Gate, Gate]]] = {}
        # (object, context) gates decided from the sampler's schedule (None where they change during the
        # run), or None outside a sampling run
        self.plan: tuple[bool | None, bool | None] | None = None
        self.plan_schedule: Any = None  # the schedule tensor the plan was read from (None: outer_sample's)
        self.idle = idle
        self.cfg_seen = False  # this run evaluates cond and uncond (a CFG guider)
        # the reference bank of this run (Feature Grab 'auto': set by outer_sample, or per call when idle)
        self.bank: ReferenceBank | None = run.bank if isinstance(run.bank, ReferenceBank) else None
        # where the subject's tokens are in the positive text (follow_positive_prompt may move them)
        self.subject_positions, self.prompt_length = run.subject_positions, run.prompt_length
        self._positive_seen: list | None = None
        self._notes: set[str] = set()
        self._step_depth = 0  # inside a sampler step (PREDICT_NOISE): the tracker holds the step's mask
        self._step_uncond: list | None = None  # the negative conds list of the step's sampler evaluation
        self.kind_map: dict[int, int] = {}  # this evaluation's chunk index -> cond/uncond kind, where they differ

    def __deepcopy__(self, memo: dict) -> MomaRunState:
        return self  # one state per run, whatever copies the run's options

    def gates(self, extra_options: dict) -> tuple[Gate, Gate]:
        """(object path, context path) for this UNet call; computed once per call, not per layer. Inside a
        sampling run no device value is read on the host: a gate that changes during the run is a 0/1 tensor."""
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return False, False
        cached = self._gates.get(sigmas.device)
        if cached is not None and cached[0] is sigmas:
            return cached[1]
        schedule, plan = extra_options.get("sample_sigmas"), None
        if schedule is not None:  # inside a sampling run
            if self.plan is None or (self.idle and self.plan_schedule is not schedule):
                # outer_sample did not see the schedule: read it, once per run (the idle state, which serves
                # calls outside a run, once per schedule)
                self.plan, self.plan_schedule = self.run.schedule_plan(schedule, self.model_sampling), schedule
            plan = self.plan
        value = self._decide_gates(sigmas, plan)
        self._gates[sigmas.device] = (sigmas, value)
        return value

    def _decide_gates(self, sigmas: torch.Tensor, plan: tuple[bool | None, bool | None] | None) -> tuple[Gate, Gate]:
        sigma = sigmas.reshape(-1)[:1]
        (o_low, o_high), (c_low, c_high) = self.object_sigmas, self.context_sigmas
        if plan is None:  # a lone UNet call outside a sampling run: read the sigma
            value = float(sigma.item())
            timestep = float(self.model_sampling.timestep(sigma).reshape(-1)[0].item())
            return o_low <= value <= o_high and timestep < self.object_timestep_ceiling, c_low <= value <= c_high
        object_on, context_on = plan
        if object_on is not None and context_on is not None:
            return object_on, context_on
        context: Gate = context_on if context_on is not None else (sigma >= c_low) & (sigma <= c_high)
        if object_on is None:
            below = self.model_sampling.timestep(sigma) < self.object_timestep_ceiling
            if (o_low, o_high) == (c_low, c_high):  # one window for both paths (the default)
                return (below if context is True else below & context), context
            return below & (sigma >= o_low) & (sigma <= o_high), context
        return object_on, context

    def run_inactive(self) -> bool:
        """MoMA is off for this whole sampling run (its windows miss the schedule): no subject maps needed."""
        return self.plan == (False, False)

    # --- sampler steps and evaluations ------------------------------------------------------------
    def begin_step(self) -> None:
        """A sampler step (one prediction of the guider) begins: its evaluations read the mask it starts with."""
        self._step_depth += 1
        if self._step_depth == 1:
            self._step_uncond = None
            self.tracker.hold()

    def end_step(self) -> None:
        """The step is over: the mask from its sampler evaluation becomes current."""
        self._step_depth = max(0, self._step_depth - 1)
        if self._step_depth == 0:
            self._step_uncond = None
            self.tracker.release()

    def begin_evaluation(self, conds: list, frames: list[int] | None) -> bool:
        """Start one model evaluation; returns whether it is the sampler's own (its subject maps make the next
        mask) rather than a guidance add-on's extra pass. The sampler's evaluation has [positive, negative]
        (a guider without a negative, e.g. BasicGuider, passes [positive] only; then every evaluation is the
        sampler's); an add-on passes one list. An add-on pass of the step's negative conds (SAG's) evaluates
        them as the negative half: its rows get the uncond context tokens, as the sampler's negative rows did."""
        has_uncond = len(conds) > 1 and conds[1] is not None
        self.cfg_seen = self.cfg_seen or has_uncond
        sampler_evaluation = has_uncond or not self.cfg_seen
        if len(conds) > 1:  # the sampler's own evaluation, [positive, negative]; add-ons pass one list
            self.follow_positive_prompt(conds[0])
        if has_uncond and self._step_depth:
            self._step_uncond = conds[1]
        uncond = self._step_uncond
        self.kind_map = (
            {}
            if sampler_evaluation or uncond is None
            else {index: UNCOND for index, cond in enumerate(conds) if cond is uncond and index != UNCOND}
        )
        self.tracker.discard_partial()
        self.tracker.begin_evaluation(frames)
        return sampler_evaluation

    def finish_evaluation(self, sampler_evaluation: bool) -> None:
        """Close the evaluation: the sampler's maps make the next mask; an add-on's are dropped."""
        self.kind_map = {}
        if sampler_evaluation:
            self.tracker.finish_evaluation()
        else:
            self.tracker.discard_partial()

    def chunk_kinds(self, extra_options: dict) -> list[int]:
        """cond/uncond kind of each chunk of this UNet call's rows (ComfyUI's ``cond_or_uncond``, where an add-on
        pass of the negative conds counts as uncond)."""
        kinds = extra_options["cond_or_uncond"]
        if not self.kind_map:
            return list(kinds)
        return [self.kind_map.get(kind, kind) for kind in kinds]

    def follow_positive_prompt(self, positive: list | None) -> None:
        """Check, once per list of positive conds (once per run), which text the positive conditioning was made
        from. Tagged by MoMA Text Encode: the subject's tokens are looked up in that text, so they are right
        by design. Untagged (CLIPTextEncode): the positions Apply found stay; a token count that differs from
        its text's says the text was another one, which is warned about (host-side work only, no device read)."""
        if positive is None or positive is self._positive_seen or self.run.subject is None:
            return
        self._positive_seen = positive
        run, subject = self.run, self.run.subject
        node = f"Apply MoMA Attention (subject {subject.subject!r})"
        tagged = [(tag, _token_count(cond)) for cond in positive if (tag := prompt_tag(cond)) is not None]
        if not tagged:
            positions, length = run.subject_positions, run.prompt_length
            other = sorted({count for count in map(_token_count, positive) if count not in (None, length)})
            if other:
                self._note(
                    logging.WARNING,
                    (
                        f"{node}: the positive conditioning has {other[0]} tokens, but the text the subject's tokens "
                        f"were looked up in, {subject.prompt!r}, has {length}: the positive prompt was encoded from "
                        f"another text, so MoMA's subject mask follows unrelated tokens. Encode the positive prompt "
                        f"with MoMA Text Encode, or wire its text into Apply MoMA Attention's 'prompt' input."
                    ),
                )
        else:
            tag, count = tagged[0]
            positions, length = subject.positions(tag.token_ids), len(tag.token_ids)
            texts = list(dict.fromkeys(t.text for t, _ in tagged))
            if len(texts) > 1:
                self._note(
                    logging.WARNING,
                    (
                        f"{node}: the positive conditioning combines {len(texts)} MoMA Text Encode texts; the subject's "
                        f"tokens are looked up in the first, {tag.text!r}, for all of them."
                    ),
                )
            if count is not None and count != length:
                self._note(
                    logging.WARNING,
                    (
                        f"{node}: the positive conditioning has {count} tokens but its MoMA Text Encode text "
                        f"{tag.text!r} has {length}: a node in between changed it (e.g. Conditioning Concat); the "
                        f"subject's tokens are looked up in that text only."
                    ),
                )
            if not positions:
                self._note(
                    logging.WARNING,
                    (
                        f"{node}: the subject is not in the positive prompt {tag.text!r} (from MoMA Text Encode); "
                        f"the MoMA terms stay unmasked."
                    ),
                )
            elif (positions, length) != (run.subject_positions, run.prompt_length):
                self._note(
                    logging.INFO,
                    (
                        f"{node}: the subject's tokens are taken from the positive prompt MoMA Text Encode encoded, "
                        f"{tag.text!r} (positions {positions}), not from {subject.prompt!r} (positions "
                        f"{run.subject_positions})."
                    ),
                )
        if (positions, length) != (self.subject_positions, self.prompt_length):
            self.subject_positions, self.prompt_length = positions, length
            for key in [key for key in self.device_cache if key[0] in ("cols", "subject", "subject_weights")]:
                del self.device_cache[key]  # built from the old positions

    def _note(self, level: int, message: str) -> None:
        """Log ``message`` once per sampling run."""
        if message not in self._notes:
            self._notes.add(message)
            log.log(level, message)

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        value = self.device_cache.get(key)
        if value is None:
            value = build()
            self.device_cache[key] = value
        return value

    def subject_columns(self, text_length: int, device: torch.device) -> torch.Tensor | None:
        """Subject-token columns in a context of ``text_length`` tokens (every repeat of the prompt)."""
        positions, prompt_length = self.subject_positions, self.prompt_length
        if not positions:
            return None

        def build() -> torch.Tensor | None:
            period = prompt_length if text_length % prompt_length == 0 else text_length
            cols = [p + r * period for r in range(text_length // period) for p in positions if p < period]
            return torch.tensor(cols, dtype=torch.long, device=device) if cols else None

        return self._cached(("cols", text_length, str(device)), build)

    def context_heads(
        self,
        block: tuple[str, int],
        chunk_kinds: list[int],
        batch: int,
        heads: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's projected MoMA tokens for every row, split into heads: [len(chunks) * batch, H, 4, D]."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            k_all, v_all = self.run.context_kv_master[block]
            order = torch.tensor([0 if kind == COND else 1 for kind in chunk_kinds]).repeat_interleave(batch)
            return tuple(
                moma_attention.split_heads(t[order].to(device, dtype), heads).contiguous() for t in (k_all, v_all)
            )

        return self._cached(("ctx", block, tuple(chunk_kinds), batch, heads, str(device), dtype), build)

    def bank_heads(
        self, block: tuple[str, int], heads: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference bank of one layer on device, split into heads: [1, H, M, D] (once per run)."""
        bank = self.bank

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(
                moma_attention.split_heads(t[block].to(device, dtype).unsqueeze(0), heads).contiguous()
                for t in (bank.keys, bank.values)
            )

        return self._cached(("bank", id(bank), block, heads, str(device), dtype), build)

    def reference_bank(self, extra_options: dict) -> ReferenceBank | None:
        """This call's bank; for Feature Grab 'auto' outside a sampling run, the one for this call's latent size."""
        if isinstance(self.run.bank, AutoReferenceBank) and (self.bank is None or self.idle):
            self.bank = self.run.bank.bank_for_latent(*latent_size(extra_options.get("original_shape")))
        return self.bank

    def subject_indicator(
        self, text_length: int, rows: int, heads: int, dim_head: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Values that make an attention over the text keys return the subject mass (see moma.attention)."""
        columns = self.subject_columns(text_length, device)
        if columns is None:
            return None
        return self._cached(
            ("subject", text_length, rows, heads, dim_head, str(device), dtype),
            lambda: moma_attention.subject_indicator_values(text_length, columns, heads, dim_head, rows, device, dtype),
        )

    def spatial_mask(
        self,
        extra_options: dict,
        grid: tuple[int, int],
        chunks: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Subject mask (from the previous evaluation) times the optional user mask: [rows, h*w, 1] or None."""
        mask = self.tracker.rows(grid, chunks, device, dtype)
        if self.run.attn_mask is None:
            return mask

        sub_idxs = window_frames(extra_options)

        def build() -> torch.Tensor:
            user = self.run.attn_mask.float()
            user = user.reshape(-1, 1, user.shape[-2], user.shape[-1])
            user = F.interpolate(user, size=grid, mode="bilinear", align_corners=False)
            user = _rows_of(user.reshape(user.shape[0], -1, 1), batch, extra_options)  # one mask per item
            return user.repeat(chunks, 1, 1).to(device, dtype)

        key = ("user", tuple(grid), chunks, batch, str(device), dtype, tuple(sub_idxs) if sub_idxs else None)
        user_rows = self._cached(key, build)
        return user_rows if mask is None else mask * user_rows

    def gated_mask(
        self,
        gate: Gate,
        term: str,
        extra_options: dict,
        grid: tuple[int, int],
        chunks: int,
        batch: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """What a MoMA term is multiplied by: the spatial mask, times the gate when that is a device tensor
        (built once per UNet call and grid); None for 1."""
        mask = self.spatial_mask(extra_options, grid, chunks, batch, device, dtype)
        if gate is True:
            return mask
        key = (term, tuple(grid), chunks, batch, str(device), dtype)
        cached = self.call_cache.get(key)
        if cached is not None and cached[0] is gate and cached[1] is mask:
            return cached[2]
        factor = gate.to(dtype).view(1, 1, 1)
        gated = factor if mask is None else mask * factor
        self.call_cache[key] = (gate, mask, gated)
        return gated

    # --- the two terms ---------------------------------------------------------------------------
    def object_term(
        self, layer: AttentionLayer, out: torch.Tensor, q: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        gain = self.run.object_gains[layer.block]
        if self.run.bank is None or gain == 0.0:
            return out
        gate = self.gates(extra_options)[0]
        if gate is False or self.reference_bank(extra_options) is None:
            return out
        ref_k, ref_v = self.bank_heads(layer.block, extra_options["n_heads"], q.device, q.dtype)
        ref_out = moma_attention.reference_attention_heads(q, ref_k, ref_v, sdpa=_sdpa)
        chunks = len(extra_options["cond_or_uncond"])
        grid = layer_grid(extra_options, q.shape[1])
        mask = self.gated_mask(gate, "object", extra_options, grid, chunks, q.shape[0] // chunks, q.device, q.dtype)
        return moma_attention.add_object_shortcut(out, ref_out, gain, mask)

    def cross_attention(
        self,
        layer: AttentionLayer,
        previous: ReplacePatch | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_options: dict,
    ) -> torch.Tensor:
        heads = extra_options["n_heads"]
        chunk_kinds = self.chunk_kinds(extra_options)
        chunks = len(chunk_kinds)
        rows, tokens = q.shape[0], q.shape[1]
        batch = rows // chunks
        # The text output is what ComfyUI computes without MoMA (or the previous patch's); the subject map
        # is one more fused attention over the same keys (see moma.attention.subject_attention_mass).
        out = (
            previous(q, k, v, extra_options) if previous is not None else comfy_attention(q, k, v, heads, extra_options)
        )
        grid = layer_grid(extra_options, tokens)
        q_heads = moma_attention.split_heads(q, heads)
        indicator = (
            None
            if self.run_inactive()
            else self.subject_indicator(k.shape[1], rows, heads, q.shape[-1] // heads, q.device, q.dtype)
        )
        if indicator is not None:
            k_heads = moma_attention.split_heads(k, heads)
            if k_heads.shape[0] != rows:  # a context shared by every row
                k_heads = k_heads.expand(rows, -1, -1, -1)
            subject_probs = moma_attention.subject_attention_mass(q_heads, k_heads, indicator, sdpa=_sdpa)
            self.tracker.add_probs(subject_probs, grid, _latent_grid(extra_options), chunk_kinds)
        gate = self.gates(extra_options)[1]
        if gate is not False and self.run.context_gains[layer.block] != 0.0:
            token_k, token_v = self.context_heads(layer.block, chunk_kinds, batch, heads, q.device, q.dtype)
            context_out = moma_attention.merge_head_output(_sdpa(q_heads, token_k, token_v), rows, tokens)
            mask = self.gated_mask(gate, "context", extra_options, grid, chunks, batch, q.device, q.dtype)
            out = out + context_out if mask is None else torch.addcmul(out, context_out, mask)
        return out

    # --- the compiled path: one CallFrame per UNet call --------------------------------------------
    def call_frame(self, x: torch.Tensor, context: Any, extra_options: dict, dtype: torch.dtype) -> CallFrame:
        """What MoMA's terms read inside a compiled UNet call: every value a tensor (or a per-run constant), with
        the same structure at every call of the run. Device tensors are built once per run (the mask once per
        step); no host read."""
        device = x.device
        kinds = tuple(self.chunk_kinds(extra_options))
        batch = x.shape[0] // len(kinds)
        mask = self.tracker.current_items()
        if mask is None or mask.shape[0] != batch:
            mask = self._cached(
                ("ones", batch, tuple(x.shape[-2:]), str(device)),
                lambda: torch.ones((batch, *x.shape[-2:]), device=device),
            )
        elif mask.device != device:  # multi-GPU: the mask was made on another device
            mask = mask.to(device)
        row_uncond = self._cached(
            ("row_kinds", kinds, batch, str(device)),
            lambda: (
                torch.tensor([0 if kind == COND else 1 for kind in kinds], dtype=torch.long)
                .repeat_interleave(batch)
                .to(device)
            ),
        )
        user = None
        if self.run.attn_mask is not None:
            sub_idxs = window_frames(extra_options)

            def build_user() -> torch.Tensor:
                user_mask = self.run.attn_mask.float()
                return _rows_of(user_mask.reshape(-1, 1, *user_mask.shape[-2:]), batch, extra_options).to(device)

            user = self._cached(("user_items", batch, tuple(sub_idxs) if sub_idxs else None, str(device)), build_user)
        subject = None
        if isinstance(context, torch.Tensor) and context.ndim == 3:
            subject = self._subject_weights(int(context.shape[1]), device, dtype)
        # as 0/1 tensors [1]; one constant per term and value (two inputs of a compiled call never alias)
        gates = tuple(
            self._cached((f"gate_{term}", value, str(device)), lambda value=value: torch.tensor([value], device=device))
            if isinstance(value, bool)
            else value.reshape(1)
            for term, value in zip(("object", "context"), self.gates(extra_options))
        )
        bank = self.reference_bank(extra_options) if self.run.bank is not None else None
        bank_on_device = (
            None
            if bank is None
            else self._cached(
                ("frame_bank", id(bank), str(device), dtype),
                lambda: {
                    block: (
                        bank.keys[block].to(device, dtype).unsqueeze(0),
                        bank.values[block].to(device, dtype).unsqueeze(0),
                    )
                    for block in bank.keys
                },
            )
        )
        tokens = self._cached(
            ("frame_tokens", str(device), dtype),
            lambda: {
                block: (k.to(device, dtype), v.to(device, dtype))
                for block, (k, v) in self.run.context_kv_master.items()
            },
        )
        return CallFrame(
            mask=mask,
            row_uncond=row_uncond,
            user=user,
            subject=subject,
            object_gate=gates[0],
            context_gate=gates[1],
            bank=bank_on_device,
            tokens=tokens,
            kinds=list(kinds),
        )

    def _subject_weights(self, text_length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[text_length]: 1 at the subject's columns, 0 elsewhere (all 0 without subject tokens or when MoMA is
        off for the whole run: the maps then carry no information and the mask stays all ones)."""

        def build() -> torch.Tensor:
            weights = torch.zeros(text_length, dtype=dtype)
            columns = None if self.run_inactive() else self.subject_columns(text_length, torch.device("cpu"))
            if columns is not None:
                weights[columns] = 1.0
            return weights.to(device)

        return self._cached(("subject_weights", text_length, str(device), dtype), build)

    def collect(self, frame: CallFrame, latent_grid: tuple[int, int]) -> None:
        """After a UNet call: the subject maps a compiled call recorded in its frame go to the tracker."""
        for subject_probs, grid in frame.records:
            self.tracker.add_probs(subject_probs, grid, latent_grid, frame.kinds)
        frame.records.clear()


class CallFrame:
    """One UNet call's MoMA inputs for the compiled path (see the module docstring) and the two terms computed
    from them. ``records`` collects the call's subject maps ([rows, h*w], layer grid) for the tracker."""

    def __init__(
        self,
        *,
        mask: torch.Tensor,
        row_uncond: torch.Tensor,
        user: torch.Tensor | None,
        subject: torch.Tensor | None,
        object_gate: torch.Tensor,
        context_gate: torch.Tensor,
        bank: dict | None,
        tokens: dict,
        kinds: list[int],
    ) -> None:
        self.mask = mask  # [B, H, W] float32 at the latent grid: the step's subject mask of each item, or ones
        self.row_uncond = row_uncond  # [rows] long: 0 for a cond row, 1 for an uncond row
        self.user = user  # [B, 1, h, w] float32: each item's user MASK (Apply's attn_mask), or None
        self.subject = subject  # [text tokens] in the compute dtype: 1 at the subject's columns
        self.object_gate = object_gate  # [1] bool
        self.context_gate = context_gate  # [1] bool
        self.bank = bank  # block -> ([1, M, C], [1, M, C]) the reference bank on the device, or None
        self.tokens = tokens  # block -> ([2, 4, C], [2, 4, C]) the context tokens' K/V (cond, uncond) on the device
        self.kinds = kinds  # the call's chunk kinds (host side, for the tracker)
        self.records: list[tuple[torch.Tensor, tuple[int, int]]] = []

    def spatial_mask(self, grid: tuple[int, int], rows: int, dtype: torch.dtype, gate: torch.Tensor) -> torch.Tensor:
        """What a MoMA term is multiplied by on this layer: subject mask x user mask x gate, [rows, h*w, 1]."""
        mask = mask_to_grid(self.mask, grid).to(dtype)
        chunks = rows // mask.shape[0]
        mask = mask.repeat(chunks, 1, 1)
        if self.user is not None:
            user = F.interpolate(self.user, size=tuple(grid), mode="bilinear", align_corners=False)
            mask = mask * user.reshape(user.shape[0], -1, 1).repeat(chunks, 1, 1).to(dtype)
        return mask * gate.to(dtype).view(1, 1, 1)

    def object_term(
        self, run: MomaRun, layer: AttentionLayer, out: torch.Tensor, q: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        gain = run.object_gains[layer.block]
        if self.bank is None or gain == 0.0:
            return out
        heads = extra_options["n_heads"]
        bank_k, bank_v = self.bank[layer.block]
        ref_k = moma_attention.split_heads(bank_k.to(q.dtype), heads).contiguous()
        ref_v = moma_attention.split_heads(bank_v.to(q.dtype), heads).contiguous()
        ref_out = moma_attention.reference_attention_heads(q, ref_k, ref_v, sdpa=_sdpa)
        mask = self.spatial_mask(layer_grid(extra_options, q.shape[1]), q.shape[0], q.dtype, self.object_gate)
        return moma_attention.add_object_shortcut(out, ref_out, gain, mask)

    def cross_attention(
        self,
        run: MomaRun,
        layer: AttentionLayer,
        previous: ReplacePatch | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_options: dict,
    ) -> torch.Tensor:
        heads = extra_options["n_heads"]
        rows, tokens = q.shape[0], q.shape[1]
        out = (
            previous(q, k, v, extra_options) if previous is not None else comfy_attention(q, k, v, heads, extra_options)
        )
        grid = layer_grid(extra_options, tokens)
        q_heads = moma_attention.split_heads(q, heads)
        if self.subject is not None and self.subject.shape[0] == k.shape[1]:
            indicator = self.subject.to(q.dtype).view(1, 1, -1, 1).expand(rows, heads, -1, q.shape[-1] // heads)
            k_heads = moma_attention.split_heads(k, heads)
            if k_heads.shape[0] != rows:  # a context shared by every row
                k_heads = k_heads.expand(rows, -1, -1, -1)
            subject_probs = moma_attention.subject_attention_mass(q_heads, k_heads, indicator.contiguous(), sdpa=_sdpa)
            self.records.append((subject_probs, grid))
        if run.context_gains[layer.block] != 0.0:
            tokens_k, tokens_v = self.tokens[layer.block]
            token_k = moma_attention.split_heads(tokens_k.index_select(0, self.row_uncond).to(q.dtype), heads)
            token_v = moma_attention.split_heads(tokens_v.index_select(0, self.row_uncond).to(q.dtype), heads)
            context_out = moma_attention.merge_head_output(_sdpa(q_heads, token_k, token_v), rows, tokens)
            out = torch.addcmul(out, context_out, self.spatial_mask(grid, rows, q.dtype, self.context_gate))
        return out
