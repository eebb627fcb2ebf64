"""Apply MoMA Attention: clone the MODEL and install MoMA's attn1/attn2 patches (spec 3.3-3.6, 4)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..moma.context import check_context_tokens
from ..moma.errors import MomaError
from ..moma.reference import ReferenceBank
from ..moma.sd15 import LAYERS
from . import host_contract
from .common import adapter_of, advanced_input, require_sd15, warn_if_other_adapter
from .node_api import io
from .patches import MomaRun, install_moma_patches
from .run_state import object_timestep_ceiling
from .text_encode import clip_token_ids, sd_tokenizer, subject_tokens
from .types import MomaContext, MomaModel, MomaRef
from .validation import apply_problems, apply_settings, choice_problem, verdict, warn_idle_windows

log = logging.getLogger(__name__)
ADVANCED = advanced_input()  # ComfyUI 0.30 folds these inputs away as "advanced"; 0.3.75 shows them all

PRESET_STRENGTH = {"context": 1.0, "texture": 0.4}  # the reference README's recommended values
DEFAULT_STRENGTH = 1.0  # the strength widget's default: an untouched widget is never warned about


def preset_strength(preset: str, strength: float) -> float:
    """The strength ``preset`` samples with: its fixed value, or ``strength`` for 'custom'. A strength set away from
    the widget's default (and from the preset's value) that a preset overrides is warned about."""
    if preset not in PRESET_STRENGTH:
        return strength
    fixed = PRESET_STRENGTH[preset]
    if strength not in (DEFAULT_STRENGTH, fixed):
        log.warning(
            "Apply MoMA Attention: preset %r samples with its fixed strength %s; the strength %s you set is "
            "not used. Choose preset 'custom' to use it.",
            preset,
            fixed,
            strength,
        )
    return fixed


def warn_if_other_subject(context: Any, reference: Any) -> str | None:
    """Log (and return) a warning when the reference bank (Feature Grab) and the context name other subjects."""
    words = [" ".join(str(getattr(part, "subject", "") or "").lower().split()) for part in (reference, context)]
    if not all(words) or words[0] == words[1]:
        return None
    message = (
        f"Apply MoMA Attention: Self-Attention Feature Grab's subject is {reference.subject!r} but the "
        f"context's (LLaVA Context Encoder or Load MoMA Context) is {context.subject!r}. MoMA takes both from "
        "one object: give both the same subject word."
    )
    log.warning(message)
    return message


def subject_positions_in_prompt(sd_prompt: str, subject: str) -> tuple[list[int], int]:
    """Subject-token positions in the SD prompt as ComfyUI tokenises it (77-token chunks, BOS at 0) and the
    prompt's token length. As the reference: the first BPE id of each subject word, every occurrence."""
    token_ids = clip_token_ids(sd_tokenizer().tokenize_with_weights(sd_prompt))
    return subject_tokens(subject, sd_prompt).positions(token_ids), len(token_ids)


def apply_moma(
    model: Any,
    moma_model: Any,
    context: Any,
    reference: ReferenceBank | None,
    strength: float,
    start_percent: float,
    end_percent: float,
    attn_mask: torch.Tensor | None = None,
    *,
    context_strength: float = 1.0,
    object_window: tuple[float, float] = (0.0, 1.0),
    context_window: tuple[float, float] = (0.0, 1.0),
    block_weights: str = "",
    prompt: str | None = None,
) -> Any:
    """A clone of ``model`` with MoMA installed; ``model`` itself is left untouched.

    ``strength``/``object_window``: the object path (reference features in self-attention); ``context_strength``/
    ``context_window``: the context path (the 4 LLaVA tokens in cross-attention); both act only inside
    ``start_percent``..``end_percent`` too. ``block_weights`` scales both per layer (see
    ``moma.sd15.parse_block_weights``). ``prompt``: the positive prompt's text when it is not the context's
    ``sd_prompt`` (e.g. one prompt naming two subjects): the subject tokens are looked up in it.
    """
    host_contract.require(host_contract.APPLY)
    # the numbers and texts again where they are used (linked values are only known now): nodes/validation.py
    layer_weights = apply_settings(
        MomaApply,
        {
            "strength": strength,
            "start_percent": start_percent,
            "end_percent": end_percent,
            "context_strength": context_strength,
            "object_start_percent": object_window[0],
            "object_end_percent": object_window[1],
            "context_start_percent": context_window[0],
            "context_end_percent": context_window[1],
            "block_weights": block_weights,
            "prompt": prompt,
        },
    )
    require_sd15(model, "Apply MoMA Attention")
    adapter = adapter_of(moma_model)
    for name in ("cond_tokens", "uncond_tokens", "sd_prompt", "subject"):
        if not hasattr(context, name):
            raise MomaError(
                "Apply MoMA Attention: 'context' must come from LLaVA Context Encoder or Load MoMA Context."
            )
    check_context_tokens(context, adapter.projector, "Apply MoMA Attention")
    warn_if_other_adapter(context, moma_model)
    prompt_text = prompt if prompt and prompt.strip() else context.sd_prompt
    positions, prompt_length = subject_positions_in_prompt(prompt_text, context.subject)
    subject = subject_tokens(context.subject, prompt_text)
    if not positions:
        log.warning(
            "Apply MoMA Attention: subject %r not found in the prompt %r; the MoMA terms stay unmasked.",
            context.subject,
            prompt_text,
        )
    model_sampling = model.get_model_object("model_sampling")
    warn_idle_windows(
        start_percent, end_percent, tuple(object_window), tuple(context_window), model_sampling, object_timestep_ceiling
    )
    object_gains = {
        layer.block: float(strength)
        * float(adapter.scale_learnable[layer.self_index].reshape(-1)[0])
        * layer_weights[layer.block]
        for layer in LAYERS
    }
    context_gains = {layer.block: float(context_strength) * layer_weights[layer.block] for layer in LAYERS}
    run = MomaRun(
        to_k_ip=adapter.to_k_ip,
        to_v_ip=adapter.to_v_ip,
        object_gains=object_gains,
        cond_tokens=context.cond_tokens,
        uncond_tokens=context.uncond_tokens,
        bank=reference,
        subject_positions=positions,
        prompt_length=prompt_length,
        model_sampling=model_sampling,
        start_percent=start_percent,
        end_percent=end_percent,
        attn_mask=attn_mask,
        context_gains=context_gains,
        object_window=tuple(object_window),
        context_window=tuple(context_window),
        subject=subject,
    )
    patched = model.clone()
    install_moma_patches(patched, run)
    return patched


class MomaApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaApply",
            display_name="Apply MoMA Attention",
            category="MoMA",
            description=(
                "Patches an SD1.5 MODEL with MoMA: the 4 LLaVA context tokens in every cross-attention and the "
                "reference object's features in every self-attention (off for t >= 950), both restricted to a "
                "subject mask found on the fly from the prompt's subject tokens. Presets: context = strength 1.0 "
                "(new scene, same object; up to 1.2 for more exact details), texture = 0.4 (new texture; up to 0.6, "
                "lower follows the prompt better). Encode the positive prompt with MoMA Text Encode (its text is where "
                "the subject tokens are looked up), or feed the positive CLIPTextEncode the Context Encoder's sd_prompt."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="An SD1.5 model (any checkpoint, LoRAs, other patches); it is cloned, not changed."
                ),
                MomaModel.Input("moma_model", tooltip="From MoMA Loader."),
                MomaContext.Input("context", tooltip="From LLaVA Context Encoder or Load MoMA Context."),
                MomaRef.Input("reference", tooltip="From Self-Attention Feature Grab."),
                io.Combo.Input(
                    "preset",
                    options=["context", "texture", "custom"],
                    default="context",
                    tooltip="context: strength fixed at 1.0; texture: fixed at 0.4 (the strength widget is "
                    "then not used); custom: the strength widget below.",
                ),
                io.Float.Input(
                    "strength",
                    default=DEFAULT_STRENGTH,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="Object-detail strength, used ONLY with preset 'custom' (the other presets fix "
                    "it: context 1.0, texture 0.4; a different value here is ignored, with a "
                    "warning). Good values: context 1.0-1.2, texture 0.4-0.6.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress where MoMA starts acting.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sampling progress where MoMA stops acting.",
                ),
                io.Mask.Input(
                    "attn_mask",
                    optional=True,
                    tooltip="Optional: restricts MoMA to this region of the generated image (multiplies the "
                    "subject mask). A batch of masks applies one per latent batch item (e.g. per "
                    "animation frame); one mask applies to all.",
                ),
                io.Float.Input(
                    "context_strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    optional=True,
                    tooltip="Weight of the context path: the 4 LLaVA tokens added in every cross-attention "
                    "(1.0 = the reference implementation; 0 = object features only).",
                    **ADVANCED,
                ),
                io.Float.Input(
                    "object_start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="Where the object path (reference features) starts, within start/end_percent.",
                    **ADVANCED,
                ),
                io.Float.Input(
                    "object_end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="Where the object path stops, within start/end_percent.",
                    **ADVANCED,
                ),
                io.Float.Input(
                    "context_start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="Where the context path (LLaVA tokens) starts, within start/end_percent.",
                    **ADVANCED,
                ),
                io.Float.Input(
                    "context_end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="Where the context path stops, within start/end_percent.",
                    **ADVANCED,
                ),
                io.String.Input(
                    "block_weights",
                    default="",
                    optional=True,
                    tooltip="Per-layer weights of both paths. Empty: all 1.0. Either 16 numbers (input_1 "
                    "input_2 input_4 input_5 input_7 input_8 output_3 ... output_11 middle_0) or "
                    "name=value pairs, e.g. 'input=0, middle=0.5' or 'output_5=0.3' (0..5).",
                    **ADVANCED,
                ),
                io.String.Input(
                    "prompt",
                    optional=True,
                    force_input=True,
                    tooltip="Optional: the positive prompt's text, when it is not this context's sd_prompt "
                    "(e.g. one prompt naming two subjects, each with its own Apply node): the "
                    "subject's tokens are looked up in it. Not needed with MoMA Text Encode, whose text wins.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def validate_inputs(
        cls,
        preset: str | None = None,
        strength: float | None = None,
        start_percent: float | None = None,
        end_percent: float | None = None,
        context_strength: float | None = None,
        object_start_percent: float | None = None,
        object_end_percent: float | None = None,
        context_start_percent: float | None = None,
        context_end_percent: float | None = None,
        block_weights: str | None = None,
        prompt: str | None = None,
    ) -> bool | str:
        # Every FLOAT finite and in range (ComfyUI lets NaN through, and checks nothing for inputs taken here),
        # each start before its end, block_weights parsed, the texts within their limits.
        values = {
            "preset": preset,
            "strength": strength,
            "start_percent": start_percent,
            "end_percent": end_percent,
            "context_strength": context_strength,
            "object_start_percent": object_start_percent,
            "object_end_percent": object_end_percent,
            "context_start_percent": context_start_percent,
            "context_end_percent": context_end_percent,
            "block_weights": block_weights,
            "prompt": prompt,
        }
        problems = apply_problems(cls, values)
        problem = choice_problem("preset", preset, (*PRESET_STRENGTH, "custom")) if not problems else None
        return verdict(problems + ([problem] if problem else []), values)

    @classmethod
    def execute(
        cls,
        model,
        moma_model,
        context,
        reference,
        preset,
        strength,
        start_percent,
        end_percent,
        attn_mask=None,
        context_strength=1.0,
        object_start_percent=0.0,
        object_end_percent=1.0,
        context_start_percent=0.0,
        context_end_percent=1.0,
        block_weights="",
        prompt=None,
    ) -> io.NodeOutput:
        if preset not in (*PRESET_STRENGTH, "custom"):  # ComfyUI 0.3.x does not check V3 combo values
            raise MomaError(f"Apply MoMA Attention: preset {preset!r} is not one of context, texture, custom.")
        strength = preset_strength(preset, strength)
        warn_if_other_subject(context, reference)
        return io.NodeOutput(
            apply_moma(
                model,
                moma_model,
                context,
                reference,
                strength,
                start_percent,
                end_percent,
                attn_mask,
                context_strength=context_strength,
                object_window=(object_start_percent, object_end_percent),
                context_window=(context_start_percent, context_end_percent),
                block_weights=block_weights,
                prompt=prompt,
            )
        )
