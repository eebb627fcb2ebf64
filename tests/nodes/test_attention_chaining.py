"""MoMA beside what newer ComfyUIs install themselves: an attn2 replace patch at the 3-tuple key
``(block, index, transformer_index)`` (core's comfy_api attention-residual helper, ComfyUI ~0.38), in either order,
through ComfyUI's own transformer block; and a ModelPatcher subclass with an extra constructor argument (upstream's
``fast_disk``) through MoMA's clone."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from comfyui_moma.moma.sd15 import LAYERS
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.patches import MomaRun, _ChainedPatch, install_moma_patches

BLOCK = ("input", 1)  # SD1.5's first cross-attention block: 320 channels, 8 heads of 40, text width 768
WIDTH, HEADS, TEXT = 320, 8, 768
GRID = 8  # an 8x8 latent: 64 image tokens
RESIDUAL_GAIN = 0.3


class AttentionResidualPatch:
    """A stand-in of core's attention-residual helper's patch, as upstream ~0.38 writes it: the patch it found (or
    plain attention) plus its own term, here attention of q over the keys halved, times a gain."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra_options["n_heads"]
        out = (
            self.previous(q, k, v, extra_options) if self.previous is not None else optimized_attention(q, k, v, heads)
        )
        return out + RESIDUAL_GAIN * optimized_attention(q, 0.5 * k, v, heads)


def install_attention_residual(model: Any, block: tuple[str, int], transformer_index: int = 0) -> Any:
    """What the helper does: on a clone, chain the attn2 patch found at the 3-tuple key or else the 2-tuple key, and
    install its own at the 3-tuple key."""
    patched = model.clone()
    table = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    three = (block[0], block[1], transformer_index)
    previous = table.get(three, table.get(block))
    patched.set_model_attn2_replace(AttentionResidualPatch(previous), block[0], block[1], transformer_index)
    return patched


def residual_term_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RESIDUAL_GAIN x softmax(q (k/2)^T / sqrt(d)) v per head, written out."""
    b, n, _ = q.shape
    d = WIDTH // HEADS
    qh, kh, vh = (t.reshape(b, -1, HEADS, d).transpose(1, 2).double() for t in (q, 0.5 * k, v))
    weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return RESIDUAL_GAIN * (weights @ vh).transpose(1, 2).reshape(b, n, WIDTH)


@pytest.fixture(scope="module")
def transformer_block():
    """ComfyUI's own BasicTransformerBlock at SD1.5's first cross-attention layer's size, seeded weights."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    block = BasicTransformerBlock(WIDTH, HEADS, WIDTH // HEADS, context_dim=TEXT)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter.shape[-1]))
    return block.eval()


def base_patcher() -> Any:
    """A real ModelPatcher (around a one-weight module: these tests only use its model_options)."""
    import comfy.model_patcher

    module = torch.nn.Linear(1, 1)
    return comfy.model_patcher.ModelPatcher(module, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def moma_on(model: Any, moma_model: Any) -> Any:
    """MoMA's patches on a clone of ``model``, the adapter's real to_k_ip/to_v_ip and fixed context tokens (a fresh
    run each time, so no subject mask carries over between the compared evaluations)."""
    import comfy.model_sampling

    generator = torch.Generator().manual_seed(5)
    adapter = moma_model.adapter
    run = MomaRun(
        to_k_ip=adapter.to_k_ip,
        to_v_ip=adapter.to_v_ip,
        object_gains={layer.block: 0.0 for layer in LAYERS},
        cond_tokens=torch.randn(1, 4, TEXT, generator=generator),
        uncond_tokens=torch.randn(1, 4, TEXT, generator=generator),
        bank=None,
        subject_positions=[],
        prompt_length=77,
        model_sampling=comfy.model_sampling.ModelSamplingDiscrete(),
        start_percent=0.0,
        end_percent=1.0,
    )
    patched = model.clone()
    install_moma_patches(patched, run)
    return patched


def evaluate(block: Any, model: Any) -> dict[str, torch.Tensor]:
    """One forward of ComfyUI's block with ``model``'s transformer_options, as a UNet call passes them (CFG rows
    cond then uncond): attn2's input (after its norm), the text context, and attn2's output (after to_out)."""
    import comfy.model_sampling

    seen: dict[str, torch.Tensor] = {}

    def attn2_in(n, context, value, extra_options):
        seen["n"], seen["context"] = n, context
        return n, context, value

    def attn2_out(n, extra_options):
        seen["out"] = n
        return n

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, GRID * GRID, WIDTH, generator=generator)
    context = torch.randn(2, 77, TEXT, generator=generator)
    sigma = comfy.model_sampling.ModelSamplingDiscrete().sigma(torch.tensor([500.0]))
    options = copy.copy(model.model_options.get("transformer_options", {}))
    options.update(
        block=BLOCK,
        block_index=0,
        cond_or_uncond=[0, 1],
        sigmas=sigma.expand(2),
        activations_shape=[2, WIDTH, GRID, GRID],
        original_shape=[2, 4, GRID, GRID],
        patches={"attn2_patch": [attn2_in], "attn2_output_patch": [attn2_out]},
    )
    with torch.no_grad():
        block(x, context=context, transformer_options=options)
    return seen


def test_moma_chains_with_a_three_tuple_key_residual_in_either_order(transformer_block, moma_model) -> None:
    """Residual helper then MoMA, and MoMA then residual helper: ComfyUI's block calls the patch at the 3-tuple key,
    which runs the other; both give MoMA's own output plus the residual's term computed by hand."""
    plain = base_patcher()
    moma_only = evaluate(transformer_block, moma_on(plain, moma_model))
    residual_then_moma_model = moma_on(install_attention_residual(plain, BLOCK), moma_model)
    moma_then_residual_model = install_attention_residual(moma_on(plain, moma_model), BLOCK)
    three = (*BLOCK, 0)
    table = residual_then_moma_model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert isinstance(table[three], _ChainedPatch) and isinstance(table[three].previous, AttentionResidualPatch)
    table = moma_then_residual_model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert isinstance(table[three], AttentionResidualPatch) and isinstance(table[three].previous, _ChainedPatch)

    attn2 = transformer_block.attn2
    with torch.no_grad():
        q = attn2.to_q(moma_only["n"])
        k, v = attn2.to_k(moma_only["context"]), attn2.to_v(moma_only["context"])
        residual = residual_term_by_hand(q, k, v) @ attn2.to_out[0].weight.double().T  # to_out: linear, bias once
    expected = moma_only["out"].double() + residual
    plain_out = evaluate(transformer_block, plain)["out"]
    assert float((moma_only["out"] - plain_out).abs().max()) > 1e-3  # MoMA's context term is really there
    assert float(residual.abs().max()) > 1e-3  # and so is the residual's
    for model in (residual_then_moma_model, moma_then_residual_model):
        seen = evaluate(transformer_block, model)
        torch.testing.assert_close(seen["n"], moma_only["n"], rtol=0, atol=1e-6)
        torch.testing.assert_close(seen["out"].double(), expected, rtol=1e-4, atol=1e-4)


class FastDiskModelPatcher:
    """Built lazily (ComfyUI is imported by then): a ModelPatcher subclass with an extra constructor argument that
    its clone() passes on, as upstream's ModelPatcher does with ``fast_disk``."""

    @staticmethod
    def make() -> type:
        import comfy.model_patcher

        class Patcher(comfy.model_patcher.ModelPatcher):
            def __init__(
                self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False
            ):
                super().__init__(model, load_device, offload_device, size, weight_inplace_update=weight_inplace_update)
                self.fast_disk = fast_disk

            def clone(self, *args, **kwargs):
                twin = super().clone(*args, **kwargs)
                twin.fast_disk = self.fast_disk
                return twin

        return Patcher


def unet_call(model: Any, context: torch.Tensor) -> torch.Tensor:
    """One CFG-batched UNet evaluation of ``model`` at t=500 on a fixed 16x16 latent (rows uncond, cond)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    device = comfy.model_management.get_torch_device()
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0])).to(device)
    options = copy.copy(model.model_options["transformer_options"])
    options.update(cond_or_uncond=[1, 0], sigmas=sigma)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x = torch.cat([latent, latent]).to(device) * math.sqrt(1 + float(sigma) ** 2)
    with torch.no_grad():
        out = model.model.apply_model(x, sigma.expand(2), c_crossattn=context.to(device), transformer_options=options)
    return out.float().cpu()


@pytest.mark.slow
def test_a_model_patcher_subclass_with_extra_arguments_survives_moma(sd15_models, moma_model, moma_context) -> None:
    """MoMA only clones: the patched model keeps the subclass and its argument, its patches stay off the model it
    came from, a later clone gets its own copies, and the UNet computes what MoMA on a plain ModelPatcher does."""
    base = sd15_models[0]
    patcher_class = FastDiskModelPatcher.make()
    fast = patcher_class(base.model, base.load_device, base.offload_device, base.model_size(), fast_disk=True)
    patched = apply_moma(fast, moma_model, moma_context, None, 1.0, 0.0, 1.0)
    assert type(patched) is patcher_class and patched.fast_disk is True and patched.model is base.model
    assert "patches_replace" not in fast.model_options.get("transformer_options", {})
    table = patched.model_options["transformer_options"]["patches_replace"]
    assert {kind: len(table[kind]) for kind in ("attn1", "attn2")} == {"attn1": 16, "attn2": 16}
    later = patched.clone()
    assert type(later) is patcher_class and later.fast_disk is True
    later_table = later.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(later_table[layer.block] is not table["attn2"][layer.block] for layer in LAYERS)
    _, clip, _ = sd15_models
    context = torch.cat(
        [clip.encode_from_tokens(clip.tokenize("")), clip.encode_from_tokens(clip.tokenize(moma_context.sd_prompt))]
    )
    on_plain = apply_moma(base, moma_model, moma_context, None, 1.0, 0.0, 1.0)
    torch.testing.assert_close(unet_call(patched, context), unet_call(on_plain, context), rtol=0, atol=0)
