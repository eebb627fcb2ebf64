"""ComfyUI glue for MoMA's attention: the attn1/attn2 replace patches, what one Apply node fixed (``MomaRun``),
the wrappers that give each sampling run its own state (``run_state.MomaRunState``) and the reference pass's patches.

All maths lives in ``moma.attention`` / ``moma.subject_mask``; this module only installs and chains patches.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import torch
import torch.nn.functional as F

from ..moma.errors import MomaError
from ..moma.reference import AutoReferenceBank, ReferenceBank, capture_reference_layer, object_token_index
from ..moma.sd15 import LAYER_BY_BLOCK, LAYERS, AttentionLayer
from ..moma.subject_mask import COND, SubjectMaskTracker, SubjectTokens
from . import run_state
from .run_state import (
    FRAMES_KEY,
    RUN_STATES_KEY,
    CallFrame,
    MomaRunState,
    ReplacePatch,
    comfy_attention,
    latent_size,
    layer_grid,
    object_timestep_ceiling,
    window_frames,
)

log = logging.getLogger(__name__)

# Samplers evaluate the model at sigmas within the schedule's range; euler's churn raises one by at most
# sqrt(2). A gate is decided for the whole run only if it holds over the range widened by this factor.
SCHEDULE_MARGIN = math.sqrt(2.0)


class MomaRun:
    """One Apply node's MoMA: weights, gains, windows, the reference bank (all fixed once applied).

    Shared by every clone of the patched model and never changed while sampling. What a sampling run
    changes (the subject mask, device copies, gates) lives in a ``MomaRunState`` that ``outer_sample`` makes
    for each run and puts in that run's own copy of the transformer_options (as ComfyUI's EasyCache does),
    so two samplers on one patched model (hires fix, a refiner pass) never share or race on it. Calls outside
    a sampling run (a lone ``apply_model``) use ``idle``.
    """

    def __init__(
        self,
        *,
        to_k_ip: dict[int, torch.Tensor],
        to_v_ip: dict[int, torch.Tensor],
        object_gains: dict[tuple[str, int], float],
        cond_tokens: torch.Tensor,
        uncond_tokens: torch.Tensor,
        bank: ReferenceBank | AutoReferenceBank | None,
        subject_positions: list[int],
        prompt_length: int,
        model_sampling: Any,
        start_percent: float,
        end_percent: float,
        attn_mask: torch.Tensor | None = None,
        context_gains: dict[tuple[str, int], float] | None = None,
        object_window: tuple[float, float] = (0.0, 1.0),
        context_window: tuple[float, float] = (0.0, 1.0),
        subject: SubjectTokens | None = None,
    ) -> None:
        self.key = f"moma-{uuid.uuid4().hex[:8]}"
        self.bank = bank
        self.object_gains = object_gains
        self.context_gains = context_gains if context_gains is not None else {layer.block: 1.0 for layer in LAYERS}
        self.subject_positions = subject_positions
        self.prompt_length = prompt_length
        self.subject = subject  # the subject's token ids, to find them in a tagged positive conditioning's text
        # each path acts inside the node's start/end window and its own (percent of sampling)
        self.object_percent = (max(start_percent, object_window[0]), min(end_percent, object_window[1]))
        self.context_percent = (max(start_percent, context_window[0]), min(end_percent, context_window[1]))
        self.model_sampling = model_sampling
        self.attn_mask = attn_mask  # [B?, H, W] user MASK, or None
        # The 4 context tokens through each attn2 layer's to_k_ip/to_v_ip, once: [2 (cond, uncond), 4, C]; the
        # context gain is folded into V (attention is linear in V).
        tokens = torch.cat(
            [cond_tokens.reshape(1, -1, cond_tokens.shape[-1]), uncond_tokens.reshape(1, -1, uncond_tokens.shape[-1])]
        ).float()
        self.context_kv_master: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in LAYERS:
            k_w = to_k_ip[layer.cross_index].float()
            v_w = to_v_ip[layer.cross_index].float()
            gain = self.context_gains[layer.block]
            values = F.linear(tokens, v_w)
            self.context_kv_master[layer.block] = (F.linear(tokens, k_w), values if gain == 1.0 else values * gain)
        self.last_subject_mask: torch.Tensor | None = None  # [B, H, W] on the CPU, from the last finished run
        self.idle = MomaRunState(self, model_sampling, idle=True)

    def __deepcopy__(self, memo: dict) -> MomaRun:
        return self

    # test and debugging conveniences: the state of calls made outside a sampling run
    @property
    def tracker(self) -> SubjectMaskTracker:
        return self.idle.tracker

    def sigma_windows(self, model_sampling: Any) -> tuple[tuple[float, float], tuple[float, float]]:
        """((low, high) sigma of the object path, (low, high) of the context path) for this model's schedule."""

        def window(percent: tuple[float, float]) -> tuple[float, float]:
            start, end = percent
            if start > end:  # an empty window
                return math.inf, -math.inf
            return float(model_sampling.percent_to_sigma(end)), float(model_sampling.percent_to_sigma(start))

        return window(self.object_percent), window(self.context_percent)

    def schedule_plan(self, sigmas: Any, model_sampling: Any = None) -> tuple[bool | None, bool | None] | None:
        """(object, context) gates for a whole sampling run over ``sigmas``: True/False where a gate holds over
        the schedule's whole range, None where it changes during the run (then it is a device-side multiplier)."""
        if not isinstance(sigmas, torch.Tensor):
            return None
        values = [s for s in sigmas.detach().float().cpu().reshape(-1).tolist() if s > 0.0]
        if not values:
            return None
        model_sampling = model_sampling if model_sampling is not None else self.model_sampling
        (o_low, o_high), (c_low, c_high) = self.sigma_windows(model_sampling)
        low, high = min(values) / SCHEDULE_MARGIN, max(values) * SCHEDULE_MARGIN
        if high < c_low or low > c_high:
            context: bool | None = False
        else:
            context = True if c_low <= low and high <= c_high else None

        ceiling = object_timestep_ceiling(model_sampling)

        def object_on(sigma: float) -> bool:
            timestep = model_sampling.timestep(torch.tensor([sigma], dtype=torch.float32))
            return o_low <= sigma <= o_high and float(timestep.reshape(-1)[0]) < ceiling

        low_on = object_on(low)
        if high < o_low or low > o_high:
            obj: bool | None = False
        elif low_on and object_on(high):
            obj = True
        elif not low_on and low >= o_low:
            obj = False  # already off at the lowest sigma of the run (past the window or t >= 950)
        else:
            obj = None
        return obj, context

    def state(self, extra_options: dict) -> MomaRunState:
        """The state of the sampling run this call belongs to."""
        states = extra_options.get(RUN_STATES_KEY)
        if states is not None:
            found = states.get(self.key)
            if found is not None:
                return found
        return self.idle

    # --- run lifecycle (ComfyUI wrappers) ----------------------------------------------------------
    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """OUTER_SAMPLE wrapper: a fresh state for this sampling run, in the run's own copy of the options."""
        guider = getattr(executor, "class_obj", None)
        patcher = getattr(guider, "model_patcher", None)
        model_sampling = patcher.get_model_object("model_sampling") if patcher is not None else self.model_sampling
        state = MomaRunState(self, model_sampling)
        # CFGGuider.outer_sample(noise, latent_image, sampler, sigmas, ...): the schedule, still on the host
        sigmas = kwargs.get("sigmas", args[3] if len(args) > 3 else None)
        state.plan = self.schedule_plan(sigmas, model_sampling)
        if isinstance(self.bank, AutoReferenceBank):  # Feature Grab 'auto': the reference pass at this run's size
            noise = kwargs.get("noise", args[0] if args else None)
            state.bank = self.bank.bank_for_latent(*latent_size(noise))
        original = getattr(guider, "model_options", None)
        if original is not None:
            warn_if_shadowed(original, self)
            options = comfy.model_patcher.create_model_options_clone(original)
            transformer_options = options.setdefault("transformer_options", {})
            transformer_options[RUN_STATES_KEY] = {**transformer_options.get(RUN_STATES_KEY, {}), self.key: state}
            guider.model_options = options
        try:
            result = executor(*args, **kwargs)
        finally:
            if original is not None:
                guider.model_options = original
        self.last_subject_mask = state.tracker.final_mask_on_cpu()  # only after a run that finished
        return result

    def predict_noise(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """PREDICT_NOISE wrapper: one sampler step (the guider's prediction at one sigma: the sampler's evaluation
        and whatever guidance add-ons evaluate after it). Every evaluation inside reads the mask the step began
        with; the mask from the sampler's evaluation becomes current when the step ends. A sampler that
        evaluates the model twice per step (heun, dpm_2) predicts twice: each prediction is a step here."""
        # CFGGuider.predict_noise(x, timestep, model_options, seed)
        model_options = kwargs.get("model_options", args[2] if len(args) > 2 else None) or {}
        states = model_options.get("transformer_options", {}).get(RUN_STATES_KEY) or {}
        state = states.get(self.key)
        if state is None:  # not inside this run's outer_sample: nothing to hold
            return executor(*args, **kwargs)
        state.begin_step()
        try:
            return executor(*args, **kwargs)
        finally:
            state.end_step()

    def calc_cond_batch(
        self, executor: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: Any, model_options: dict
    ) -> Any:
        """CALC_COND_BATCH wrapper: one model evaluation (cond and uncond, in one UNet call or several).

        The sampler's evaluation's subject maps become the mask of the next step. Extra evaluations that guidance
        add-ons make inside a CFG step with only one of the two (PAG, SAG) are not evaluations of the sampler:
        they read the step's mask and their maps are dropped, so they neither skew nor replace the mask.
        """
        transformer_options = model_options.get("transformer_options", {})
        state = self.state(transformer_options)
        frames = window_frames(transformer_options)
        sampler_evaluation = state.begin_evaluation(
            conds, frames if frames is not None and len(frames) == x_in.shape[0] else None
        )
        try:
            out = executor(model, conds, x_in, timestep, model_options)
        except BaseException:
            state.finish_evaluation(False)
            raise
        state.finish_evaluation(sampler_evaluation)
        return out

    def apply_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """APPLY_MODEL wrapper: one UNet call. Puts the call's ``CallFrame`` in its transformer_options, built
        here, outside any compiled region (what MoMA's terms read inside a torch.compile trace), and hands the
        subject maps a compiled call recorded in it to the tracker afterwards."""
        # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        args = list(args)
        in_args = len(args) > 5
        options = args[5] if in_args else kwargs.get("transformer_options")
        x = args[0] if args else kwargs.get("x")
        if not isinstance(options, dict) or "cond_or_uncond" not in options or not isinstance(x, torch.Tensor):
            return executor(*args, **kwargs)
        state = self.state(options)
        context = args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        frame = state.call_frame(x, context, options, _compute_dtype(getattr(executor, "class_obj", None), x))
        options = {**options, FRAMES_KEY: {**options.get(FRAMES_KEY, {}), self.key: frame}}
        if in_args:
            args[5] = options
        else:
            kwargs["transformer_options"] = options
        out = executor(*args, **kwargs)
        state.collect(frame, (int(x.shape[-2]), int(x.shape[-1])))
        return out

    # --- the two terms (in the call's run state, or inside a compiled call from its frame) -----------
    def call_frame(self, extra_options: dict) -> CallFrame | None:
        """This UNet call's frame when MoMA's terms must read it (inside a torch.compile trace), else None."""
        if not run_state.use_call_frame():
            return None
        frames = extra_options.get(FRAMES_KEY)
        return frames.get(self.key) if frames is not None else None

    def object_term(
        self, layer: AttentionLayer, out: torch.Tensor, q: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        frame = self.call_frame(extra_options)
        if frame is not None:
            return frame.object_term(self, layer, out, q, extra_options)
        return self.state(extra_options).object_term(layer, out, q, extra_options)

    def cross_attention(
        self,
        layer: AttentionLayer,
        previous: ReplacePatch | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra_options: dict,
    ) -> torch.Tensor:
        frame = self.call_frame(extra_options)
        if frame is not None:
            return frame.cross_attention(self, layer, previous, q, k, v, extra_options)
        return self.state(extra_options).cross_attention(layer, previous, q, k, v, extra_options)


def _compute_dtype(base_model: Any, x: torch.Tensor) -> torch.dtype:
    """The dtype ComfyUI runs this UNet in (its manual-cast dtype when the weights are stored in another)."""
    try:
        return base_model.manual_cast_dtype or base_model.get_dtype()
    except AttributeError:
        return x.dtype


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

    def __init__(self, run: MomaRun, layer: AttentionLayer, previous: ReplacePatch | None) -> None:
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
    def previous(self) -> ReplacePatch | None:
        return self._moma_previous

    def copy(self) -> _ChainedPatch:
        """A copy for a model clone: its own lists of added callbacks; the shared run and previous patch."""
        twin = copy.copy(self)
        twin.callback = list(self.callback)
        twin.kwargs = list(self.kwargs)
        twin.multigpu_kwargs = dict(self.multigpu_kwargs)
        return twin

    def __deepcopy__(self, memo: dict) -> _ChainedPatch:
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
        self.multigpu_kwargs = {}  # per-device copies are rebuilt for the new list at the next .to(device)
        for key, value in kwargs.items():
            if not key.startswith("_") and not hasattr(type(self), key) and key not in ("callback", "kwargs"):
                setattr(self, key, value)

    def _with_added(
        self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict
    ) -> torch.Tensor:
        if not self.callback:
            return out
        sigmas = extra_options.get("sigmas")
        # the protocol's own reading of sigma (one host read per call, only when a pack added callbacks)
        sigma = float(sigmas.detach().cpu().reshape(-1)[0]) if sigmas is not None else 999999999.9
        device_kwargs = self.multigpu_kwargs.get(q.device)
        if device_kwargs is None or len(device_kwargs) != len(self.kwargs):
            device_kwargs = self.kwargs
        dtype = out.dtype
        for callback, window, kwargs in zip(self.callback, self.kwargs, device_kwargs):
            if window["sigma_start"] >= sigma >= window["sigma_end"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(dtype)

    def to(self, device_or_dtype: Any, *args: Any, **kwargs: Any) -> _ChainedPatch:
        """ComfyUI calls .to(device) / .to(dtype) on patches when it loads the model: passed on to the previous
        patch; for multi-GPU, per-device copies of the added callbacks' tensor kwargs, as the protocol does."""
        if self.previous is not None and hasattr(self.previous, "to"):
            self._moma_previous = self.previous.to(device_or_dtype)
        if (
            isinstance(device_or_dtype, torch.device)
            and device_or_dtype.type != "cpu"
            and self.kwargs
            and device_or_dtype not in self.multigpu_kwargs
        ):
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
            out = comfy_attention(q, k, v, extra_options["n_heads"], extra_options)
        out = self.run.object_term(self.layer, out, q, extra_options)
        return self._with_added(out, q, k, v, extra_options)


class MomaCrossAttentionPatch(_ChainedPatch):
    """attn2 replace: text attention (or the previous patch) + the 4 MoMA context tokens, masked; records
    the subject-token attention map for the next evaluation's subject mask."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.run.cross_attention(self.layer, self.previous, q, k, v, extra_options)
        return self._with_added(out, q, k, v, extra_options)


def _existing_replace(model_options: dict, kind: str, block: tuple[str, int]) -> tuple[ReplacePatch | None, tuple]:
    """The replace patch ComfyUI would call for this block now, and the key it sits under."""
    patches = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    for key in ((block[0], block[1], 0), block):
        if key in patches:
            return patches[key], key
    return None, block


def shadowing_patches(model_options: dict, run: MomaRun) -> list[tuple[str, tuple[str, int], Any]]:
    """(kind, block, patch) for each layer where the replace patch ComfyUI will call does not lead to ``run``'s
    patch: another node applied after Apply MoMA installed a patch of its own that does not chain (core
    SelfAttentionGuidance at ``("middle", 0, 0)``, which ComfyUI looks up before MoMA's 2-tuple key)."""
    shadowed = []
    for kind in ("attn1", "attn2"):
        for layer in LAYERS:
            patch, _ = _existing_replace(model_options, kind, layer.block)
            link = patch
            while isinstance(link, _ChainedPatch) and link.run is not run:
                link = link.previous
            if not (isinstance(link, _ChainedPatch) and link.run is run):
                shadowed.append((kind, layer.block, patch))
    return shadowed


def warn_if_shadowed(model_options: dict, run: MomaRun) -> None:
    """Once per sampling run: name the layers where a patch applied after MoMA replaced MoMA's (it does not act
    there). Host-side, no tensor read."""
    shadowed = shadowing_patches(model_options, run)
    if not shadowed:
        return
    owners = sorted({getattr(patch, "__qualname__", type(patch).__qualname__) for _, _, patch in shadowed})
    where = ", ".join(f"{kind} {block[0]}_{block[1]}" for kind, block, _ in shadowed)
    log.warning(
        "Apply MoMA Attention (subject %r): a node applied after it replaced MoMA's attention patch at %s "
        "(%s) without passing on to it, so MoMA does not act there. Apply that node (e.g. Self-Attention "
        "Guidance) before Apply MoMA Attention.",
        run.subject.subject if run.subject is not None else "?",
        where,
        ", ".join(owners),
    )


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


def moma_runs_of(model: Any) -> list[MomaRun]:
    """The MoMA applications on a MODEL, in the order they were applied (each Apply node's run once)."""
    table = (
        getattr(model, "model_options", {}).get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    )
    runs: list[MomaRun] = []
    for patch in table.values():
        chain = []
        while isinstance(patch, _ChainedPatch):
            chain.append(patch.run)
            patch = patch.previous
        for run in reversed(chain):  # innermost = applied first
            if run not in runs:
                runs.append(run)
        if runs:
            break  # every block carries the same chain
    return runs


def install_moma_patches(model: Any, run: MomaRun) -> None:
    """Install MoMA on a *cloned* ModelPatcher: 16 attn1 + 16 attn2 replaces (chained onto existing ones) and
    the wrappers: one state per sampling run (OUTER_SAMPLE), one mask per sampler step (PREDICT_NOISE), the
    sampler's evaluation vs add-on passes (CALC_COND_BATCH), the frame of each UNet call (APPLY_MODEL)."""
    for layer in LAYERS:
        for kind, patch_cls in (("attn1", MomaSelfAttentionPatch), ("attn2", MomaCrossAttentionPatch)):
            previous, key = _existing_replace(model.model_options, kind, layer.block)
            patch = patch_cls(run, layer, previous)
            model.set_model_patch_replace(patch, kind, *key)
    model.model_options["disable_cfg1_optimization"] = True  # the mask recipe needs the uncond half at cfg 1 too
    on_clone = comfy.patcher_extension.CallbacksMP.ON_CLONE
    if copy_patches_on_clone not in model.get_callbacks(on_clone, CLONE_CALLBACK_KEY):
        model.add_callback_with_key(on_clone, CLONE_CALLBACK_KEY, copy_patches_on_clone)
    wrappers = comfy.patcher_extension.WrappersMP
    model.add_wrapper_with_key(wrappers.OUTER_SAMPLE, run.key, run.outer_sample)
    model.add_wrapper_with_key(wrappers.PREDICT_NOISE, run.key, run.predict_noise)
    model.add_wrapper_with_key(wrappers.CALC_COND_BATCH, run.key, run.calc_cond_batch)
    model.add_wrapper_with_key(wrappers.APPLY_MODEL, run.key, run.apply_model)


class ReferenceCapturePatch:
    """attn1 replace used only during the reference pass: plain self-attention, and records this
    layer's K_ref/V_ref at the object's tokens."""

    def __init__(
        self,
        layer: AttentionLayer,
        to_k_ip: torch.Tensor,
        to_v_ip: torch.Tensor,
        object_mask: torch.Tensor,
        store: dict,
    ) -> None:
        self.layer = layer
        self.to_k_ip = to_k_ip
        self.to_v_ip = to_v_ip
        self.object_mask = object_mask
        self.store = store

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        grid = layer_grid(extra_options, k.shape[1])
        index = object_token_index(self.object_mask, grid)
        k_ref, v_ref = capture_reference_layer(k[:1], v[:1], self.to_k_ip, self.to_v_ip, index)
        self.store[self.layer.block] = (k_ref, v_ref, grid, index is None)
        return comfy_attention(q, k, v, extra_options["n_heads"], extra_options)


def reference_capture_options(
    to_k_ip: dict[int, torch.Tensor],
    to_v_ip: dict[int, torch.Tensor],
    object_mask: torch.Tensor,
    sigma: torch.Tensor,
    store: dict,
) -> dict:
    """Minimal transformer_options for the reference pass: only our capture patches run (other packs'
    patches are left out: they may expect sampling state that a lone evaluation does not have)."""
    attn1 = {
        layer.block: ReferenceCapturePatch(
            layer, to_k_ip[layer.self_index], to_v_ip[layer.self_index], object_mask, store
        )
        for layer in LAYERS
    }
    return {"patches_replace": {"attn1": attn1}, "cond_or_uncond": [COND], "sigmas": sigma}


__all__ = [
    "LAYER_BY_BLOCK",
    "MomaRun",
    "install_moma_patches",
    "reference_capture_options",
]
