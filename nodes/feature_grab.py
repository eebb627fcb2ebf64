"""Self-Attention Feature Grab: one UNet pass over the reference picture at t=0 -> MOMA_REF (spec 3.2)."""
from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.model_management
from comfy.ldm.models.autoencoder import DiagonalGaussianRegularizer
from comfy_api.latest import io

from ..moma.errors import MomaError
from ..moma.reference import (
    REFERENCE_RESOLUTION,
    REFERENCE_TEXT_TOKENS,
    ReferenceBank,
    binarise_object_mask,
    generation_resolution,
    noised_reference_latent,
    reference_pixel_size,
    resize_reference_image,
    sample_latent_posterior,
)
from .common import adapter_of, require_sd15, warn_if_constant_picture
from .patches import reference_capture_options
from .types import MomaModel, MomaRef

log = logging.getLogger(__name__)


def encode_reference_latent(vae: Any, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """VAE latent of the reference as a *sample* of the posterior (the reference's latent_dist.sample()),
    drawn from ``generator``. Falls back to ComfyUI's VAE Encode (the posterior mode) for VAEs that are not
    the SD1.5 KL autoencoder. pixels: [1, H, W, 3] 0..1 -> [1, 4, H/8, W/8], unscaled."""
    first_stage = vae.first_stage_model
    is_kl = (
        hasattr(first_stage, "encoder") and hasattr(first_stage, "quant_conv")
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


def grab_reference_features(model: Any, moma_model: Any, vae: Any, clip: Any, image: torch.Tensor,
                            mask: torch.Tensor, subject: str, seed: int,
                            resolution: int = REFERENCE_RESOLUTION) -> ReferenceBank:
    """Run the reference pass on the wired MODEL and return the object bank of all 16 attn1 layers."""
    require_sd15(model, "Self-Attention Feature Grab")
    adapter = adapter_of(moma_model)
    if image.dim() != 4:
        raise MomaError(f"Feature Grab: reference image has shape {tuple(image.shape)}; expected a ComfyUI IMAGE [B, H, W, C].")
    if not subject.strip():
        raise MomaError("Feature Grab: 'subject' is empty; give the object's word, e.g. 'car' or 'dog'.")
    if image.shape[0] > 1 or (mask.dim() == 3 and mask.shape[0] > 1):
        log.warning("Feature Grab: batch of %d references given; using the first (MoMA takes one reference).", image.shape[0])
    warn_if_constant_picture(image[0], "Feature Grab")
    pixel_size = reference_pixel_size(int(image.shape[1]), int(image.shape[2]), int(resolution))
    pixels = resize_reference_image(image[:1], pixel_size)
    object_mask = binarise_object_mask(mask[:1] if mask.dim() == 3 else mask, pixel_size)
    if not bool(object_mask.any()):
        log.warning("Feature Grab: the object mask is empty; the reference attends to the whole picture.")

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    latent = encode_reference_latent(vae, pixels, generator)

    tokens = clip.tokenize(subject.strip())
    subject_cond = clip.encode_from_tokens(tokens)[:, :REFERENCE_TEXT_TOKENS]  # [1, 73, 768]

    base_model = model.model
    model_sampling = model.get_model_object("model_sampling")
    sigma0 = model_sampling.sigma(torch.zeros(1))
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    z = base_model.process_latent_in(latent.float()).to(device)
    x = noised_reference_latent(z, float(sigma0.reshape(-1)[0]), generator)
    store: dict = {}
    options = reference_capture_options(adapter.to_k_ip, adapter.to_v_ip, object_mask, sigma0.to(device), store)
    with torch.no_grad():
        base_model.apply_model(x, sigma0.to(device), c_crossattn=subject_cond.to(device), transformer_options=options)
    if len(store) != 16:
        raise MomaError(f"Feature Grab: the reference pass reached {len(store)} of the 16 SD1.5 attention layers; "
                        "is this an SD1.5 UNet with its standard block layout?")
    offload = comfy.model_management.intermediate_device()
    return ReferenceBank(
        keys={block: entry[0].to(offload) for block, entry in store.items()},
        values={block: entry[1].to(offload) for block, entry in store.items()},
        grids={block: entry[2] for block, entry in store.items()},
        pixel_size=pixel_size,
        object_mask=object_mask.cpu(),
        subject=subject.strip(),
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
                "adapter's to_k_ip/to_v_ip, kept only on the object. Runs once per reference, not per step."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model you sample with (LoRAs applied); the reference pass uses its weights."),
                MomaModel.Input("moma_model", tooltip="From MoMA Loader."),
                io.Vae.Input("vae", tooltip="Encodes the reference picture (the original, not the white-background one)."),
                io.Clip.Input("clip", tooltip="Encodes the subject word for the reference pass."),
                io.Image.Input("image", tooltip="The reference picture of the object; any size or aspect ratio (the first of a batch)."),
                io.Mask.Input("mask", tooltip="The object's mask (e.g. from MoMA Object Masker); background keys are left out."),
                io.String.Input("subject", default="car", tooltip="The object's word, as in the prompt (e.g. 'car', 'teddy bear')."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the VAE posterior sample and the t=0 noise of the reference pass."),
                io.Int.Input("resolution", default=REFERENCE_RESOLUTION, min=64, max=1024, step=64,
                             tooltip="Side of the (square-equivalent) size the reference is encoded at, aspect kept. "
                                     "512 is what MoMA was trained and evaluated with (reference and image both 512). "
                                     "Not used when a latent is connected."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the latent you sample (e.g. from Empty Latent Image). The reference "
                                        "is then encoded at the generation's size (its area, the reference's aspect "
                                        "kept), as MoMA's own pipeline does: the bank matches the image, and sampling "
                                        "at sizes other than 512 is faster. Overrides 'resolution'."),
            ],
            outputs=[MomaRef.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, model, moma_model, vae, clip, image, mask, subject, seed,
                resolution=REFERENCE_RESOLUTION, latent=None) -> io.NodeOutput:
        if latent is not None:
            resolution = resolution_of_latent(latent)
        return io.NodeOutput(grab_reference_features(model, moma_model, vae, clip, image, mask, subject, seed, resolution))


def resolution_of_latent(latent: Any) -> int:
    """Feature Grab's resolution for a connected LATENT: its generation size (see generation_resolution)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() < 4:
        raise MomaError("Feature Grab: 'latent' must be a LATENT (e.g. from Empty Latent Image) with samples "
                        f"[B, C, H, W]; got {type(samples).__name__ if samples is not None else type(latent).__name__}. "
                        "Disconnect it to use 'resolution'.")
    resolution = generation_resolution(int(samples.shape[-2]), int(samples.shape[-1]))
    log.info("Feature Grab: reference encoded for a %dx%d generation (resolution %d).",
             samples.shape[-1] * 8, samples.shape[-2] * 8, resolution)
    return resolution
