"""Feature Grab hands the VAE encoder a contiguous (channels-first) picture: torch's CPU GroupNorm is less exact on
a channels-last view of the IMAGE, which put the reference latent ~1e-4 (relative) off the reference's."""

from __future__ import annotations

from pathlib import Path

import torch
from comfyui_moma.nodes.feature_grab import encode_reference_latent


def _fixture_vae(sd15_checkpoint: Path):
    """ComfyUI's VAE from the SD1.5 fixture's first_stage_model tensors only (as VAELoader builds it)."""
    import comfy.sd
    from safetensors import safe_open

    prefix = "first_stage_model."
    with safe_open(str(sd15_checkpoint), framework="pt", device="cpu") as handle:
        sd = {key[len(prefix) :]: handle.get_tensor(key).float() for key in handle.keys() if key.startswith(prefix)}
    return comfy.sd.VAE(sd=sd)


def test_reference_latent_is_the_contiguous_encode_sample(comfy_host, sd15_checkpoint: Path) -> None:
    vae = _fixture_vae(sd15_checkpoint)
    encoder = vae.first_stage_model.encoder
    pixels = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(4))  # a ComfyUI IMAGE, channels last
    seen: list[torch.Tensor] = []
    hook = encoder.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        latent = encode_reference_latent(vae, pixels, torch.Generator().manual_seed(11))
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0].is_contiguous(), seen[0].stride()

    # re-derivation: 2x-1 of a channels-first copy, the KL encoder, a posterior draw N(mean, exp(logvar))
    x = (pixels.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format) * 2 - 1).to(vae.vae_dtype)
    with torch.no_grad():
        moments = vae.first_stage_model.quant_conv(encoder(x.to(vae.device))).float()
    mean, logvar = moments[:, :4], moments[:, 4:]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(11))
    expected = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise.to(mean.device)
    assert latent.shape == (1, 4, 6, 8)
    assert torch.equal(latent.cpu(), expected.cpu())
