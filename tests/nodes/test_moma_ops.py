"""What MoMA adds to every UNet call while sampling: aten ops (kernel launches on a GPU) and host reads
(host-device syncs on CUDA), counted with a dispatch-mode counter (tools/op_count.py) in a real sampling run."""

from __future__ import annotations

import statistics

import pytest
import torch
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import grab_reference_features
from op_count import AtenCounter, ModelCallCounts, count_model_calls, host_reads

pytestmark = pytest.mark.slow

MAX_ADDED_OPS_PER_CALL = 350  # issue 14: MoMA was +796 per call before (CPU, cond and uncond in one call)


def test_counter_sees_host_reads_and_ops():
    """The counter this file relies on does see a host read and the ops around it."""
    counts: list = []
    counter = AtenCounter()
    with counter, counter.scope(counts):
        x = torch.ones(3) * 2
        float(x.sum())
        bool(x.gt(1).any())
    assert host_reads(counts[0]) == 2
    assert ModelCallCounts.ops(counts[0]) >= 6


@pytest.fixture(scope="module")
def sampling_setup(sd15_models, moma_model, moma_context, test_images, load_image_tensor):
    import nodes

    model, clip, vae = sd15_models
    image, mask = load_image_tensor(*test_images["rgb"])
    bank = grab_reference_features(model, moma_model, vae, clip, image, mask, moma_context.subject, 3, resolution=64)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, bank, positive, negative


def _sample(model, positive, negative, steps=3):
    """KSampler (euler, normal schedule from t=999: the object path is off at the first step, on after)."""
    import nodes

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with count_model_calls() as calls:
        out = nodes.common_ksampler(model, 4, steps, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    return out, calls


def _run_of(patched):
    return next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn1"].values())).run


def test_no_host_reads_and_few_ops_per_unet_call(sampling_setup, moma_model, moma_context):
    model, bank, positive, negative = sampling_setup
    patched = apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0)
    _sample(model, positive, negative, steps=1)  # first use of these shapes
    _, plain = _sample(model, positive, negative)
    _, moma = _sample(patched, positive, negative)
    assert len(moma.per_call) == len(plain.per_call) == 3  # cond and uncond in one UNet call per step

    # no host reads in MoMA's per-call and per-evaluation path (ComfyUI's own reads are the plain run's)
    assert [host_reads(c) for c in moma.per_call] == [host_reads(c) for c in plain.per_call]
    assert [host_reads(c) for c in moma.per_eval] == [host_reads(c) for c in plain.per_eval]
    # the schedule is read once per run, before sampling starts
    assert host_reads(moma.total) - host_reads(plain.total) <= 3

    # MoMA really ran: per call its three fused attentions in each of the 16 layers (object path from step 2)
    sdpa = "_scaled_dot_product_flash_attention_for_cpu"
    if sdpa in moma.per_call[-1]:
        assert moma.per_call[-1][sdpa] - plain.per_call[-1].get(sdpa, 0) == 48
    added = [ModelCallCounts.ops(m) - ModelCallCounts.ops(p) for m, p in zip(moma.per_call[1:], plain.per_call[1:])]
    assert statistics.median(added) <= MAX_ADDED_OPS_PER_CALL, added


@pytest.mark.default_host_only
def test_gates_decided_on_device_equal_the_host_decision(sampling_setup, moma_model, moma_context):
    """Within a sampling run the t < 950 gate is a device-side 0/1 factor; the result is bit for bit what
    reading the sigma on the host gives (the path outside a sampler), also with a start/end window."""
    model, bank, positive, negative = sampling_setup
    for start, end in ((0.0, 1.0), (0.3, 0.8)):
        patched = apply_moma(model, moma_model, moma_context, bank, 1.0, start, end)
        run = _run_of(patched)
        plan = run.schedule_plan
        on_device, _ = _sample(patched, positive, negative)
        run.schedule_plan = lambda *args: None  # no plan: every UNet call reads its sigma (and syncs)
        on_host, calls = _sample(patched, positive, negative)
        run.schedule_plan = plan
        assert sum(host_reads(c) for c in calls.per_call) >= 3  # the fallback path does read
        assert torch.equal(on_device, on_host), (start, end)
    assert not torch.equal(on_device, _sample(model, positive, negative)[0])  # and MoMA changed the result


def test_schedule_plan_decides_whole_runs(sampling_setup, moma_model, moma_context):
    model, bank, _, _ = sampling_setup
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(ms, "normal", 20)
    late = full[12:]  # the low-noise end of the schedule (t well below 950)
    run = _run_of(apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 1.0))
    assert run.schedule_plan(full) == (None, True)  # object path switches on during the run
    assert run.schedule_plan(late) == (True, True)
    windowed = _run_of(apply_moma(model, moma_model, moma_context, bank, 1.0, 0.0, 0.3))
    assert windowed.schedule_plan(late) == (False, False)  # MoMA off for the whole run
    assert windowed.idle.run_inactive() is False  # (only a run's own plan makes it inactive)
