"""MoMA beside ComfyUI's own guidance add-ons (core PerturbedAttentionGuidance, SelfAttentionGuidance): inside one
sampler step every evaluation reads the subject mask the step's sampler evaluation read, and the mask advances
once per step, from the sampler's evaluation. Checked against a by-hand oracle of that rule, at 128x128 (where
PAG acts on these random weights), euler.

Also: the compiled path's frame (what MoMA's terms read inside a torch.compile trace, nodes/run_state.CallFrame)
gives eager MoMA's numbers in the cases eager handles (batches with per-item masks, two subjects, a peer pack on
either side, two evaluations per step); here it is run eagerly (no compile: cheap), test_moma_compile.py
compiles it.
"""

from __future__ import annotations

import contextlib

import host
import peer_packs
import pytest
import torch
from comfyui_moma.moma.subject_mask import UNCOND
from comfyui_moma.nodes import run_state
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import grab_reference_features
from comfyui_moma.nodes.patches import RUN_STATES_KEY

pytestmark = pytest.mark.slow

SIZE = 128  # PAG's change on a plain model is ~0.6% here (at 64x64 it is below 0.1%)


@pytest.fixture(scope="module")
def baselines(setup, moma_model, moma_context):
    """(plain latents, MoMA latents, the MoMA model) of the add-on tests' sampling, without add-ons."""
    model, bank, positive, negative = setup
    moma = apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0)
    return _sample(model, positive, negative), _sample(moma, positive, negative), moma


@pytest.fixture(scope="module")
def setup(sd15_models, moma_model, moma_context, test_images, load_image_tensor):
    import nodes

    model, clip, vae = sd15_models
    image, mask = load_image_tensor(*test_images["rgb"])
    bank = grab_reference_features(model, moma_model, vae, clip, image, mask, moma_context.subject, 3, resolution=SIZE)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, bank, positive, negative


def _sample(model, positive, negative, size=SIZE, steps=3, sampler="euler", batch=1, seed=4):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, size // 8, size // 8)}
    return nodes.common_ksampler(model, seed, steps, 7.5, sampler, "normal", positive, negative, latent)[0]["samples"]


def _rel(a, b):
    """Relative L2 difference of two latents."""
    return float((a - b).norm() / b.norm())


def _run_of(patched):
    return next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run


@contextlib.contextmanager
def evaluations_by_hand(run):
    """An oracle of the rule "inside a step every evaluation reads the mask the step started with; the sampler's
    evaluation makes the next one": every ``comfy.samplers.calc_cond_batch`` (the sampler's own and the add-ons')
    is replaced by ComfyUI's inner batching (``_calc_cond_batch``: MoMA's wrappers do not run) on MoMA's state for
    calls outside a run (``run.idle``), whose tracker is driven here by hand. The sampler's evaluation reads the
    tracker's mask and its maps are dropped; an add-on pass reads the same mask (its negative conds evaluated as
    the negative half, cond_or_uncond 1); when the next step begins, the previous sampler evaluation is evaluated
    again (it reads the same mask, so it gives the same maps) and finished: the next mask."""
    import comfy.samplers

    tracker = run.idle.tracker
    tracker.reset()
    previous: list = []  # the last sampler evaluation, to be finished when the next step begins
    negative: list = []

    def alone(model_options):
        transformer_options = dict(model_options["transformer_options"])
        transformer_options.pop(RUN_STATES_KEY, None)  # MoMA's patches use run.idle
        transformer_options.pop("wrappers", None)
        return {**model_options, "transformer_options": transformer_options}

    def by_hand(model, conds, x, timestep, model_options):
        options = alone(model_options)
        if len(conds) > 1 and conds[1] is not None:  # the sampler's evaluation
            if previous:
                comfy.samplers._calc_cond_batch(*previous)
                tracker.finish_evaluation()
            tracker.discard_partial()
            out = comfy.samplers._calc_cond_batch(model, conds, x, timestep, options)
            tracker.discard_partial()
            previous[:] = [model, conds, x.clone(), timestep, options]
            negative[:] = [conds[1]]
            return out
        kind = UNCOND if negative and conds[0] is negative[0] else 0  # SAG's pass of the negative conds
        out = comfy.samplers._calc_cond_batch(model, [None, conds[0]] if kind else [conds[0]], x, timestep, options)
        tracker.discard_partial()
        return [out[kind]]

    original = comfy.samplers.calc_cond_batch
    comfy.samplers.calc_cond_batch = by_hand
    try:
        yield
    finally:
        comfy.samplers.calc_cond_batch = original


@contextlib.contextmanager
def masks_read_per_step(state_class):
    """Per sampler step (each prediction of the guider), the subject masks MoMA's UNet calls read (the frame MoMA
    builds for each call carries the mask its terms multiply by)."""
    steps: list[list[torch.Tensor]] = []
    build, begin = state_class.call_frame, state_class.begin_step

    def recording_frame(state, x, context, extra_options, dtype):
        frame = build(state, x, context, extra_options, dtype)
        steps[-1].append(frame.mask)
        return frame

    def recording_step(state):
        steps.append([])
        begin(state)

    state_class.call_frame, state_class.begin_step = recording_frame, recording_step
    try:
        yield steps
    finally:
        state_class.call_frame, state_class.begin_step = build, begin


def _one_mask_per_step(steps):
    """Each step's calls read one mask (the same tensor); each step reads another one than the step before."""
    assert all(all(mask is masks[0] for mask in masks) for masks in steps), "a step read two different masks"
    assert all(a[0] is not b[0] for a, b in zip(steps, steps[1:])), "the mask did not advance between steps"
    return steps


@pytest.mark.default_host_only  # the node is the same in 0.3.75; the heun test covers its steps there
def test_pag_reads_the_mask_of_the_step_and_acts_as_on_a_plain_model(setup, baselines):
    """Core PerturbedAttentionGuidance's extra cond pass runs after the sampler's evaluation (a post-CFG
    function): it reads that evaluation's mask (before: the mask that evaluation had just made, so PAG scaled
    MoMA's mask change, 12% of the result at 128x128 against PAG's 0.6% on a plain model)."""
    import comfy_extras.nodes_pag as pag

    model, _, positive, negative = setup
    plain, alone, moma = baselines
    with_pag = pag.PerturbedAttentionGuidance.execute(moma, 3.0)[0]
    plain_effect = _rel(_sample(pag.PerturbedAttentionGuidance.execute(model, 3.0)[0], positive, negative), plain)
    with masks_read_per_step(run_state.MomaRunState) as steps:
        product = _sample(with_pag, positive, negative)
    assert [len(masks) for masks in _one_mask_per_step(steps)] == [2, 2, 2]  # the sampler's UNet call, PAG's
    moma_effect = _rel(product, alone)
    assert 0.2 * plain_effect < moma_effect < 2.0 * plain_effect, (moma_effect, plain_effect)
    with evaluations_by_hand(_run_of(moma)):
        oracle = _sample(with_pag, positive, negative)
    print(
        f"\nPAG at {SIZE}x{SIZE}: relative L2 change plain {plain_effect:.4f}, MoMA {moma_effect:.4f}; product vs "
        f"oracle max abs {float((product - oracle).abs().max()):.3g}"
    )
    torch.testing.assert_close(product, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.default_host_only
def test_sag_reads_the_mask_of_the_step_and_evaluates_the_negative_as_uncond(setup, baselines, caplog):
    """Core SelfAttentionGuidance evaluates the negative conds again on a blurred input after the sampler's
    evaluation: that pass reads the step's mask, and its rows are the negative half (MoMA's uncond context
    tokens), as the negative rows of the sampler's evaluation were."""
    import comfy_extras.nodes_sag as sag

    model, _, positive, negative = setup
    plain, alone, moma = baselines
    with_sag = sag.SelfAttentionGuidance.execute(moma, 0.5, 2.0)[0]
    plain_effect = _rel(_sample(sag.SelfAttentionGuidance.execute(model, 0.5, 2.0)[0], positive, negative), plain)
    with masks_read_per_step(run_state.MomaRunState) as steps, caplog.at_level("WARNING"):
        product = _sample(with_sag, positive, negative)
    assert [len(masks) for masks in _one_mask_per_step(steps)] == [2, 2, 2]  # the sampler's UNet call, SAG's
    # SAG applied after MoMA replaced MoMA's middle-block self-attention: said once in the run
    assert sum("attn1 middle_0" in record.getMessage() for record in caplog.records) == 1
    moma_effect = _rel(product, alone)
    assert 0.2 * plain_effect < moma_effect < 2.0 * plain_effect, (moma_effect, plain_effect)
    with evaluations_by_hand(_run_of(moma)):
        oracle = _sample(with_sag, positive, negative)
    print(
        f"\nSAG at {SIZE}x{SIZE}: relative L2 change plain {plain_effect:.4f}, MoMA {moma_effect:.4f}; product vs "
        f"oracle max abs {float((product - oracle).abs().max()):.3g}"
    )
    torch.testing.assert_close(product, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.default_host_only
def test_a_patch_applied_after_moma_that_does_not_chain_is_named(setup, moma_model, moma_context, caplog):
    """Core SAG applied after Apply MoMA puts its recording self-attention at ("middle", 0, 0), which ComfyUI looks up
    before MoMA's ("middle", 0): MoMA does not act in that block, and each sampling run says so, once. SAG applied
    before MoMA is chained (MoMA found its patch), so nothing is said."""
    import logging

    import comfy_extras.nodes_sag as sag
    from comfyui_moma.nodes.patches import shadowing_patches, warn_if_shadowed

    model, bank, _, _ = setup
    moma = apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0)
    run = _run_of(moma)
    sag_after = sag.SelfAttentionGuidance.execute(moma, 0.5, 2.0)[0]
    assert [(kind, block) for kind, block, _ in shadowing_patches(sag_after.model_options, run)] == [
        ("attn1", ("middle", 0))
    ]
    assert shadowing_patches(moma.model_options, run) == []
    sag_first = apply_moma(
        sag.SelfAttentionGuidance.execute(model, 0.5, 2.0)[0], moma_model, moma_context, bank, 1.0, 0.0, 1.0
    )
    assert shadowing_patches(sag_first.model_options, _run_of(sag_first)) == []
    ipadapter_after = peer_packs.apply_ipadapter_style(moma, "after")  # .add()s onto MoMA's patches: chained
    assert shadowing_patches(ipadapter_after.model_options, run) == []
    with caplog.at_level(logging.WARNING):
        warn_if_shadowed(sag_after.model_options, run)
    warnings = [r.getMessage() for r in caplog.records if "without passing on to it" in r.getMessage()]
    assert len(warnings) == 1 and "attn1 middle_0" in warnings[0] and "before Apply MoMA" in warnings[0], warnings


def test_two_evaluation_samplers_advance_the_mask_at_each_evaluation(setup, moma_model, moma_context):
    """heun evaluates the model twice per step (two sigmas): each evaluation is a prediction of its own, reads
    the mask of the one before and makes the next (as the reference updates the mask after every call)."""
    model, bank, positive, negative = setup
    moma = apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0)
    with masks_read_per_step(run_state.MomaRunState) as steps:
        _sample(moma, positive, negative, size=64, steps=2, sampler="heun")
    assert [len(masks) for masks in _one_mask_per_step(steps)] == [1, 1, 1]  # heun: 2 evaluations, then 1 to 0


@pytest.mark.parametrize(
    "case", host.cases_for_hosts(["two subjects, batch 2, per-item masks", "peer packs"], {"peer packs"})
)
def test_the_compiled_path_gives_eager_numbers(setup, moma_model, moma_context, monkeypatch, case):
    """The frame MoMA's terms read in a compiled call (every value a tensor, the same structure at every call)
    gives what the eager path gives, at 64x64 (no compile here: the path itself, run eagerly)."""
    import dataclasses

    model, bank, positive, negative = setup
    batch = 1
    if case == "peer packs":
        before = peer_packs.apply_ipadapter_style(model, "before")
        patched = peer_packs.apply_ipadapter_style(
            apply_moma(before, moma_model, moma_context, bank, 1.0, 0.0, 1.0), "after", seed=1
        )
    else:  # each subject in its own half, a per-item mask on the first (batch 2)
        prompt = "photo of a car and a dog on a beach"
        left = torch.zeros(2, 16, 16)
        left[0, :, :8], left[1, 4:, :8] = 1.0, 1.0
        car = apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0, attn_mask=left, prompt=prompt)
        dog = dataclasses.replace(moma_context, subject="dog")
        patched = apply_moma(car, moma_model, dog, bank, 0.7, 0.0, 1.0, attn_mask=1.0 - left[:1], prompt=prompt)
        batch = 2
    eager = _sample(patched, positive, negative, size=64, batch=batch)
    monkeypatch.setattr(run_state, "use_call_frame", lambda: True)
    framed = _sample(patched, positive, negative, size=64, batch=batch)
    torch.testing.assert_close(framed, eager, rtol=1e-5, atol=1e-5)
