"""MoMA under torch.compile: core TorchCompileModel (ComfyUI 0.30 drops dynamo's guards on transformer_options,
0.3.75 keeps them) and torch.compile as other packs do it (guards kept). Compiled MoMA gives eager MoMA's numbers,
adds no recompile and no graph break to what a plain model has over whole sampling runs (another seed, another
denoise: another schedule plan), and no frame of it hits the recompile limit (after which dynamo silently runs a
frame eagerly).

Compiling the whole UNet costs minutes on a 2-core CPU (inductor ~2 min, aot_eager ~20 s per model), so the tests
compile one transformer block (``BLOCKS``: MoMA's patches run inside it; core's helper takes such keys): the same
guards on the same per-call structures as the whole model, in seconds. docs/addons.md has the whole-UNet
measurements (and benchmarks/sampling.py counts them). The models use SDPA attention (ComfyUI's
``optimized_attention_override``, plain and MoMA alike): ComfyUI's CPU default, sub-quadratic attention, reads the
free memory through psutil at every call, which breaks the graph in every layer of a plain model too; GPUs
default to SDPA. Recompiles are counted with the ``aot_eager`` backend (dynamo's guards do not depend on the
backend); inductor, which needs a C++ compiler and Python's headers (.ci/run installs g++ and python3-dev), runs
once for the numbers.
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import host
import pytest
import torch
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import grab_reference_features
from dynamo_count import watch_dynamo

pytestmark = pytest.mark.slow

RUNS = ((1, 1.0), (2, 0.6))  # (seed, denoise) of the runs compared: the second has another seed and another plan


def sdpa_attention(func, *args, **kwargs):
    """An ``optimized_attention_override``: ComfyUI's own SDPA attention for every attention call."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(sd15_models, moma_model, moma_context, test_images, load_image_tensor):
    import nodes

    model, clip, vae = sd15_models
    image, mask = load_image_tensor(*test_images["rgb"])
    bank = grab_reference_features(model, moma_model, vae, clip, image, mask, moma_context.subject, 3, resolution=64)
    sdpa_model = model.clone()
    sdpa_model.model_options["transformer_options"]["optimized_attention_override"] = sdpa_attention
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    moma = apply_moma(sdpa_model, moma_model, moma_context, bank, 1.0, 0.0, 1.0)
    return sdpa_model, moma, bank, positive, negative


def _runs(model, positive, negative) -> list[torch.Tensor]:
    """The latents of the RUNS (euler, 2 steps, 64x64; the first full-denoise step is at t = 999, where the
    object path is off, and has no subject mask yet)."""
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return [
        nodes.common_ksampler(model, seed, 2, 7.5, "euler", "normal", positive, negative, latent, denoise=denoise)[0][
            "samples"
        ]
        for seed, denoise in RUNS
    ]


@pytest.fixture(scope="module")
def eager(setup):
    """The RUNS' latents of the plain model and of MoMA, uncompiled."""
    plain, moma, _, positive, negative = setup
    return _runs(plain, positive, negative), _runs(moma, positive, negative)


def _compiled_runs(compiled, positive, negative):
    """Sample the RUNS with a freshly compiled model; what dynamo did meanwhile (a frame past the recompile limit
    fails instead of running eagerly)."""
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), watch_dynamo() as seen:
        outs = _runs(compiled, positive, negative)
    return outs, seen


# The forward of the UNet's first SpatialTransformer (attn1 and attn2 with MoMA's patches): the forward, not the
# module (the UNet dispatches on the module's class); one block (dynamo's cache is per code object: the other
# blocks' shapes would be recompiles of it, for a plain model too).
BLOCKS = ["diffusion_model.input_blocks.1.1.forward"]


def _torch_compile_model(model, backend):
    """Core TorchCompileModel, its own execute (the node's backend list is checked only by the executor), with the
    compile restricted to BLOCKS (core's ``set_torch_compile_wrapper`` ``keys``)."""
    import functools

    import comfy_extras.nodes_torch_compile as nodes_torch_compile

    original = nodes_torch_compile.set_torch_compile_wrapper
    nodes_torch_compile.set_torch_compile_wrapper = functools.partial(original, keys=BLOCKS)
    try:
        return nodes_torch_compile.TorchCompileModel.execute(model, backend)[0]
    finally:
        nodes_torch_compile.set_torch_compile_wrapper = original


def _other_packs_compile(model, backend):
    """torch.compile of UNet blocks as other packs do it (object patches; dynamo keeps every guard)."""
    compiled = model.clone()
    for key in BLOCKS:
        compiled.add_object_patch(key, torch.compile(compiled.get_model_object(key), backend=backend))
    return compiled


def _max_diff(outs, refs) -> float:
    return max(float((out - ref).abs().max()) for out, ref in zip(outs, refs))


def _assert_close(outs, refs, atol: float, order: str = "") -> None:
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=atol, msg=lambda text: f"{order}: {text}")


COMPILES = host.cases_for_hosts(
    [
        ("TorchCompileModel", _torch_compile_model),  # 0.30: guards on transformer_options dropped; 0.3.75: kept
        ("other packs", _other_packs_compile),  # guards kept (as the node on 0.3.75)
    ],
    {"TorchCompileModel"},
)


@pytest.mark.parametrize(("how", "compile_model"), COMPILES)
def test_moma_adds_no_recompiles_and_no_graph_breaks(setup, eager, moma_model, moma_context, how, compile_model):
    """Plain vs MoMA (applied before the compile; for TorchCompileModel also after it), over the RUNS."""
    plain, moma, bank, positive, negative = setup
    plain_eager, moma_eager = eager
    plain_outs, plain_seen = _compiled_runs(compile_model(plain, "aot_eager"), positive, negative)
    assert plain_seen.recompiles == [] and plain_seen.graph_breaks == {} and plain_seen.limit_hits == []
    _assert_close(plain_outs, plain_eager, atol=1e-3)
    orders = {"MoMA, then compile": lambda: compile_model(moma, "aot_eager")}
    if how == "TorchCompileModel":
        orders["compile, then MoMA"] = lambda: apply_moma(
            compile_model(plain, "aot_eager"), moma_model, moma_context, bank, 1.0, 0.0, 1.0
        )
    for order, make in orders.items():
        outs, seen = _compiled_runs(make(), positive, negative)
        print(
            f"\n{how}, {order}: {seen.summary()} (plain: {plain_seen.summary()}); "
            f"max abs diff to eager {_max_diff(outs, moma_eager):.3g} (plain: {_max_diff(plain_outs, plain_eager):.3g})"
        )
        assert seen.recompiles == [] and seen.graph_breaks == {} and seen.limit_hits == [], order
        assert seen.compiled_frames == plain_seen.compiled_frames == len(BLOCKS), order
        _assert_close(outs, moma_eager, atol=1e-3, order=order)  # the compiled path's numbers are eager MoMA's
    assert _max_diff(moma_eager, plain_eager) > 0.1  # and MoMA acted (far above the noise)


def _cpp_toolchain() -> str | None:
    """Why inductor cannot build CPU kernels here, or None."""
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler (g++)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python headers (python3-dev)"
    return None


@pytest.mark.default_host_only
def test_compiled_moma_equals_eager_moma_under_torch_compile_model(setup, eager):
    """TorchCompileModel with inductor on ComfyUI 0.30, which drops dynamo's guards on transformer_options (a
    compiled frame keeps whatever it saw there when traced): compiled MoMA gives eager MoMA's latents within
    floating-point noise over the RUNS (before, on the whole UNet: 0.3% off, max abs 3 in the latents: the first
    step's missing mask stayed baked in). (MoMA after the node: test_moma_adds_no_recompiles_and_no_graph_breaks.)"""
    missing = _cpp_toolchain()
    if missing:
        pytest.skip(f"inductor needs a C++ toolchain: {missing} (.ci/run installs g++ and python3-dev)")
    _, moma, _, positive, negative = setup
    plain_eager, moma_eager = eager
    outs, seen = _compiled_runs(_torch_compile_model(moma, "inductor"), positive, negative)
    print(f"\ninductor, MoMA then TorchCompileModel: {seen.summary()}, max abs diff {_max_diff(outs, moma_eager):.3g}")
    assert seen.recompiles == [] and seen.graph_breaks == {} and seen.limit_hits == []
    _assert_close(outs, moma_eager, atol=2e-2)
    assert _max_diff(moma_eager, plain_eager) > 0.1  # MoMA acted (far above the noise)
