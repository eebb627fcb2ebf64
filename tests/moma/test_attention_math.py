"""MoMA's attention maths and subject-mask recipe on tiny tensors, against explicit formulas."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfyui_moma.moma import attention, reference, subject_mask
from comfyui_moma.moma.errors import MomaError

REPO = Path(__file__).resolve().parents[2]


def explicit_attention(q, k, v, heads, bias=None):
    b, n, c = q.shape
    d = c // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, n, c), scores.softmax(-1)


def test_packed_reference_bank_equals_reference_bias_masking():
    """Attending over the object's keys only == the reference's -65504 background bias (exactly 0 weight)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 16, 32, generator=g)
    k_full = torch.randn(36, 32, generator=g)
    v_full = torch.randn(36, 32, generator=g)
    fg = torch.rand(36, generator=g) > 0.6
    bias = torch.where(fg, torch.tensor(1.0), torch.tensor(-65504.0)).view(1, 1, 1, -1)
    expected, _ = explicit_attention(q, k_full.expand(2, -1, -1), v_full.expand(2, -1, -1), 4, bias)
    packed = attention.reference_attention(q, k_full[fg], v_full[fg], 4)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-6)


def test_text_attention_output_and_subject_map():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 9, 16, generator=g),
        torch.randn(2, 77, 16, generator=g),
        torch.randn(2, 77, 16, generator=g),
    )
    cols = torch.tensor([4, 7])
    out, subject_map = attention.text_attention_with_subject_probs(q, k, v, 2, cols)
    expected, probs = explicit_attention(q, k, v, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(subject_map, probs.mean(1)[:, :, [4, 7]].sum(-1), rtol=1e-5, atol=1e-7)
    none_out, only_map = attention.text_attention_with_subject_probs(q, k, v, 2, cols, compute_output=False)
    assert none_out is None and torch.equal(only_map, subject_map)


def test_object_shortcut_gain_and_mask():
    self_out, ref_out = torch.ones(2, 4, 8), torch.full((2, 4, 8), 2.0)
    mask = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 4, 1).expand(2, -1, -1)
    out = attention.add_object_shortcut(self_out, ref_out, 0.3, mask)
    torch.testing.assert_close(out, 1 + 0.3 * 2 * mask.expand(-1, -1, 8))
    assert torch.equal(attention.add_object_shortcut(self_out, ref_out, 0.0, None), self_out)


def reference_recipe(layer_probs, grids, pixel_size):
    """The reference's get_mask_from_cross at pixel resolution: rows [uncond, cond]."""
    maps = []
    for probs, grid in zip(layer_probs, grids):
        lo, hi = probs.min(-1, keepdim=True).values, probs.max(-1, keepdim=True).values
        m = ((probs - lo) / (hi - lo)).reshape(-1, 1, *grid)
        maps.append(F.interpolate(m, size=pixel_size, mode="nearest").clamp(0, 1))
    mask = torch.cat(maps, 1).mean(1)
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    mask = (mask > 0.2).float() * mask
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    return mask[1:]


@pytest.mark.parametrize("latent", [(8, 8), (8, 12)])
def test_tracker_matches_reference_recipe_batched_or_split(latent):
    """Batched [uncond, cond] calls and separate cond / uncond calls give the reference's mask."""
    h, w = latent
    grids = [(h, w), (h // 2, w // 2), (h // 4, w // 4), (h // 4, w // 4), (h // 2, w // 2)]
    g = torch.Generator().manual_seed(2)
    layer_probs = [torch.rand(2, gh * gw, generator=g) for gh, gw in grids]
    expected = reference_recipe(layer_probs, grids, (h * 8, w * 8))
    expected_latent = F.interpolate(expected.unsqueeze(1), size=(h, w), mode="nearest")[:, 0]

    batched = subject_mask.SubjectMaskTracker()
    split = subject_mask.SubjectMaskTracker()
    queued = subject_mask.SubjectMaskTracker()  # what the patches do: probabilities queued, maps per grid at the end
    queued_split = subject_mask.SubjectMaskTracker()
    for probs, grid in zip(layer_probs, grids):
        batched.add(subject_mask.layer_subject_map(probs, grid, (h, w)), [1, 0])
        split.add(subject_mask.layer_subject_map(probs[1:], grid, (h, w)), [0])
        split.add(subject_mask.layer_subject_map(probs[:1], grid, (h, w)), [1])
        queued.add_probs(probs, grid, (h, w), [1, 0])
        queued_split.add_probs(probs[1:], grid, (h, w), [0])
        queued_split.add_probs(probs[:1], grid, (h, w), [1])
    for tracker in (batched, split, queued, queued_split):
        tracker.finish_evaluation()
        torch.testing.assert_close(tracker.mask, expected_latent, rtol=1e-5, atol=1e-6)
    rows = batched.rows((h // 2, w // 2), 2, torch.device("cpu"), torch.float32)
    assert rows.shape == (2, (h // 2) * (w // 2), 1)


def test_tracker_batch_items_are_independent_and_reset():
    g = torch.Generator().manual_seed(3)
    tracker = subject_mask.SubjectMaskTracker()
    probs = torch.rand(4, 16, generator=g)  # rows: uncond item0, uncond item1, cond item0, cond item1
    tracker.add(subject_mask.layer_subject_map(probs, (4, 4), (4, 4)), [1, 0])
    tracker.finish_evaluation()
    solo = subject_mask.SubjectMaskTracker()
    solo.add(subject_mask.layer_subject_map(probs[[1, 3]], (4, 4), (4, 4)), [1, 0])
    solo.finish_evaluation()
    torch.testing.assert_close(tracker.mask[1], solo.mask[0])
    tracker.reset()
    assert tracker.mask is None


def test_discarded_evaluation_leaves_the_mask_as_it_was():
    """Maps queued by an evaluation that is not closed (a PAG-style extra call) never reach the mask."""
    g = torch.Generator().manual_seed(5)
    tracker = subject_mask.SubjectMaskTracker()
    tracker.add_probs(torch.rand(2, 16, generator=g), (4, 4), (4, 4), [1, 0])
    tracker.finish_evaluation()
    mask = tracker.mask.clone()
    tracker.add_probs(torch.rand(1, 16, generator=g), (4, 4), (4, 4), [0])
    tracker.discard_partial()
    tracker.finish_evaluation()
    assert torch.equal(tracker.mask, mask)


def test_missing_subject_gives_no_mask_instead_of_nan():
    tracker = subject_mask.SubjectMaskTracker()
    tracker.add(subject_mask.layer_subject_map(torch.zeros(2, 16), (4, 4), (4, 4)), [1, 0])
    tracker.finish_evaluation()
    assert tracker.mask is None


def test_subject_token_positions_every_occurrence():
    ids = [49406, 1125, 539, 320, 1615, 269, 320, 1615, 530, 49407]
    assert subject_mask.subject_token_positions(ids, {1615}) == [4, 7]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((512, 512), (512, 512)),
        ((1000, 1000), (512, 512)),
        ((512, 768), (448, 640)),
        ((64, 96), (448, 640)),
        ((30, 3000), (64, 1024)),
    ],
)
def test_reference_pixel_size_keeps_aspect_and_area(size, expected):
    assert reference.reference_pixel_size(*size) == expected


def test_object_mask_binarised_at_any_nonzero_and_token_index():
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:12, 4:12] = 0.01  # JPEG-noise level values count as object in the reference
    binary = reference.binarise_object_mask(mask, (16, 16))
    assert binary.sum() == 64
    index = reference.object_token_index(binary, (4, 4))
    assert index.tolist() == [5, 6, 9, 10]
    assert reference.object_token_index(torch.zeros(16, 16, dtype=torch.bool), (4, 4)) is None


def test_to_rgb_accepts_grey_rgba_and_rejects_two_channels():
    assert reference.to_rgb(torch.rand(1, 4, 4, 1)).shape == (1, 4, 4, 3)
    assert reference.to_rgb(torch.rand(1, 4, 4, 4)).shape == (1, 4, 4, 3)
    with pytest.raises(MomaError, match="2 channels"):
        reference.to_rgb(torch.rand(1, 4, 4, 2))


def test_moma_package_imports_without_comfyui():
    """moma/ is the method alone: importing all of it must not pull in ComfyUI."""
    code = (
        "import importlib.util, sys, pkgutil\n"
        f"spec = importlib.util.spec_from_file_location('moma', r'{REPO / 'moma' / '__init__.py'}', "
        f"submodule_search_locations=[r'{REPO / 'moma'}'])\n"
        "pkg = importlib.util.module_from_spec(spec); sys.modules['moma'] = pkg; spec.loader.exec_module(pkg)\n"
        "for info in pkgutil.iter_modules(pkg.__path__): importlib.import_module('moma.' + info.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'execution', 'server')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def _fp64_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v per head in float64, written out here; also the probabilities [B, H, N, L]."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().view(b, v.shape[1], heads, d).transpose(1, 2)
    probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, n, c), probs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_paths_keep_dtype_and_match_an_fp64_derivation(dtype):
    """The model's own dtype goes in and out (fp16/bf16 on GPUs), probabilities are formed in fp32: checked against
    the same formulas in float64 on the very same (rounded) inputs, within the output dtype's rounding."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 16, 32, generator=g).to(dtype) for _ in range(3))
    text_k, text_v = torch.randn(2, 77, 32, generator=g).to(dtype), torch.randn(2, 77, 32, generator=g).to(dtype)
    cols = torch.tensor([3, 9])
    out16, map16 = attention.text_attention_with_subject_probs(q, text_k, text_v, 4, cols)
    assert out16.dtype == dtype and map16.dtype == torch.float32
    expected_out, probs = _fp64_attention(q, text_k, text_v, 4)
    expected_map = probs[..., cols].sum(-1).mean(1)  # subject mass, head mean: [B, N]
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out16.double(), expected_out, rtol=0, atol=4 * eps * float(expected_out.abs().max()))
    torch.testing.assert_close(map16.double(), expected_map, rtol=0, atol=1e-5)  # fp32 probabilities
    ref16 = attention.reference_attention(q, k[0], v[0], 4)
    assert ref16.dtype == dtype and torch.isfinite(ref16).all()
    expected_ref, _ = _fp64_attention(q, k[0].expand(2, -1, -1), v[0].expand(2, -1, -1), 4)
    torch.testing.assert_close(ref16.double(), expected_ref, rtol=0, atol=8 * eps * float(expected_ref.abs().max()))


def test_head_layout_forms_equal_the_explicit_ones():
    """The per-step path's fused forms: subject mass through an attention with indicator values, and the bank
    attention with the rows folded into the queries, equal the explicit formulas."""
    g = torch.Generator().manual_seed(6)
    heads, d = 4, 8
    q, k = torch.randn(3, 20, heads * d, generator=g), torch.randn(3, 77, heads * d, generator=g)
    cols = torch.tensor([4, 7, 30])
    indicator = attention.subject_indicator_values(77, cols, heads, d, 3, torch.device("cpu"), torch.float32)
    mass = attention.subject_attention_mass(attention.split_heads(q, heads), attention.split_heads(k, heads), indicator)
    _, probs = explicit_attention(q, k, k, heads)
    torch.testing.assert_close(mass, probs.mean(1)[:, :, [4, 7, 30]].sum(-1), rtol=1e-5, atol=1e-7)

    ref_k, ref_v = torch.randn(11, heads * d, generator=g), torch.randn(11, heads * d, generator=g)
    folded = attention.reference_attention_heads(
        q, attention.split_heads(ref_k[None], heads), attention.split_heads(ref_v[None], heads)
    )
    expected, _ = explicit_attention(q, ref_k.expand(3, -1, -1), ref_v.expand(3, -1, -1), heads)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)


def test_subject_mask_validity_is_a_device_flag():
    """The sampling path gets the mask and a validity flag without a host read; the tracker turns a mask
    without information into no mask (all ones where it is used)."""
    g = torch.Generator().manual_seed(8)
    cond, uncond = torch.rand(2, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)
    mask, valid = subject_mask.subject_mask_and_validity(cond, uncond)
    assert valid.dim() == 0 and bool(valid)
    torch.testing.assert_close(subject_mask.combine_subject_maps(cond, uncond), mask)
    flat = torch.zeros(2, 4, 4)
    flat_mask, flat_valid = subject_mask.subject_mask_and_validity(flat, flat)
    assert not bool(flat_valid) and torch.isfinite(flat_mask).all()
    assert subject_mask.combine_subject_maps(flat, flat) is None
    tracker = subject_mask.SubjectMaskTracker()
    tracker.add(flat, [1, 0])
    tracker.finish_evaluation()
    assert tracker.mask is None
    assert torch.equal(tracker.rows((2, 2), 2, torch.device("cpu"), torch.float32), torch.ones(2, 4, 1))
