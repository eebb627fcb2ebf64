"""ComfyUI glue for MoMA's attention: the attn1/attn2 replace patches and the state of one Apply node.

All maths lives in ``moma.attention`` / ``moma.subject_mask``; this module only reads ComfyUI's
``extra_options`` (batch chunks, sigma, layer shapes), routes cond/uncond rows and installs patches.
"""
from __future__ import annotations

import copy
import logging
import math
import uuid
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention

from ..moma import attention as moma_attention
from ..moma.errors import MomaError
from ..moma.reference import ReferenceBank, capture_reference_layer, object_token_index
from ..moma.sd15 import LAYER_BY_BLOCK, LAYERS, AttentionLayer
from ..moma.subject_mask import COND, SubjectMaskTracker

log = logging.getLogger(__name__)

SELF_PATH_MAX_TIMESTEP = 950  # the object shortcut runs only while t < 950 (spec 3.4)
# Samplers evaluate the model at sigmas within the schedule's range; euler's churn raises one by at most
# sqrt(2). A gate is decided for the whole run only if it holds over the range widened by this factor.
SCHEDULE_MARGIN = math.sqrt(2.0)
ReplacePatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
# A gate for one UNet call: True/False when known on the host, else a bool device tensor [1] (a multiplier).
Gate = Union[bool, torch.Tensor]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, extra_options: dict) -> torch.Tensor:
    """The attention ComfyUI itself runs in this layer (plain self- and text attention stay exactly as without
    MoMA, including another pack's ``optimized_attention_override``)."""
    return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


# MoMA's own attentions (reference bank, 4 context tokens, subject mass) call torch's fused SDPA directly on
# head-split tensors that are built once per run: one kernel per term. (ComfyUI's CPU default, sub-quadratic,
# would also materialise the [B*heads, N, M] scores: ~400 MB more for a full-frame bank at 256x256.)
_sdpa = F.scaled_dot_product_attention


def _layer_grid(extra_options: dict, tokens: int) -> tuple[int, int]:
    """(h, w) of the current layer from ComfyUI's activations_shape (exact also for sizes not /64)."""
    shape = extra_options.get("activations_shape")
    if shape is not None and shape[-2] * shape[-1] == tokens:
        return int(shape[-2]), int(shape[-1])
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise RuntimeError(f"cannot infer the layer grid of {tokens} tokens (no activations_shape)")
    return side, side


def _latent_grid(extra_options: dict) -> tuple[int, int]:
    shape = extra_options["original_shape"]
    return int(shape[-2]), int(shape[-1])


class MomaRun:
    """Everything the 32 patches of one Apply node share: weights on device, gates, the subject mask.

    ComfyUI deep-copies model_options on every clone; ``__deepcopy__`` returns self so that the patches
    and the sampling wrappers of every clone keep talking to this one object. Its
    per-run part (the subject mask) is reset at the start of each sampling run by ``outer_sample``.
    """

    def __init__(
        self,
        *,
        to_k_ip: dict[int, torch.Tensor],
        to_v_ip: dict[int, torch.Tensor],
        object_gains: dict[tuple[str, int], float],
        cond_tokens: torch.Tensor,
        uncond_tokens: torch.Tensor,
        bank: Optional[ReferenceBank],
        subject_positions: list[int],
        prompt_length: int,
        model_sampling: Any,
        start_percent: float,
        end_percent: float,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> None:
        self.key = f"moma-{uuid.uuid4().hex[:8]}"
        self.bank = bank
        self.object_gains = object_gains
        self.subject_positions = subject_positions
        self.prompt_length = prompt_length
        self.start_percent = start_percent
        self.end_percent = end_percent
        self._use_model_sampling(model_sampling)
        self.attn_mask = attn_mask  # [B?, H, W] user MASK, or None
        self.tracker = SubjectMaskTracker()
        # The 4 context tokens through each attn2 layer's to_k_ip/to_v_ip, once: [2 (cond, uncond), 4, C].
        tokens = torch.cat([cond_tokens.reshape(1, -1, cond_tokens.shape[-1]), uncond_tokens.reshape(1, -1, uncond_tokens.shape[-1])]).float()
        self.context_kv_master: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in LAYERS:
            k_w = to_k_ip[layer.cross_index].float()
            v_w = to_v_ip[layer.cross_index].float()
            self.context_kv_master[layer.block] = (F.linear(tokens, k_w), F.linear(tokens, v_w))
        self._device_cache: dict[tuple, Any] = {}  # per run: device tensors (heads-split bank, tokens, ...)
        self._gate_sigmas: Optional[torch.Tensor] = None
        self._gate_value: tuple[Gate, Gate] = (False, False)
        self._call_cache: dict[tuple, tuple] = {}  # per UNet call: gated masks
        # per run: (object, context) gates decided from the sampler's schedule (None where they change
        # during the run), or None outside a sampling run
        self._plan: Optional[tuple[Optional[bool], Optional[bool]]] = None
        self._cfg_seen = False  # this run evaluates cond and uncond (a CFG guider)

    def _use_model_sampling(self, model_sampling: Any) -> None:
        """sigma <-> timestep of the model being sampled (a later ModelSampling* node may replace it)."""
        self.model_sampling = model_sampling
        self.sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))

    def __deepcopy__(self, memo: dict) -> "MomaRun":
        return self

    # --- run lifecycle (ComfyUI wrappers / hooks) ----------------------------------------------
    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """OUTER_SAMPLE wrapper: a fresh subject mask for every sampling run, device copies freed after."""
        self.tracker.reset()
        self._gate_sigmas = None
        self._call_cache.clear()
        self._cfg_seen = False
        patcher = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        if patcher is not None:
            self._use_model_sampling(patcher.get_model_object("model_sampling"))
        # CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...): the schedule, still on the host
        self._plan = self.schedule_plan(kwargs.get("sigmas", args[3] if len(args) > 3 else None))
        try:
            return executor(*args, **kwargs)
        finally:
            self.tracker.reset()
            self._device_cache.clear()
            self._call_cache.clear()
            self._gate_sigmas = None
            self._plan = None
            if self.bank is not None:
                self.bank.release_device_copy()

    def calc_cond_batch(self, executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: Any,
                        model_options: dict) -> Any:
        """CALC_COND_BATCH wrapper: one model evaluation (cond and uncond, in one UNet call or several).

        Its subject maps become the mask of the next evaluation. Extra evaluations that guidance add-ons make
        inside a CFG step with only one of the two (PAG, SAG) are not evaluations of the sampler: their maps
        are dropped, so they neither skew nor replace the mask.
        """
        self.tracker.discard_partial()
        out = executor(model, conds, x_in, timestep, model_options)
        has_uncond = len(conds) > 1 and conds[1] is not None
        self._cfg_seen = self._cfg_seen or has_uncond
        if has_uncond or not self._cfg_seen:
            self.tracker.finish_evaluation()
        else:
            self.tracker.discard_partial()
        return out

    # --- per-call helpers ------------------------------------------------------------------------
    def schedule_plan(self, sigmas: Any) -> Optional[tuple[Optional[bool], Optional[bool]]]:
        """(object, context) gates for a whole sampling run over ``sigmas``: True/False where a gate holds over
        the schedule's whole range, None where it changes during the run (then it is a device-side multiplier)."""
        if not isinstance(sigmas, torch.Tensor):
            return None
        values = [s for s in sigmas.detach().float().cpu().reshape(-1).tolist() if s > 0.0]
        if not values:
            return None
        low, high = min(values) / SCHEDULE_MARGIN, max(values) * SCHEDULE_MARGIN
        # MoMA acts on a sigma interval: [sigma_end, sigma_start] (context), and t < 950 in it (object); the
        # timestep grows with sigma
        if high < self.sigma_end or low > self.sigma_start:
            return False, False
        context = True if self.sigma_end <= low and high <= self.sigma_start else None

        def object_on(sigma: float) -> bool:
            timestep = self.model_sampling.timestep(torch.tensor([sigma], dtype=torch.float32))
            return self.sigma_end <= sigma <= self.sigma_start and int(timestep.reshape(-1)[0]) < SELF_PATH_MAX_TIMESTEP

        low_on = object_on(low)
        if low_on and object_on(high):
            obj: Optional[bool] = True
        elif not low_on and low >= self.sigma_end:
            obj = False  # already off at the lowest sigma of the run
        else:
            obj = None
        return obj, context

    def gates(self, extra_options: dict) -> tuple[Gate, Gate]:
        """(object path, context path) for this UNet call; computed once per call, not per layer. Inside a
        sampling run no device value is read on the host: a gate that changes during the run is a 0/1 tensor."""
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return False, False
        if sigmas is not self._gate_sigmas:
            schedule, plan = extra_options.get("sample_sigmas"), None
            if schedule is not None:  # inside a sampling run
                if self._plan is None:  # outer_sample did not see the schedule: read it, once per run
                    self._plan = self.schedule_plan(schedule)
                plan = self._plan
            self._gate_value = self._decide_gates(sigmas, plan)
            self._gate_sigmas = sigmas
        return self._gate_value

    def _decide_gates(self, sigmas: torch.Tensor, plan: Optional[tuple[Optional[bool], Optional[bool]]]
                      ) -> tuple[Gate, Gate]:
        sigma = sigmas.reshape(-1)[:1]
        if plan is None:  # a lone UNet call outside a sampling run: read the sigma
            in_window = self.sigma_end <= float(sigma.item()) <= self.sigma_start
            timestep = int(self.model_sampling.timestep(sigma).reshape(-1)[0].item())
            return in_window and timestep < SELF_PATH_MAX_TIMESTEP, in_window
        object_on, context_on = plan
        if object_on is not None and context_on is not None:
            return object_on, context_on
        window: Gate = context_on if context_on is not None else (sigma >= self.sigma_end) & (sigma <= self.sigma_start)
        if object_on is None:
            below = self.model_sampling.timestep(sigma) < SELF_PATH_MAX_TIMESTEP
            return (below if window is True else below & window), window
        return object_on, window

    def run_inactive(self) -> bool:
        """MoMA is off for this whole sampling run (its window misses the schedule): no subject maps needed."""
        return self._plan == (False, False)

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        value = self._device_cache.get(key)
        if value is None:
            value = build()
            self._device_cache[key] = value
        return value

    def subject_columns(self, text_length: int, device: torch.device) -> Optional[torch.Tensor]:
        """Subject-token columns in a context of ``text_length`` tokens (every repeat of the prompt)."""
        if not self.subject_positions:
            return None

        def build() -> Optional[torch.Tensor]:
            period = self.prompt_length if text_length % self.prompt_length == 0 else text_length
            cols = [p + r * period for r in range(text_length // period) for p in self.subject_positions if p < period]
            return torch.tensor(cols, dtype=torch.long, device=device) if cols else None

        return self._cached(("cols", text_length, str(device)), build)

    def context_heads(self, block: tuple[str, int], chunk_kinds: list[int], batch: int, heads: int,
                      device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's projected MoMA tokens for every row, split into heads: [len(chunks) * batch, H, 4, D]."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            k_all, v_all = self.context_kv_master[block]
            order = torch.tensor([0 if kind == COND else 1 for kind in chunk_kinds]).repeat_interleave(batch)
            return tuple(moma_attention.split_heads(t[order].to(device, dtype), heads).contiguous() for t in (k_all, v_all))

        return self._cached(("ctx", block, tuple(chunk_kinds), batch, heads, str(device), dtype), build)

    def bank_heads(self, block: tuple[str, int], heads: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference bank of one layer on device, split into heads: [1, H, M, D] (once per run)."""
        def build() -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.bank.on(device, dtype)
            return tuple(moma_attention.split_heads(t[block].unsqueeze(0), heads).contiguous() for t in (keys, values))

        return self._cached(("bank", block, heads, str(device), dtype), build)

    def subject_indicator(self, text_length: int, rows: int, heads: int, dim_head: int, device: torch.device,
                          dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Values that make an attention over the text keys return the subject mass (see moma.attention)."""
        columns = self.subject_columns(text_length, device)
        if columns is None:
            return None
        return self._cached(
            ("subject", text_length, rows, heads, dim_head, str(device), dtype),
            lambda: moma_attention.subject_indicator_values(text_length, columns, heads, dim_head, rows, device, dtype))

    def spatial_mask(self, extra_options: dict, grid: tuple[int, int], chunks: int, batch: int,
                     device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Subject mask (from the previous evaluation) times the optional user mask: [rows, h*w, 1] or None."""
        mask = self.tracker.rows(grid, chunks, device, dtype)
        if self.attn_mask is None:
            return mask

        def build() -> torch.Tensor:
            user = self.attn_mask.float()
            user = user.reshape(-1, 1, user.shape[-2], user.shape[-1])
            user = F.interpolate(user, size=grid, mode="bilinear", align_corners=False)
            user = user.reshape(user.shape[0], -1, 1)
            if user.shape[0] not in (1, batch):
                user = user[:1]
            user = user.expand(batch, -1, -1).repeat(chunks, 1, 1)
            return user.to(device, dtype)

        user_rows = self._cached(("user", tuple(grid), chunks, batch, str(device), dtype), build)
        return user_rows if mask is None else mask * user_rows

    def gated_mask(self, gate: Gate, term: str, extra_options: dict, grid: tuple[int, int], chunks: int, batch: int,
                   device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """What a MoMA term is multiplied by: the spatial mask, times the gate when that is a device tensor
        (built once per UNet call and grid); None for 1."""
        mask = self.spatial_mask(extra_options, grid, chunks, batch, device, dtype)
        if gate is True:
            return mask
        key = (term, tuple(grid), chunks, batch, str(device), dtype)
        cached = self._call_cache.get(key)
        if cached is not None and cached[0] is gate and cached[1] is mask:
            return cached[2]
        factor = gate.to(dtype).view(1, 1, 1)
        gated = factor if mask is None else mask * factor
        self._call_cache[key] = (gate, mask, gated)
        return gated

    # --- the two terms ---------------------------------------------------------------------------
    def object_term(self, layer: AttentionLayer, out: torch.Tensor, q: torch.Tensor, extra_options: dict) -> torch.Tensor:
        gain = self.object_gains[layer.block]
        if self.bank is None or gain == 0.0:
            return out
        gate = self.gates(extra_options)[0]
        if gate is False:
            return out
        ref_k, ref_v = self.bank_heads(layer.block, extra_options["n_heads"], q.device, q.dtype)
        ref_out = moma_attention.reference_attention_heads(q, ref_k, ref_v, sdpa=_sdpa)
        chunks = len(extra_options["cond_or_uncond"])
        grid = _layer_grid(extra_options, q.shape[1])
        mask = self.gated_mask(gate, "object", extra_options, grid, chunks, q.shape[0] // chunks, q.device, q.dtype)
        return moma_attention.add_object_shortcut(out, ref_out, gain, mask)

    def cross_attention(self, layer: AttentionLayer, previous: Optional[ReplacePatch], q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        chunk_kinds = list(extra_options["cond_or_uncond"])
        chunks = len(chunk_kinds)
        rows, tokens = q.shape[0], q.shape[1]
        batch = rows // chunks
        # The text output is what ComfyUI computes without MoMA (or the previous patch's); the subject map
        # is one more fused attention over the same keys (see moma.attention.subject_attention_mass).
        out = previous(q, k, v, extra_options) if previous is not None else _attention(q, k, v, heads, extra_options)
        grid = _layer_grid(extra_options, tokens)
        q_heads = moma_attention.split_heads(q, heads)
        indicator = None if self.run_inactive() else self.subject_indicator(
            k.shape[1], rows, heads, q.shape[-1] // heads, q.device, q.dtype)
        if indicator is not None:
            k_heads = moma_attention.split_heads(k, heads)
            if k_heads.shape[0] != rows:  # a context shared by every row
                k_heads = k_heads.expand(rows, -1, -1, -1)
            subject_probs = moma_attention.subject_attention_mass(q_heads, k_heads, indicator, sdpa=_sdpa)
            self.tracker.add_probs(subject_probs, grid, _latent_grid(extra_options), chunk_kinds)
        gate = self.gates(extra_options)[1]
        if gate is not False:
            token_k, token_v = self.context_heads(layer.block, chunk_kinds, batch, heads, q.device, q.dtype)
            context_out = moma_attention.merge_head_output(_sdpa(q_heads, token_k, token_v), rows, tokens)
            mask = self.gated_mask(gate, "context", extra_options, grid, chunks, batch, q.device, q.dtype)
            out = out + context_out if mask is None else torch.addcmul(out, context_out, mask)
        return out


class _ChainedPatch:
    """Base for our replace patches. Packs stack rather than overwrite each other, in either order:

    - a patch that was at this block before MoMA (e.g. an IPAdapter's) is kept as ``previous`` and called
      instead of plain attention;
    - a pack applied after MoMA finds this patch at its key and ``.add(callback, **kwargs)``s onto it, the
      protocol IPAdapter_plus, PuLID and InstantID share: each added callback runs inside its own sigma
      window (``kwargs["sigma_start"] >= sigma >= kwargs["sigma_end"]``) and its output is added on top of
      MoMA's.

    Every clone of a patched model gets its own copy (``copy_patches_on_clone``), so what a later node adds
    never reaches an earlier model. Our own state lives in ``_moma_*`` attributes: the protocol sets every
    added kwarg as an attribute, which must not clobber them.
    """

    def __init__(self, run: MomaRun, layer: AttentionLayer, previous: Optional[ReplacePatch]) -> None:
        self._moma_run = run
        self._moma_layer = layer
        self._moma_previous = previous
        self.callback: list[Callable[..., torch.Tensor]] = []
        self.kwargs: list[dict] = []
        self.multigpu_kwargs: dict[torch.device, list[dict]] = {}

    @property
    def run(self) -> MomaRun:
        return self._moma_run

    @property
    def layer(self) -> AttentionLayer:
        return self._moma_layer

    @property
    def previous(self) -> Optional[ReplacePatch]:
        return self._moma_previous

    def copy(self) -> "_ChainedPatch":
        """A copy for a model clone: its own lists of added callbacks; the shared run and previous patch."""
        twin = copy.copy(self)
        twin.callback = list(self.callback)
        twin.kwargs = list(self.kwargs)
        twin.multigpu_kwargs = dict(self.multigpu_kwargs)
        return twin

    def __deepcopy__(self, memo: dict) -> "_ChainedPatch":
        # ComfyUI 0.3.75 deep-copies model_options on clone; 0.30 copies only dicts and lists. Either way the
        # clone's patch is made separate by copy_patches_on_clone; here, just never copy the run or its tensors.
        return self.copy()

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        """Another pack's term, run after MoMA's inside its sigma window (IPAdapter's ``Attn2Replace.add``)."""
        for name in ("sigma_start", "sigma_end"):
            if name not in kwargs:
                raise MomaError(
                    f"Another node added an attention callback onto MoMA's patch at block {self.layer.block} "
                    f"without '{name}'; MoMA runs added callbacks the way IPAdapter does, in their sigma window."
                )
        self.callback.append(callback)
        self.kwargs.append(kwargs)
        for key, value in kwargs.items():
            if not key.startswith("_moma_"):
                setattr(self, key, value)

    def _with_added(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    extra_options: dict) -> torch.Tensor:
        if not self.callback:
            return out
        sigmas = extra_options.get("sigmas")
        # the protocol's own reading of sigma (one host read per call, only when a pack added callbacks)
        sigma = float(sigmas.detach().cpu().reshape(-1)[0]) if sigmas is not None else 999999999.9
        device_kwargs = self.multigpu_kwargs.get(q.device, self.kwargs)
        dtype = out.dtype
        for callback, window, kwargs in zip(self.callback, self.kwargs, device_kwargs):
            if window["sigma_start"] >= sigma >= window["sigma_end"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype)

    def to(self, device_or_dtype: Any, *args: Any, **kwargs: Any) -> "_ChainedPatch":
        """ComfyUI calls .to(device) / .to(dtype) on patches when it loads the model: passed on to the previous
        patch; for multi-GPU, per-device copies of the added callbacks' tensor kwargs, as the protocol does."""
        if self.previous is not None and hasattr(self.previous, "to"):
            self._moma_previous = self.previous.to(device_or_dtype)
        if (isinstance(device_or_dtype, torch.device) and device_or_dtype.type != "cpu" and self.kwargs
                and device_or_dtype not in self.multigpu_kwargs):
            per_device = []
            for added in self.kwargs:
                moved = {}
                for key, value in added.items():
                    if torch.is_tensor(value):
                        value = value.to(device_or_dtype)
                    elif hasattr(value, "create_multigpu_clone"):
                        value.create_multigpu_clone(device_or_dtype)
                    moved[key] = value
                per_device.append(moved)
            self.multigpu_kwargs[device_or_dtype] = per_device
        return self

    def models(self) -> list:
        return self.previous.models() if self.previous is not None and hasattr(self.previous, "models") else []


class MomaSelfAttentionPatch(_ChainedPatch):
    """attn1 replace: self-attention (or the previous patch) + the masked object shortcut."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = _attention(q, k, v, extra_options["n_heads"], extra_options)
        out = self.run.object_term(self.layer, out, q, extra_options)
        return self._with_added(out, q, k, v, extra_options)


class MomaCrossAttentionPatch(_ChainedPatch):
    """attn2 replace: text attention (or the previous patch) + the 4 MoMA context tokens, masked; records
    the subject-token attention map for the next evaluation's subject mask."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.run.cross_attention(self.layer, self.previous, q, k, v, extra_options)
        return self._with_added(out, q, k, v, extra_options)


def _existing_replace(model_options: dict, kind: str, block: tuple[str, int]) -> tuple[Optional[ReplacePatch], tuple]:
    """The replace patch ComfyUI would call for this block now, and the key it sits under."""
    patches = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    for key in ((block[0], block[1], 0), block):
        if key in patches:
            return patches[key], key
    return None, block


CLONE_CALLBACK_KEY = "moma"


def copy_patches_on_clone(source: Any, clone: Any) -> None:
    """ON_CLONE callback: the clone gets its own copy of every MoMA patch, so callbacks another pack ``.add()``s
    to the clone never reach ``source``. Needed on ComfyUI 0.30, whose clone copies only the dicts and lists of
    model_options (0.3.75 deep-copied them)."""
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {})
    for kind in ("attn1", "attn2"):
        table = replaces.get(kind)
        if not table:
            continue
        for key, patch in list(table.items()):
            if isinstance(patch, _ChainedPatch):
                table[key] = patch.copy()


def install_moma_patches(model: Any, run: MomaRun) -> None:
    """Install MoMA on a *cloned* ModelPatcher: 16 attn1 + 16 attn2 replaces (chained onto existing ones),
    the post-CFG hook that closes each evaluation, and the wrapper that scopes state to one run."""
    for layer in LAYERS:
        for kind, patch_cls in (("attn1", MomaSelfAttentionPatch), ("attn2", MomaCrossAttentionPatch)):
            previous, key = _existing_replace(model.model_options, kind, layer.block)
            patch = patch_cls(run, layer, previous)
            model.set_model_patch_replace(patch, kind, *key)
    model.model_options["disable_cfg1_optimization"] = True  # the mask recipe needs the uncond half at cfg 1 too
    on_clone = comfy.patcher_extension.CallbacksMP.ON_CLONE
    if copy_patches_on_clone not in model.get_callbacks(on_clone, CLONE_CALLBACK_KEY):
        model.add_callback_with_key(on_clone, CLONE_CALLBACK_KEY, copy_patches_on_clone)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, run.key, run.outer_sample)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, run.key, run.calc_cond_batch)


class ReferenceCapturePatch:
    """attn1 replace used only during the reference pass: plain self-attention, and records this
    layer's K_ref/V_ref at the object's tokens."""

    def __init__(self, layer: AttentionLayer, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor,
                 object_mask: torch.Tensor, store: dict) -> None:
        self.layer = layer
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.object_mask = object_mask
        self.store = store

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        grid = _layer_grid(extra_options, k.shape[1])
        index = object_token_index(self.object_mask, grid)
        k_ref, v_ref = capture_reference_layer(k[:1], v[:1], self.to_k_ip, self.to_v_ip, index)
        self.store[self.layer.block] = (k_ref, v_ref, grid, index is None)
        return _attention(q, k, v, extra_options["n_heads"], extra_options)


def reference_capture_options(to_k_ip: dict[int, torch.Tensor], to_v_ip: dict[int, torch.Tensor],
                              object_mask: torch.Tensor, sigma: torch.Tensor, store: dict) -> dict:
    """Minimal transformer_options for the reference pass: only our capture patches run (other packs'
    patches are left out: they may expect sampling state that a lone evaluation does not have)."""
    attn1 = {
        layer.block: ReferenceCapturePatch(layer, to_k_ip[layer.self_index], to_v_ip[layer.self_index], object_mask, store)
        for layer in LAYERS
    }
    return {"patches_replace": {"attn1": attn1}, "cond_or_uncond": [COND], "sigmas": sigma}


__all__ = [
    "LAYER_BY_BLOCK",
    "MomaRun",
    "install_moma_patches",
    "reference_capture_options",
]
