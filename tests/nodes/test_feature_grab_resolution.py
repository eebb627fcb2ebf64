"""Feature Grab at the generation's size: 'auto' (resolution 0, the default, read when sampling starts) and the
optional LATENT input; several pictures of one object."""

from __future__ import annotations

import pytest
import torch
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.reference import AutoReferenceBank, ReferenceBank, generation_resolution, reference_pixel_size
from comfyui_moma.nodes.apply import apply_moma
from comfyui_moma.nodes.feature_grab import MomaFeatureGrab, grab_reference_features

pytestmark = pytest.mark.slow


def test_generation_resolution_is_the_square_equivalent_side():
    assert generation_resolution(64, 64) == 512
    assert generation_resolution(32, 32) == 256
    assert generation_resolution(64, 96) == 627  # 512x768: area kept, the reference's aspect decides the sides
    assert reference_pixel_size(512, 512, generation_resolution(64, 96)) == (640, 640)
    assert generation_resolution(1, 1) == 64 and generation_resolution(512, 512) == 1024


@pytest.fixture(scope="module")
def grab_inputs(sd15_models, moma_model, moma_context, test_images, load_image_tensor):
    model, clip, vae = sd15_models
    image, mask = load_image_tensor(*test_images["rgb"])
    return model, moma_model, vae, clip, image, mask, moma_context.subject, 5


def _node(inputs, **kwargs):
    return MomaFeatureGrab.execute(*inputs, **kwargs).result[0]


def _same_bank(a, b):
    assert a.pixel_size == b.pixel_size
    assert set(a.keys) == set(b.keys)
    for block in a.keys:
        assert torch.equal(a.keys[block], b.keys[block]) and torch.equal(a.values[block], b.values[block])


def test_latent_sets_the_resolution_and_explicit_resolution_is_unchanged(grab_inputs):
    explicit = grab_reference_features(*grab_inputs, resolution=128)
    _same_bank(_node(grab_inputs, resolution=128), explicit)  # no latent: the resolution widget, as before
    matched = _node(grab_inputs, resolution=512, latent={"samples": torch.zeros(1, 4, 16, 16)})
    _same_bank(matched, explicit)  # a 128x128 generation: as if resolution were set to 128 (not the widget's 512)
    assert matched.resolution == 128
    with pytest.raises(MomaError, match="'latent' must be a LATENT"):
        _node(grab_inputs, resolution=512, latent={"samples": torch.zeros(16, 16)})


def test_old_inputs_stay_and_the_latent_is_optional():
    """Saved workflows store the 'resolution' INT: it keeps its name, type and range (their 512 stays 512); a new
    node starts at 0, auto."""
    inputs = {i.id: i for i in MomaFeatureGrab.define_schema().inputs}
    assert inputs["resolution"].get_io_type() == "INT" and inputs["resolution"].default == 0
    assert inputs["resolution"].min == 0 and inputs["resolution"].max == 1024
    assert inputs["latent"].get_io_type() == "LATENT" and inputs["latent"].optional


@pytest.mark.default_host_only
def test_auto_makes_the_matched_bank_for_each_size_it_is_asked_for(grab_inputs):
    auto = _node(grab_inputs)  # every optional input and widget at its default
    assert isinstance(auto, AutoReferenceBank)
    at_128 = auto.bank_for_latent(16, 16)
    assert isinstance(at_128, ReferenceBank) and at_128.resolution == 128
    _same_bank(at_128, grab_reference_features(*grab_inputs, resolution=128))
    assert auto.bank_for_latent(16, 16) is at_128  # made once per size
    _same_bank(
        auto.bank_for_latent(8, 12), grab_reference_features(*grab_inputs, resolution=generation_resolution(8, 12))
    )
    with pytest.raises(MomaError, match="use 0 \\(auto\\) or 64..1024"):
        _node(grab_inputs, resolution=32)


def test_auto_reference_pass_runs_at_the_size_being_sampled(grab_inputs, moma_context):
    """Sampling a model patched with an 'auto' reference gives exactly what the reference grabbed at that size
    gives, for each of two sizes sampled from one patched model."""
    import nodes

    model, moma_model, _vae, clip = grab_inputs[:4]
    auto = _node(grab_inputs)
    positive = nodes.CLIPTextEncode().encode(clip, moma_context.sd_prompt)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    patched_auto = apply_moma(model, moma_model, moma_context, auto, 1.0, 0.0, 1.0)
    for latent_hw in ((8, 8), (8, 12)):
        latent = {"samples": torch.zeros(1, 4, *latent_hw)}
        explicit = grab_reference_features(*grab_inputs, resolution=generation_resolution(*latent_hw))
        patched_explicit = apply_moma(model, moma_model, moma_context, explicit, 1.0, 0.0, 1.0)
        ours = nodes.common_ksampler(patched_auto, 3, 2, 7.5, "euler", "normal", positive, negative, latent)[0][
            "samples"
        ]
        expected = nodes.common_ksampler(patched_explicit, 3, 2, 7.5, "euler", "normal", positive, negative, latent)[0]
        assert torch.equal(ours, expected["samples"])
    plain = nodes.common_ksampler(model, 3, 2, 7.5, "euler", "normal", positive, negative, latent)[0]["samples"]
    assert not torch.equal(ours, plain)  # the reference acted


def test_mask_count_must_match_the_pictures(grab_inputs):
    model, moma_model, vae, clip, image, mask, subject, seed = grab_inputs
    views = torch.cat([image, image, image])
    with pytest.raises(MomaError, match="3 reference pictures but 2 masks"):
        grab_reference_features(model, moma_model, vae, clip, views, torch.cat([mask, mask]), subject, seed, 128)
    one_mask = grab_reference_features(model, moma_model, vae, clip, views[:2], mask, subject, seed, 128)
    assert one_mask.views == 2  # one mask serves every picture
