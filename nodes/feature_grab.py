"""Self-Attention Feature Grab: one UNet pass over the reference picture at t=0 -> MOMA_REF (spec 3.2)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import comfy.model_management
import torch
from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer

from ..moma.errors import MomaError
from ..moma.reference import (
    AUTO_RESOLUTION,
    REFERENCE_RESOLUTION,
    REFERENCE_TEXT_TOKENS,
    AutoReferenceBank,
    ReferenceBank,
    binarise_object_mask,
    generation_resolution,
    noised_reference_latent,
    reference_pixel_size,
    resize_reference_image,
    sample_latent_posterior,
)
from . import host_contract
from .common import adapter_of, require_sd15, warn_if_constant_picture
from .node_api import io
from .patches import reference_capture_options
from .types import MomaModel, MomaRef
from .validation import checked_inputs, input_problems, verdict

log = logging.getLogger(__name__)


def encode_reference_latent(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latent of the reference as a *sample* of the posterior (the reference's latent_dist.sample()),
    drawn from ``generator``. Falls back to ComfyUI's VAE Encode (the posterior mode) for VAEs that are not
    the SD1.5 KL autoencoder. pixels: [1, H, W, 3] 0..1 -> [1, 4, H/8, W/8], unscaled."""
    first_stage = vae.first_stage_model
    is_kl = (
        hasattr(first_stage, "encoder")
        and hasattr(first_stage, "quant_conv")
        and isinstance(getattr(first_stage, "regularization", None), DiagonalGaussianRegularizer)
        and getattr(first_stage, "bn", None) is None
    )
    if not is_kl:
        log.warning("Feature Grab: VAE %s is not a KL autoencoder; using its mode.", type(first_stage).__name__)
        return vae.encode(pixels)
    comfy.model_management.load_models_gpu([vae.patcher])
    # contiguous: a channels-last view makes torch's CPU GroupNorm less exact (~1e-4 relative off the reference)
    x = vae.process_input(pixels.movedim(-1, 1).contiguous()).to(vae.vae_dtype).to(vae.device)
    with torch.no_grad():
        moments = first_stage.quant_conv(first_stage.encoder(x))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return sample_latent_posterior(mean, logvar, generator).to(vae.output_device)


def _view_masks(image: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """One object mask per reference view: a MASK batch of the image's batch size, or one mask for all views."""
    masks = mask if mask.dim() == 3 else mask.reshape(1, *mask.shape[-2:])
    views = int(image.shape[0])
    if masks.shape[0] == views:
        return list(masks)
    if masks.shape[0] == 1:
        return [masks[0]] * views
    raise MomaError(
        f"Feature Grab: {views} reference pictures but {masks.shape[0]} masks; give one mask per picture "
        "(a MASK batch of the same size) or a single mask for all of them."
    )


def grab_reference_features(
    model: Any,
    moma_model: Any,
    vae: Any,
    clip: Any,
    image: torch.Tensor,
    mask: torch.Tensor,
    subject: str,
    seed: int,
    resolution: int = REFERENCE_RESOLUTION,
) -> ReferenceBank:
    """Run the reference pass on the wired MODEL and return the object bank of all 16 attn1 layers.

    A batch of pictures (views of one object) gives one bank with every view's object keys/values, in batch
    order; a batch of one is MoMA's single reference."""
    return prepare_reference_pass(model, moma_model, vae, clip, image, mask, subject, seed)(int(resolution))


def prepare_reference_pass(
    model: Any, moma_model: Any, vae: Any, clip: Any, image: torch.Tensor, mask: torch.Tensor, subject: str, seed: int
) -> Callable[[int], ReferenceBank]:
    """Check the inputs and encode the subject word now; the returned function runs the reference pass at a
    given resolution (for 'auto', when sampling starts and the generation's size is known)."""
    host_contract.require(host_contract.GRAB)
    require_sd15(model, "Self-Attention Feature Grab")
    adapter = adapter_of(moma_model)
    if image.dim() != 4:
        raise MomaError(
            f"Feature Grab: reference image has shape {tuple(image.shape)}; expected a ComfyUI IMAGE [B, H, W, C]."
        )
    if not subject.strip():
        raise MomaError("Feature Grab: 'subject' is empty; give the object's word, e.g. 'car' or 'dog'.")
    view_masks = _view_masks(image, mask)
    for view in range(image.shape[0]):
        warn_if_constant_picture(
            image[view], "Feature Grab" if image.shape[0] == 1 else f"Feature Grab (picture {view + 1})"
        )
    tokens = clip.tokenize(subject.strip())
    subject_cond = clip.encode_from_tokens(tokens)[:, :REFERENCE_TEXT_TOKENS]  # [1, 73, 768]
    pictures = image.detach().cpu()
    view_masks = [m.detach().cpu() for m in view_masks]

    def grab_at(resolution: int) -> ReferenceBank:
        return _reference_pass(
            model, adapter, vae, pictures, view_masks, subject.strip(), subject_cond, int(seed), int(resolution)
        )

    return grab_at


def _reference_pass(
    model: Any,
    adapter: Any,
    vae: Any,
    pictures: torch.Tensor,
    view_masks: list[torch.Tensor],
    subject: str,
    subject_cond: torch.Tensor,
    seed: int,
    resolution: int,
) -> ReferenceBank:
    pixel_size = reference_pixel_size(int(pictures.shape[1]), int(pictures.shape[2]), resolution)
    base_model = model.model
    model_sampling = model.get_model_object("model_sampling")
    sigma0 = model_sampling.sigma(torch.zeros(1))
    generator = torch.Generator(device="cpu").manual_seed(seed)  # one stream through the views, in batch order
    offload = comfy.model_management.intermediate_device()
    keys: dict = {}
    values: dict = {}
    grids: dict = {}
    object_masks = []
    for view, view_mask in enumerate(view_masks):
        pixels = resize_reference_image(pictures[view : view + 1], pixel_size)
        object_mask = binarise_object_mask(view_mask, pixel_size)
        if not bool(object_mask.any()):
            log.warning(
                "Feature Grab: the object mask%s is empty; the reference attends to the whole picture.",
                "" if len(view_masks) == 1 else f" of picture {view + 1}",
            )
        latent = encode_reference_latent(vae, pixels, generator)
        comfy.model_management.load_models_gpu([model])
        device = model.load_device
        z = base_model.process_latent_in(latent.float()).to(device)
        x = noised_reference_latent(z, float(sigma0.reshape(-1)[0]), generator)
        store: dict = {}
        options = reference_capture_options(adapter.to_k_ip, adapter.to_v_ip, object_mask, sigma0.to(device), store)
        with torch.no_grad():
            base_model.apply_model(
                x, sigma0.to(device), c_crossattn=subject_cond.to(device), transformer_options=options
            )
        if len(store) != 16:
            raise MomaError(
                f"Feature Grab: the reference pass reached {len(store)} of the 16 SD1.5 attention layers; "
                "is this an SD1.5 UNet with its standard block layout?"
            )
        for block, (k_ref, v_ref, grid, _whole) in store.items():
            keys.setdefault(block, []).append(k_ref.to(offload))
            values.setdefault(block, []).append(v_ref.to(offload))
            grids[block] = grid
        object_masks.append(object_mask.cpu())
        comfy.model_management.throw_exception_if_processing_interrupted()
    return ReferenceBank(
        keys={block: parts[0] if len(parts) == 1 else torch.cat(parts) for block, parts in keys.items()},
        values={block: parts[0] if len(parts) == 1 else torch.cat(parts) for block, parts in values.items()},
        grids=grids,
        pixel_size=pixel_size,
        object_mask=object_masks[0] if len(object_masks) == 1 else torch.stack(object_masks).any(0),
        subject=subject,
        resolution=resolution,
        views=len(view_masks),
    )


class MomaFeatureGrab(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaFeatureGrab",
            display_name="Self-Attention Feature Grab",
            category="MoMA",
            description=(
                "MoMA's object path: one UNet evaluation of the wired SD1.5 MODEL on the reference picture at "
                "timestep 0 (subject-only prompt) records each self-attention layer's keys/values through the "
                "adapter's to_k_ip/to_v_ip, kept only on the object. Runs once per reference and size, not per "
                "step; with resolution 0 (auto) it runs when sampling starts, at the size being sampled."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The SD1.5 model you sample with (LoRAs applied); the reference pass uses its weights.",
                ),
                MomaModel.Input("moma_model", tooltip="From MoMA Loader."),
                io.Vae.Input(
                    "vae", tooltip="Encodes the reference picture (the original, not the white-background one)."
                ),
                io.Clip.Input("clip", tooltip="Encodes the subject word for the reference pass."),
                io.Image.Input(
                    "image",
                    tooltip="The reference picture of the object, any size or aspect ratio; a batch "
                    "of pictures (views of the same object) gives one bank holding all of them.",
                ),
                io.Mask.Input(
                    "mask",
                    tooltip="The object's mask (e.g. from MoMA Object Masker); background keys are left "
                    "out. One per picture, or one for all.",
                ),
                io.String.Input(
                    "subject", default="car", tooltip="The object's word, as in the prompt (e.g. 'car', 'teddy bear')."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Seeds the VAE posterior sample and the t=0 noise of the reference pass.",
                ),
                io.Int.Input(
                    "resolution",
                    default=AUTO_RESOLUTION,
                    min=AUTO_RESOLUTION,
                    max=1024,
                    step=64,
                    tooltip="0 (auto, the default): the reference is encoded at the size being sampled (its "
                    "area, the picture's aspect kept), read when sampling starts, as MoMA's own "
                    "pipeline pairs reference and image (both 512 there); a 512x512 generation gets "
                    "exactly the 512 bank, other sizes sample faster. 64..1024: that side instead, "
                    "whatever is sampled. Not used when a latent is connected.",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Optional: the latent you sample (e.g. from Empty Latent Image). The reference "
                    "is then encoded at its size right away (as 'auto' does when sampling "
                    "starts). Overrides 'resolution'.",
                ),
            ],
            outputs=[MomaRef.Output(display_name="reference")],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None) -> bool | str:
        values = {"subject": subject}
        problems = input_problems(cls, values)
        if not problems and subject is not None and not subject.strip():
            problems.append("subject: it is empty; give the object's word, e.g. 'car' or 'dog'.")
        return verdict(problems, values)

    @classmethod
    def execute(
        cls, model, moma_model, vae, clip, image, mask, subject, seed, resolution=AUTO_RESOLUTION, latent=None
    ) -> io.NodeOutput:
        checked_inputs(cls, {"subject": subject})
        if latent is not None:
            resolution = resolution_of_latent(latent)
        elif int(resolution) == AUTO_RESOLUTION:
            reference_pass = prepare_reference_pass(model, moma_model, vae, clip, image, mask, subject, seed)
            return io.NodeOutput(AutoReferenceBank(reference_pass, subject.strip(), int(image.shape[0])))
        elif int(resolution) < 64:
            raise MomaError(f"Feature Grab: resolution {resolution}: use 0 (auto) or 64..1024.")
        return io.NodeOutput(
            grab_reference_features(model, moma_model, vae, clip, image, mask, subject, seed, resolution)
        )


def resolution_of_latent(latent: Any) -> int:
    """Feature Grab's resolution for a connected LATENT: its generation size (see generation_resolution)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() < 4:
        raise MomaError(
            "Feature Grab: 'latent' must be a LATENT (e.g. from Empty Latent Image) with samples "
            f"[B, C, H, W]; got {type(samples).__name__ if samples is not None else type(latent).__name__}. "
            "Disconnect it to use 'resolution'."
        )
    resolution = generation_resolution(int(samples.shape[-2]), int(samples.shape[-1]))
    log.info(
        "Feature Grab: reference encoded for a %dx%d generation (resolution %d).",
        samples.shape[-1] * 8,
        samples.shape[-2] * 8,
        resolution,
    )
    return resolution
