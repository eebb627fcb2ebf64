"""Apply MoMA Attention / Feature Grab behaviour in the real host: gates, strength, isolation, chaining,
determinism, and the whole graph through ComfyUI's executor with several samplers and sizes."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
from pathlib import Path

import comfy_exec
import host
import numpy as np
import peer_packs
import pytest
import torch
from comfy_exec import run_api_workflow
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.sd15 import LAYERS
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import grab_reference_features
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_bank(sd15_models, moma_model, moma_context, test_images, load_image_tensor):
    model, clip, vae = sd15_models
    image, mask = load_image_tensor(*test_images["rgb"])
    return grab_reference_features(model, moma_model, vae, clip, image, mask, moma_context.subject, 11, resolution=128)


def _unet(model, latent, t, context, rows=(1, 0)):
    """One CFG-batched UNet evaluation (ComfyUI's chunk order) of ``model`` at timestep ``t``."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    device = comfy.model_management.get_torch_device()
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigma(torch.tensor([float(t)])).to(device)
    options = copy.copy(model.model_options["transformer_options"])
    options.update(cond_or_uncond=list(rows), sigmas=sigma)
    x = torch.cat([latent] * len(rows)).to(device) * math.sqrt(1 + float(sigma) ** 2)
    with torch.no_grad():
        out = model.model.apply_model(
            x, sigma.expand(x.shape[0]), c_crossattn=context.to(device), transformer_options=options
        )
    return out.float().cpu()


@pytest.fixture(scope="module")
def cfg_context(sd15_models, moma_context):
    _, clip, _ = sd15_models
    cond = clip.encode_from_tokens(clip.tokenize(moma_context.sd_prompt))
    uncond = clip.encode_from_tokens(clip.tokenize(""))
    return torch.cat([uncond, cond])


LATENT = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_apply_leaves_the_input_model_untouched(sd15_models, moma_model, moma_context, reference_bank):
    model = sd15_models[0]
    before = copy.deepcopy(model.model_options)
    wrappers_before = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()}
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    assert model.model_options == before
    assert {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in model.wrappers.items()} == wrappers_before
    replaces = patched.model_options["transformer_options"]["patches_replace"]
    assert set(replaces["attn1"]) == set(replaces["attn2"]) == {layer.block for layer in LAYERS}
    assert patched.model_options.get("disable_cfg1_optimization") is True


def test_object_path_gated_at_t950_and_scaled_by_strength_times_scale_learnable(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    model = sd15_models[0]
    full = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    zero = apply_moma(model, moma_model, moma_context, reference_bank, 0.0, 0.0, 1.0)
    # t >= 950: the object path is off, whatever the strength
    assert torch.equal(_unet(full, LATENT, 950, cfg_context), _unet(zero, LATENT, 950, cfg_context))
    # t < 950: it is on and changes the output (the object path is not silently zero)
    on, off = _unet(full, LATENT, 949, cfg_context), _unet(zero, LATENT, 949, cfg_context)
    assert _rel(on, off) > 1e-3
    # the gain is strength x scale_learnable: zeroing scale_learnable == strength 0
    silent = copy.copy(moma_model)
    silent.adapter = copy.copy(moma_model.adapter)
    silent.adapter.scale_learnable = {i: torch.zeros_like(t) for i, t in moma_model.adapter.scale_learnable.items()}
    no_scale = apply_moma(model, silent, moma_context, reference_bank, 1.0, 0.0, 1.0)
    torch.testing.assert_close(_unet(no_scale, LATENT, 949, cfg_context), off, rtol=0, atol=0)


def test_object_gate_under_a_continuous_edm_override_sits_five_percent_into_its_schedule(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    """ComfyUI's ModelSamplingContinuousEDM maps sigma to t = ln(sigma) / 4, never near 950: the object path's
    gate moves to the same place in that schedule (5% below its highest sigma) instead of being always on."""
    import nodes

    edm_node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingContinuousEDM"]()
    (model,) = edm_node.patch(sd15_models[0], "eps", 120.0, 0.002)
    ms = model.get_model_object("model_sampling")
    ceiling_sigma = ms.percent_to_sigma(0.05)
    full = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    zero = apply_moma(model, moma_model, moma_context, reference_bank, 0.0, 0.0, 1.0)

    def t_of(sigma: float) -> float:
        return float(ms.timestep(torch.tensor([sigma])))

    high, low = t_of(ceiling_sigma * 1.2), t_of(ceiling_sigma / 1.2)
    assert torch.equal(_unet(full, LATENT, high, cfg_context), _unet(zero, LATENT, high, cfg_context))
    assert _rel(_unet(full, LATENT, low, cfg_context), _unet(zero, LATENT, low, cfg_context)) > 1e-3
    # the run's plan agrees: over the whole EDM schedule the object path switches on during the run
    import comfy.samplers

    run = next(iter(full.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    assert run.schedule_plan(comfy.samplers.calculate_sigmas(ms, "karras", 10), ms) == (None, True)


def test_start_end_window_switches_moma_off(sd15_models, moma_model, moma_context, reference_bank, cfg_context):
    model = sd15_models[0]
    late = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.6, 1.0)  # off early in sampling
    plain = _unet(model, LATENT, 700, cfg_context)  # t=700 is ~30% into sampling: outside the window
    torch.testing.assert_close(_unet(late, LATENT, 700, cfg_context), plain, rtol=1e-4, atol=1e-4)
    assert _rel(_unet(late, LATENT, 100, cfg_context), _unet(model, LATENT, 100, cfg_context)) > 1e-3
    with pytest.raises(MomaError, match="start_percent"):
        apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.8, 0.2)


def test_two_apply_nodes_keep_separate_subject_masks(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    model = sd15_models[0]
    first = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    second = apply_moma(model, moma_model, moma_context, reference_bank, 0.4, 0.0, 1.0)

    def run_of(patched):
        return next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run

    def evaluate(patched, t, latent):
        out = _unet(patched, latent, t, cfg_context)
        run_of(patched).tracker.finish_evaluation()
        return out

    other = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    run_of(first).tracker.reset()
    run_of(second).tracker.reset()
    evaluate(first, 800, LATENT)
    evaluate(second, 800, other)  # would overwrite a shared mask
    interleaved = evaluate(first, 500, LATENT)
    run_of(first).tracker.reset()
    evaluate(first, 800, LATENT)
    alone = evaluate(first, 500, LATENT)
    assert torch.equal(interleaved, alone)
    assert run_of(first) is not run_of(second)


def test_non_sd15_model_is_refused(moma_model, moma_context, reference_bank):
    """An SDXL-shaped MODEL (its config as ComfyUI's model detection builds it) gets a clear error."""
    from types import SimpleNamespace

    import comfy.supported_models

    config = comfy.supported_models.SDXL.__new__(comfy.supported_models.SDXL)
    config.unet_config = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816}
    sdxl_like = SimpleNamespace(model=SimpleNamespace(model_config=config))
    with pytest.raises(MomaError, match="SDXL"):
        apply_moma(sdxl_like, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)


# --- the whole graph through ComfyUI's executor ------------------------------------------------------


@pytest.fixture(scope="module")
def graph_setup(comfy_host, sd15_checkpoint, adapter_file, llava_dir, clip_vision_dir, test_images):
    import folder_paths

    import nodes

    models = comfy_host.models_dir
    for folder, path in (
        ("checkpoints", sd15_checkpoint),
        ("moma", adapter_file),
        ("LLM", llava_dir),
        ("clip_vision", clip_vision_dir),
    ):
        comfy_exec.link(models / folder / path.name, path)
    input_dir = Path(folder_paths.get_input_directory())
    image_path, mask_path = test_images["wide"]
    shutil.copy(image_path, input_dir / "moma_graph_ref.png")
    Image.open(mask_path).convert("L").save(input_dir / "moma_graph_mask.png")
    nodes.NODE_CLASS_MAPPINGS["MomaTestIPAdapterStyle"] = peer_packs.IPAdapterStyleNode
    yield
    nodes.NODE_CLASS_MAPPINGS.pop("MomaTestIPAdapterStyle", None)


def moma_graph(
    sd15_name, sampler, width, height, batch, seed=5, steps=2, preset="context", with_peer_pack=True, with_moma=True
):
    """The whole MoMA graph; with_peer_pack: the IPAdapter-protocol stand-in both before (node 20) and after
    (node 21) Apply MoMA; with_moma=False: the sampler gets the model without MoMA (same everything else)."""
    model_source = ["20", 0] if with_peer_pack else ["1", 0]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_name}},
        "2": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": "attn_adapters_projectors.th",
                "llava_name": "MoMA_llava_7b",
                "clip_vision_name": "clip-vit-large-patch14-336",
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        },
        "3": {"class_type": "LoadImage", "inputs": {"image": "moma_graph_ref.png"}},
        "4": {"class_type": "LoadImageMask", "inputs": {"image": "moma_graph_mask.png", "channel": "red"}},
        "5": {
            "class_type": "MomaContextEncoder",
            "inputs": {
                "moma_model": ["2", 0],
                "image": ["3", 0],
                "mask": ["4", 0],
                "subject": "car",
                "prompt": "A car in autumn with falling leaves.",
            },
        },
        "6": {
            "class_type": "MomaFeatureGrab",
            "inputs": {
                "model": model_source,
                "moma_model": ["2", 0],
                "vae": ["1", 2],
                "clip": ["1", 1],
                "image": ["3", 0],
                "mask": ["4", 0],
                "subject": "car",
                "seed": seed,
                "resolution": 128,
            },
        },
        "7": {
            "class_type": "MomaApply",
            "inputs": {
                "model": model_source,
                "moma_model": ["2", 0],
                "context": ["5", 0],
                "reference": ["6", 0],
                "preset": preset,
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": ["5", 1], "clip": ["1", 1]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "11": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.5,
                "sampler_name": sampler,
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["21", 0] if with_peer_pack else ["7", 0],
                "positive": ["8", 0],
                "negative": ["9", 0],
                "latent_image": ["10", 0],
            },
        },
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"moma_graph_{sampler}", "images": ["12", 0]}},
    }
    if with_peer_pack:
        graph["20"] = {
            "class_type": "MomaTestIPAdapterStyle",
            "inputs": {"model": ["1", 0], "tag": "before", "weight": 1.0},
        }
        graph["21"] = {
            "class_type": "MomaTestIPAdapterStyle",
            "inputs": {"model": ["7", 0], "tag": "after", "weight": 1.0},
        }
    if not with_moma:
        sampler_input = graph["21"]["inputs"] if with_peer_pack else graph["11"]["inputs"]
        sampler_input["model"] = model_source
    return graph


def _saved_images(outputs):
    import folder_paths

    images = outputs["13"]["images"]
    return [
        np.asarray(Image.open(Path(folder_paths.get_output_directory()) / i["subfolder"] / i["filename"]))
        for i in images
    ]


@pytest.mark.parametrize(
    ("sampler", "width", "height", "batch"),
    host.cases_for_hosts(
        [
            ("euler", 64, 64, 1),
            ("heun", 64, 96, 1),  # two model evaluations per step
            ("dpmpp_2m", 64, 64, 2),
        ],
        {"euler"},
    ),
)
def test_whole_graph_runs_through_the_executor(graph_setup, sd15_checkpoint, sampler, width, height, batch):
    peer_packs.CALLS.clear()
    outputs = run_api_workflow(moma_graph(sd15_checkpoint.name, sampler, width, height, batch))
    images = _saved_images(outputs)
    assert len(images) == batch
    assert all(image.shape == (height, width, 3) for image in images)
    # the peer pack before MoMA (chained) and after it (.add()ed onto MoMA's patch) both run, on 16 layers per call
    tags = [tag for tag, _ in peer_packs.CALLS]
    assert tags.count("before") == tags.count("after") > 0 and tags.count("before") % 16 == 0
    assert {block for _, block in peer_packs.CALLS} == {layer.block for layer in LAYERS}
    if sampler == "euler":  # MoMA changed the picture: the same graph without it gives another one
        without = _saved_images(
            run_api_workflow(moma_graph(sd15_checkpoint.name, sampler, width, height, batch, with_moma=False))
        )
        assert any(np.abs(a.astype(int) - b).mean() > 1.0 for a, b in zip(images, without))


@pytest.fixture(scope="module")
def euler_image(graph_setup, sd15_checkpoint) -> np.ndarray:
    """The picture of the MoMA graph (euler, 64x64, no peer pack) run alone, once per module."""
    return _saved_images(run_api_workflow(moma_graph(sd15_checkpoint.name, "euler", 64, 64, 1, with_peer_pack=False)))[
        0
    ]


@pytest.mark.default_host_only
def test_same_seed_twice_gives_identical_images(graph_setup, sd15_checkpoint, euler_image):
    again = _saved_images(run_api_workflow(moma_graph(sd15_checkpoint.name, "euler", 64, 64, 1, with_peer_pack=False)))
    assert np.array_equal(again[0], euler_image)


def test_separate_cond_and_uncond_calls_equal_one_batched_call(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    """Low-VRAM ComfyUI evaluates cond and uncond in separate UNet calls; the subject mask and the outputs
    must not change."""
    model = sd15_models[0]
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    uncond_ctx, cond_ctx = cfg_context[:1], cfg_context[1:]

    def evaluation(t, split):
        if split:
            out = torch.cat(
                [_unet(patched, LATENT, t, uncond_ctx, rows=(1,)), _unet(patched, LATENT, t, cond_ctx, rows=(0,))]
            )
        else:
            out = _unet(patched, LATENT, t, cfg_context)
        run.tracker.finish_evaluation()
        return out, run.tracker.mask.clone()

    run.tracker.reset()
    batched = [evaluation(t, split=False) for t in (800, 500)]
    run.tracker.reset()
    split = [evaluation(t, split=True) for t in (800, 500)]
    for (out_b, mask_b), (out_s, mask_s) in zip(batched, split):
        torch.testing.assert_close(mask_s, mask_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_s, out_b, rtol=1e-4, atol=1e-4)


def test_batch_rows_are_routed_per_item_and_per_chunk(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    """Batch 2 with ComfyUI's chunks in [cond, uncond] order == each item evaluated alone: context tokens,
    subject masks and the object term are routed to the right rows."""
    model = sd15_models[0]
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    uncond_ctx, cond_ctx = cfg_context[:1], cfg_context[1:]
    latents = torch.cat([LATENT, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(21))])

    def evaluate(latent_batch, t):
        import comfy.model_management

        comfy.model_management.load_models_gpu([patched])
        device = comfy.model_management.get_torch_device()
        ms = patched.get_model_object("model_sampling")
        sigma = ms.sigma(torch.tensor([float(t)])).to(device)
        n = latent_batch.shape[0]
        options = copy.copy(patched.model_options["transformer_options"])
        options.update(cond_or_uncond=[0, 1], sigmas=sigma)
        x = torch.cat([latent_batch, latent_batch]).to(device) * math.sqrt(1 + float(sigma) ** 2)
        context = torch.cat([cond_ctx.expand(n, -1, -1), uncond_ctx.expand(n, -1, -1)]).to(device)
        with torch.no_grad():
            out = patched.model.apply_model(x, sigma.expand(2 * n), c_crossattn=context, transformer_options=options)
        run.tracker.finish_evaluation()
        return out.float().cpu()

    run.tracker.reset()
    batched = [evaluate(latents, t) for t in (800, 500)][-1]  # rows: cond 0, cond 1, uncond 0, uncond 1
    singles = []
    for item in range(2):
        run.tracker.reset()
        singles.append([evaluate(latents[item : item + 1], t) for t in (800, 500)][-1])  # rows: cond, uncond
    expected = torch.cat([singles[0][:1], singles[1][:1], singles[0][1:], singles[1][1:]])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4)


def test_each_sampling_run_starts_with_a_fresh_subject_mask(
    sd15_models, moma_model, moma_context, reference_bank, monkeypatch
):
    """Two runs of one patched MODEL with the same seed give the same latents: each run has its own state
    (a fresh subject mask), which lives only in that run's copy of the options."""
    from comfyui_moma.moma.subject_mask import SubjectMaskTracker
    from comfyui_moma.nodes.patches import RUN_STATES_KEY

    import nodes

    model, clip, _ = sd15_models
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    trackers, masks = [], []
    finish = SubjectMaskTracker.finish_evaluation

    def recording_finish(tracker):
        finish(tracker)
        trackers.append(tracker)
        masks.append(tracker.mask)

    monkeypatch.setattr(SubjectMaskTracker, "finish_evaluation", recording_finish)
    first = nodes.common_ksampler(patched, 3, 3, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert len(masks) == 3 and all(mask is not None for mask in masks)  # one new mask per model evaluation
    assert torch.equal(run.last_subject_mask, masks[-1].cpu())  # kept for the preview node
    second = nodes.common_ksampler(patched, 3, 3, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert torch.equal(first, second)
    assert trackers[0] is not trackers[3] and trackers[3] is not run.tracker  # a new state per run
    assert RUN_STATES_KEY not in patched.model_options["transformer_options"]  # nothing left on the model


def test_cond_only_extra_evaluations_do_not_touch_the_mask(sd15_models, moma_model, moma_context, reference_bank):
    """PAG/SAG-style add-ons evaluate the model again with cond only inside a CFG step: those maps are
    dropped; a guider without uncond (BasicGuider) still gets masks."""
    from comfyui_moma.moma.subject_mask import layer_subject_map

    patched = apply_moma(sd15_models[0], moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    g = torch.Generator().manual_seed(2)

    def evaluation(kinds):
        def unet_calls(*_args):  # what ComfyUI's _calc_cond_batch does through our attn2 patches
            for _ in range(16):
                run.tracker.add(layer_subject_map(torch.rand(len(kinds), 64, generator=g), (8, 8), (8, 8)), kinds)

        return unet_calls

    run.tracker.reset()
    run.idle.cfg_seen = False
    run.calc_cond_batch(evaluation([1, 0]), None, [["cond"], ["uncond"]], None, None, {})
    cfg_mask = run.tracker.mask.clone()
    run.calc_cond_batch(evaluation([0]), None, [["cond"]], None, None, {})  # PAG's extra call
    assert torch.equal(run.tracker.mask, cfg_mask)
    run.tracker.reset()
    run.idle.cfg_seen = False
    run.calc_cond_batch(evaluation([0]), None, [["cond"], None], None, None, {})  # no-uncond guider
    assert run.tracker.mask is not None


# --- other adapter packs, in any order (IPAdapter_plus / PuLID / InstantID attn2 protocol) --------------------


def _attn2(model, block):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"][block]


def test_a_later_add_onto_a_clone_never_changes_an_earlier_model(sd15_models, moma_model, moma_context, reference_bank):
    """Whatever ComfyUI's clone copies (0.3.75: everything; 0.30: only dicts and lists), a pack that .add()s
    onto MoMA's patch of a later clone changes that clone only."""
    patched = apply_moma(sd15_models[0], moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    later = peer_packs.apply_ipadapter_style(patched, "later")  # clones, then .add()s on all 16 blocks
    again = peer_packs.apply_ipadapter_style(later, "again")
    for layer in LAYERS:
        assert _attn2(patched, layer.block).callback == []
        assert [kw["tag"] for kw in _attn2(later, layer.block).kwargs] == ["later"]
        assert [kw["tag"] for kw in _attn2(again, layer.block).kwargs] == ["later", "again"]
        assert _attn2(patched, layer.block) is not _attn2(later, layer.block)
        assert _attn2(patched, layer.block).run is _attn2(later, layer.block).run  # weights are not copied
    # a pack before MoMA: its patch is chained, and a second application after MoMA leaves the first alone
    first = peer_packs.apply_ipadapter_style(sd15_models[0], "first")
    sandwich = peer_packs.apply_ipadapter_style(
        apply_moma(first, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0), "after"
    )
    block = LAYERS[0].block
    assert [kw["tag"] for kw in _attn2(first, block).kwargs] == ["first"]
    assert [kw["tag"] for kw in _attn2(sandwich, block).previous.kwargs] == ["first"]  # chained (0.3.75: a copy)
    assert [kw["tag"] for kw in _attn2(sandwich, block).kwargs] == ["after"]
    assert "patches_replace" not in sd15_models[0].model_options["transformer_options"]


def test_peer_pack_terms_act_in_either_order_and_in_their_sigma_window(
    sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    """IPAdapter -> MoMA and MoMA -> IPAdapter give the same UNet output (both terms are added to the same
    attention output), which differs from either adapter alone; the pack's callback runs on all 16 blocks
    per call, and not at all outside its sigma window."""
    model = sd15_models[0]
    moma_only = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    ipa_only = peer_packs.apply_ipadapter_style(model, "ipa")
    ipa_then_moma = apply_moma(ipa_only, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    moma_then_ipa = peer_packs.apply_ipadapter_style(moma_only, "ipa")
    sandwich = peer_packs.apply_ipadapter_style(ipa_then_moma, "ipa2", seed=1)

    def evaluate(patched):
        peer_packs.CALLS.clear()
        return _unet(patched, LATENT, 500, cfg_context), list(peer_packs.CALLS)

    out_moma, calls = evaluate(moma_only)
    assert calls == []
    out_ipa, calls = evaluate(ipa_only)
    assert sorted(block for _, block in calls) == sorted(layer.block for layer in LAYERS)
    out_a, calls_a = evaluate(ipa_then_moma)
    out_b, calls_b = evaluate(moma_then_ipa)
    assert len(calls_a) == len(calls_b) == 16
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
    assert _rel(out_a, out_moma) > 1e-3 and _rel(out_a, out_ipa) > 1e-3
    out_sandwich, calls = evaluate(sandwich)
    assert sorted(tag for tag, _ in calls) == ["ipa"] * 16 + ["ipa2"] * 16
    assert _rel(out_sandwich, out_a) > 1e-3
    # a window that excludes t=500: the added callback is skipped, the output is MoMA's alone
    sigma_500 = float(model.get_model_object("model_sampling").sigma(torch.tensor([500.0])))
    outside = peer_packs.apply_ipadapter_style(moma_only, "late", sigma_start=sigma_500 / 2)
    out_outside, calls = evaluate(outside)
    assert calls == []
    torch.testing.assert_close(out_outside, out_moma, rtol=0, atol=0)


# --- composing: runs, several subjects, batches, per-path control, the preview ------------------------------


def test_block_weights_parse_and_bad_strings_name_the_problem():
    from comfyui_moma.moma.sd15 import parse_block_weights

    assert set(parse_block_weights("").values()) == {1.0}
    numbers = parse_block_weights(" ".join(str(i / 10) for i in range(16)))
    assert [numbers[layer.block] for layer in LAYERS] == [i / 10 for i in range(16)]
    named = parse_block_weights("input=0, middle=0.5, output_5=2")
    assert named[("input", 4)] == 0.0 and named[("middle", 0)] == 0.5
    assert named[("output", 5)] == 2.0 and named[("output", 6)] == 1.0
    for bad, words in (
        ("1 2 3", "16"),
        ("input=x", "not a number"),
        ("elbow=1", "unknown block"),
        ("input=9", "outside"),
        ("1, input=2", "mixing"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_block_weights(bad)


@pytest.mark.default_host_only
def test_per_path_weights_and_windows(sd15_models, moma_model, moma_context, reference_bank, cfg_context):
    """The defaults are today's numbers exactly; context_strength 0 and block weight 0 remove those terms; each
    path's own window switches only that path; a bad block_weights string is a MomaError."""
    model = sd15_models[0]
    default = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    explicit = apply_moma(
        model,
        moma_model,
        moma_context,
        reference_bank,
        1.0,
        0.0,
        1.0,
        context_strength=1.0,
        object_window=(0.0, 1.0),
        context_window=(0.0, 1.0),
        block_weights="",
    )
    out_default = _unet(default, LATENT, 500, cfg_context)
    torch.testing.assert_close(_unet(explicit, LATENT, 500, cfg_context), out_default, rtol=0, atol=0)
    object_only = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, context_strength=0.0)
    no_object = apply_moma(model, moma_model, moma_context, reference_bank, 0.0, 0.0, 1.0)
    plain = _unet(model, LATENT, 500, cfg_context)
    out_object_only = _unet(object_only, LATENT, 500, cfg_context)
    assert _rel(out_object_only, plain) > 1e-3 and _rel(out_object_only, out_default) > 1e-3
    # all-zero block weights: neither term anywhere, so the plain output
    zeros = apply_moma(
        model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, block_weights="input=0 middle=0 output=0"
    )
    torch.testing.assert_close(_unet(zeros, LATENT, 500, cfg_context), plain, rtol=1e-5, atol=1e-5)
    # the context window ends before t=500 (~50% of sampling): only the object path acts there, as with
    # context_strength 0; the object window likewise
    ctx_early = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, context_window=(0.0, 0.2))
    torch.testing.assert_close(_unet(ctx_early, LATENT, 500, cfg_context), out_object_only, rtol=1e-5, atol=1e-5)
    obj_early = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, object_window=(0.0, 0.2))
    torch.testing.assert_close(
        _unet(obj_early, LATENT, 500, cfg_context), _unet(no_object, LATENT, 500, cfg_context), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(MomaError, match="block_weights"):
        apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, block_weights="1 2")
    with pytest.raises(MomaError, match="context_start_percent"):
        apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, context_window=(0.9, 0.1))


@pytest.mark.default_host_only
def test_per_frame_attn_masks_in_a_16_frame_batch(sd15_models, moma_model, moma_context, reference_bank, cfg_context):
    """AnimateDiff-style batch of 16 latents with one reference and 16 masks: frames whose mask is 0 get exactly
    the plain model's output, the others MoMA's; the subject mask is tracked per frame."""
    import comfy.model_management

    model = sd15_models[0]
    frames = 16
    masks = torch.zeros(frames, 16, 16)
    masks[::2] = 1.0  # MoMA on the even frames only
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, attn_mask=masks)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    uncond_ctx, cond_ctx = cfg_context[:1], cfg_context[1:]
    latents = torch.randn(frames, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def evaluate(m, t):
        comfy.model_management.load_models_gpu([m])
        device = comfy.model_management.get_torch_device()
        sigma = m.get_model_object("model_sampling").sigma(torch.tensor([float(t)])).to(device)
        options = copy.copy(m.model_options["transformer_options"])
        options.update(cond_or_uncond=[0, 1], sigmas=sigma)
        x = torch.cat([latents, latents]).to(device) * math.sqrt(1 + float(sigma) ** 2)
        context = torch.cat([cond_ctx.expand(frames, -1, -1), uncond_ctx.expand(frames, -1, -1)]).to(device)
        with torch.no_grad():
            return (
                m.model.apply_model(x, sigma.expand(2 * frames), c_crossattn=context, transformer_options=options)
                .float()
                .cpu()
            )

    run.tracker.reset()
    evaluate(patched, 800)
    run.tracker.finish_evaluation()
    assert run.tracker.mask.shape == (frames, 8, 8)
    assert not torch.equal(run.tracker.mask[0], run.tracker.mask[1])  # one subject mask per frame
    moma_out = evaluate(patched, 500)
    plain_out = evaluate(model, 500)
    rows = torch.arange(2 * frames) % frames  # cond frames, then uncond frames
    off, on = rows % 2 == 1, rows % 2 == 0
    torch.testing.assert_close(moma_out[off], plain_out[off], rtol=0, atol=0)
    assert all(_rel(moma_out[i], plain_out[i]) > 1e-4 for i in torch.nonzero(on).flatten().tolist())


def test_context_windows_keep_the_subject_mask_per_frame_of_the_clip(
    sd15_models, moma_model, moma_context, reference_bank
):
    """ComfyUI's own context windows over an 8-frame clip (2 windows of 4, no overlap, no anchor frame): each
    window is an evaluation of its own frames, so each frame's subject mask must come from that frame's previous
    evaluation, not from the other window's frames. Oracle: sampling each window's frames alone, with their
    slice of the same noise, gives the same latents; the preview's mask covers all 8 frames."""
    import inspect

    import host

    if not host.on_default_host():
        pytest.skip(
            "ComfyUI 0.3.75's context windows cannot window a batch of images (its set_step compares the "
            "per-item timesteps with the schedule and fails for batches over 1)"
        )
    import comfy.context_windows as windows
    import comfy.sample
    import comfy.samplers

    import nodes

    model, clip, _ = sd15_models
    frames = 8
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    windowed = patched.clone()
    options = dict(
        context_schedule=windows.get_matching_context_schedule(windows.ContextSchedules.STATIC_STANDARD),
        fuse_method=windows.get_matching_fuse_method(windows.ContextFuseMethods.FLAT),
        context_length=4,
        context_overlap=0,
        dim=0,
    )
    if "causal_window_fix" in inspect.signature(windows.IndexListContextHandler).parameters:
        options["causal_window_fix"] = False
    windowed.model_options["context_handler"] = windows.IndexListContextHandler(**options)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = torch.zeros(frames, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 10)[4:7].cpu()
    sampler = comfy.samplers.sampler_object("euler")

    def sample(m, part):
        return comfy.sample.sample_custom(
            m, noise[part], 7.5, sampler, sigmas, positive, negative, latent[part], disable_pbar=True, seed=4
        )

    clip_latents = sample(windowed, slice(0, frames))
    assert run.last_subject_mask is not None and run.last_subject_mask.shape == (frames, 8, 8)
    alone = torch.cat([sample(patched, slice(0, 4)), sample(patched, slice(4, frames))])
    torch.testing.assert_close(clip_latents, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.default_host_only
def test_two_samplers_on_one_patched_model_in_one_prompt(graph_setup, sd15_checkpoint, euler_image):
    """One patched MODEL feeding two KSamplers (different seeds) in one graph: each gives exactly what it gives
    alone, so no run sees the other's subject mask."""
    graph = moma_graph(sd15_checkpoint.name, "euler", 64, 64, 1, with_peer_pack=False)
    graph["14"] = {"class_type": "KSampler", "inputs": {**graph["11"]["inputs"], "seed": 77}}
    graph["15"] = {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}}
    graph["16"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "moma_two_samplers", "images": ["15", 0]}}
    both = run_api_workflow(graph)
    alone = copy.deepcopy(graph)
    for nid in ("11", "12", "13"):
        del alone[nid]
    second_alone = run_api_workflow(alone)

    def image(outputs, nid):
        import folder_paths

        (entry,) = outputs[nid]["images"]
        return np.asarray(
            Image.open(Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"])
        )

    assert np.array_equal(image(both, "13"), euler_image)  # the first sampler: what it gives alone
    assert np.array_equal(image(both, "16"), image(second_alone, "16"))
    assert not np.array_equal(image(both, "13"), image(both, "16"))


@pytest.mark.default_host_only
def test_two_subjects_each_act_in_their_own_region_and_the_preview_shows_them(
    graph_setup, sd15_models, moma_model, moma_context, reference_bank, cfg_context
):
    """Two Apply nodes on one model (two subjects, one prompt naming both, each with its own attn_mask): each
    subject's terms act only in its region, each tracks its own subject mask, and MoMA Subject Mask Preview
    returns each one's mask and an overlay."""
    from comfyui_moma.nodes.preview import MomaSubjectMaskPreview

    import nodes

    model, clip, _ = sd15_models
    prompt = "photo of a car and a dog on a beach"
    dog_context = dataclasses.replace(moma_context, subject="dog")
    left, right = torch.zeros(1, 16, 16), torch.zeros(1, 16, 16)
    left[..., :8], right[..., 8:] = 1.0, 1.0
    car = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0, attn_mask=left, prompt=prompt)
    both = apply_moma(car, moma_model, dog_context, reference_bank, 1.0, 0.0, 1.0, attn_mask=right, prompt=prompt)
    first, second = [p.run for p in (_attn2(both, LAYERS[0].block).previous, _attn2(both, LAYERS[0].block))]
    assert first.subject_positions != second.subject_positions  # each subject's own tokens in the one prompt
    cond = clip.encode_from_tokens(clip.tokenize(prompt))
    context = torch.cat([clip.encode_from_tokens(clip.tokenize("")), cond])
    plain, car_out, both_out = (_unet(m, LATENT, 500, context) for m in (model, car, both))
    # a subject whose region is empty adds nothing: the other subject's result exactly
    nobody = torch.zeros(1, 16, 16)
    car_and_no_dog = apply_moma(
        car, moma_model, dog_context, reference_bank, 1.0, 0.0, 1.0, attn_mask=nobody, prompt=prompt
    )
    torch.testing.assert_close(_unet(car_and_no_dog, LATENT, 500, context), car_out, rtol=0, atol=0)
    # each subject's terms change its own half of the 16x16 latent most (the UNet's later layers spread some)
    delta_car = (car_out - plain).abs().mean(dim=(0, 1))
    delta_dog = (both_out - car_out).abs().mean(dim=(0, 1))
    assert delta_car[:, :8].mean() > 1.5 * delta_car[:, 8:].mean()
    assert delta_dog[:, 8:].mean() > 1.5 * delta_dog[:, :8].mean()

    positive = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    samples = nodes.common_ksampler(both, 1, 2, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    images = torch.rand(1, 128, 128, 3)
    car_mask, overlay = MomaSubjectMaskPreview.execute(both, images, 0).result
    dog_mask, _ = MomaSubjectMaskPreview.execute(both, images, 1).result
    assert car_mask.shape == dog_mask.shape == (1, 16, 16) and overlay.shape == images.shape
    assert not torch.equal(car_mask, dog_mask)
    assert torch.isfinite(samples).all()
    with pytest.raises(MomaError, match="apply_index 2"):
        MomaSubjectMaskPreview.execute(both, images, 2)
    with pytest.raises(MomaError, match="no MoMA"):
        MomaSubjectMaskPreview.execute(model, images, 0)
