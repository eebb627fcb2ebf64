"""Apply MoMA Attention / Feature Grab behaviour in the real host: gates, strength, isolation, chaining,
determinism, and the whole graph through ComfyUI's executor with several samplers and sizes."""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import peer_packs
from comfy_exec import run_api_workflow
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.sd15 import LAYERS
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import grab_reference_features

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
        out = model.model.apply_model(x, sigma.expand(x.shape[0]), c_crossattn=context.to(device),
                                      transformer_options=options)
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
        sd15_models, moma_model, moma_context, reference_bank, cfg_context):
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


def test_start_end_window_switches_moma_off(sd15_models, moma_model, moma_context, reference_bank, cfg_context):
    model = sd15_models[0]
    late = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.6, 1.0)  # off early in sampling
    plain = _unet(model, LATENT, 700, cfg_context)  # t=700 is ~30% into sampling: outside the window
    torch.testing.assert_close(_unet(late, LATENT, 700, cfg_context), plain, rtol=1e-4, atol=1e-4)
    assert _rel(_unet(late, LATENT, 100, cfg_context), _unet(model, LATENT, 100, cfg_context)) > 1e-3
    with pytest.raises(MomaError, match="start_percent"):
        apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.8, 0.2)


def test_two_apply_nodes_keep_separate_subject_masks(sd15_models, moma_model, moma_context, reference_bank, cfg_context):
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
    for folder, path in (("checkpoints", sd15_checkpoint), ("moma", adapter_file), ("LLM", llava_dir),
                         ("clip_vision", clip_vision_dir)):
        link = models / folder / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(path, target_is_directory=path.is_dir())
    input_dir = Path(folder_paths.get_input_directory())
    image_path, mask_path = test_images["wide"]
    shutil.copy(image_path, input_dir / "moma_graph_ref.png")
    Image.open(mask_path).convert("L").save(input_dir / "moma_graph_mask.png")
    nodes.NODE_CLASS_MAPPINGS["MomaTestIPAdapterStyle"] = peer_packs.IPAdapterStyleNode
    yield
    nodes.NODE_CLASS_MAPPINGS.pop("MomaTestIPAdapterStyle", None)


def moma_graph(sd15_name, sampler, width, height, batch, seed=5, steps=2, preset="context", with_peer_pack=True,
               with_moma=True):
    """The whole MoMA graph; with_peer_pack: the IPAdapter-protocol stand-in both before (node 20) and after
    (node 21) Apply MoMA; with_moma=False: the sampler gets the model without MoMA (same everything else)."""
    model_source = ["20", 0] if with_peer_pack else ["1", 0]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_name}},
        "2": {"class_type": "MomaLoader", "inputs": {
            "adapter_name": "attn_adapters_projectors.th", "llava_name": "MoMA_llava_7b",
            "clip_vision_name": "clip-vit-large-patch14-336", "precision": "fp32", "quantization": "none",
            "keep_llava_loaded": False}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "moma_graph_ref.png"}},
        "4": {"class_type": "LoadImageMask", "inputs": {"image": "moma_graph_mask.png", "channel": "red"}},
        "5": {"class_type": "MomaContextEncoder", "inputs": {
            "moma_model": ["2", 0], "image": ["3", 0], "mask": ["4", 0], "subject": "car",
            "prompt": "A car in autumn with falling leaves."}},
        "6": {"class_type": "MomaFeatureGrab", "inputs": {
            "model": model_source, "moma_model": ["2", 0], "vae": ["1", 2], "clip": ["1", 1], "image": ["3", 0],
            "mask": ["4", 0], "subject": "car", "seed": seed, "resolution": 128}},
        "7": {"class_type": "MomaApply", "inputs": {
            "model": model_source, "moma_model": ["2", 0], "context": ["5", 0], "reference": ["6", 0],
            "preset": preset, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": ["5", 1], "clip": ["1", 1]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "11": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.5, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0,
            "model": ["21", 0] if with_peer_pack else ["7", 0], "positive": ["8", 0], "negative": ["9", 0],
            "latent_image": ["10", 0]}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"filename_prefix": f"moma_graph_{sampler}", "images": ["12", 0]}},
    }
    if with_peer_pack:
        graph["20"] = {"class_type": "MomaTestIPAdapterStyle", "inputs": {"model": ["1", 0], "tag": "before", "weight": 1.0}}
        graph["21"] = {"class_type": "MomaTestIPAdapterStyle", "inputs": {"model": ["7", 0], "tag": "after", "weight": 1.0}}
    if not with_moma:
        sampler_input = graph["21"]["inputs"] if with_peer_pack else graph["11"]["inputs"]
        sampler_input["model"] = model_source
    return graph


def _saved_images(outputs):
    import folder_paths

    images = outputs["13"]["images"]
    return [np.asarray(Image.open(Path(folder_paths.get_output_directory()) / i["subfolder"] / i["filename"]))
            for i in images]


@pytest.mark.parametrize(("sampler", "width", "height", "batch"), [
    ("euler", 64, 64, 1),
    ("heun", 64, 96, 1),  # two model evaluations per step
    ("dpmpp_2m", 64, 64, 2),
])
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
        without = _saved_images(run_api_workflow(moma_graph(sd15_checkpoint.name, sampler, width, height, batch,
                                                            with_moma=False)))
        assert any(np.abs(a.astype(int) - b).mean() > 1.0 for a, b in zip(images, without))


def test_same_seed_twice_gives_identical_images(graph_setup, sd15_checkpoint):
    first = _saved_images(run_api_workflow(moma_graph(sd15_checkpoint.name, "euler", 64, 64, 1, with_peer_pack=False)))
    second = _saved_images(run_api_workflow(moma_graph(sd15_checkpoint.name, "euler", 64, 64, 1, with_peer_pack=False)))
    assert np.array_equal(first[0], second[0])


def test_separate_cond_and_uncond_calls_equal_one_batched_call(sd15_models, moma_model, moma_context,
                                                               reference_bank, cfg_context):
    """Low-VRAM ComfyUI evaluates cond and uncond in separate UNet calls; the subject mask and the outputs
    must not change."""
    model = sd15_models[0]
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    uncond_ctx, cond_ctx = cfg_context[:1], cfg_context[1:]

    def evaluation(t, split):
        if split:
            out = torch.cat([_unet(patched, LATENT, t, uncond_ctx, rows=(1,)), _unet(patched, LATENT, t, cond_ctx, rows=(0,))])
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


def test_batch_rows_are_routed_per_item_and_per_chunk(sd15_models, moma_model, moma_context, reference_bank,
                                                      cfg_context):
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
        singles.append([evaluate(latents[item:item + 1], t) for t in (800, 500)][-1])  # rows: cond, uncond
    expected = torch.cat([singles[0][:1], singles[1][:1], singles[0][1:], singles[1][1:]])
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-4)


def test_each_sampling_run_starts_with_a_fresh_subject_mask(sd15_models, moma_model, moma_context, reference_bank):
    """Two runs of one patched MODEL with the same seed give the same latents: the second run does not
    start from the first run's last subject mask (the sampling wrapper resets it)."""
    import nodes

    model, clip, _ = sd15_models
    patched = apply_moma(model, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    run = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run
    masks = []
    finish = run.tracker.finish_evaluation

    def recording_finish():
        finish()
        masks.append(run.tracker.mask)

    run.tracker.finish_evaluation = recording_finish
    first = nodes.common_ksampler(patched, 3, 3, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert len(masks) == 3 and all(mask is not None for mask in masks)  # one new mask per model evaluation
    second = nodes.common_ksampler(patched, 3, 3, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert torch.equal(first, second)
    assert run.tracker.mask is None  # nothing left over after a run


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
    run._cfg_seen = False
    run.calc_cond_batch(evaluation([1, 0]), None, [["cond"], ["uncond"]], None, None, {})
    cfg_mask = run.tracker.mask.clone()
    run.calc_cond_batch(evaluation([0]), None, [["cond"]], None, None, {})  # PAG's extra call
    assert torch.equal(run.tracker.mask, cfg_mask)
    run.tracker.reset()
    run._cfg_seen = False
    run.calc_cond_batch(evaluation([0]), None, [["cond"], None], None, None, {})  # no-uncond guider
    assert run.tracker.mask is not None


# --- other adapter packs, in any order (IPAdapter_plus / PuLID / InstantID attn2 protocol) --------------------


def _attn2(model, block):
    return model.model_options["transformer_options"]["patches_replace"]["attn2"][block]


def test_a_later_add_onto_a_clone_never_changes_an_earlier_model(sd15_models, moma_model, moma_context,
                                                                  reference_bank):
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
        apply_moma(first, moma_model, moma_context, reference_bank, 1.0, 0.0, 1.0), "after")
    block = LAYERS[0].block
    assert [kw["tag"] for kw in _attn2(first, block).kwargs] == ["first"]
    assert [kw["tag"] for kw in _attn2(sandwich, block).previous.kwargs] == ["first"]  # chained (0.3.75: a copy)
    assert [kw["tag"] for kw in _attn2(sandwich, block).kwargs] == ["after"]
    assert "patches_replace" not in sd15_models[0].model_options["transformer_options"]


def test_peer_pack_terms_act_in_either_order_and_in_their_sigma_window(sd15_models, moma_model, moma_context,
                                                                       reference_bank, cfg_context):
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
