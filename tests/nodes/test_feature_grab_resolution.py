"""Feature Grab's optional LATENT input: the reference encoded at the generation's size."""
from __future__ import annotations

import pytest
import torch

from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.reference import generation_resolution, reference_pixel_size
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
    _same_bank(matched, explicit)  # a 128x128 generation: as if resolution were set to 128
    assert matched.layer_token_counts()[("input", 1)] < grab_reference_features(*grab_inputs, resolution=512) \
        .layer_token_counts()[("input", 1)]
    with pytest.raises(MomaError, match="'latent' must be a LATENT"):
        _node(grab_inputs, resolution=512, latent={"samples": torch.zeros(16, 16)})


def test_old_inputs_stay_and_the_latent_is_optional():
    """Saved workflows store the 'resolution' INT: it keeps its name, type and default."""
    inputs = {i.id: i for i in MomaFeatureGrab.define_schema().inputs}
    assert inputs["resolution"].get_io_type() == "INT" and inputs["resolution"].default == 512
    assert inputs["latent"].get_io_type() == "LATENT" and inputs["latent"].optional
