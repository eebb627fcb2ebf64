"""LLaVA's pixel tensor (spec 1 and 2), re-derived with PIL and numpy in the test.

Recipe: 8-bit picture and mask -> PIL bilinear resize to 512x512 each -> mask > 0 -> background 255 ->
PIL bicubic resize to 336 (shortest edge; the picture is square) -> /255 -> (x - mean) / std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.images import llava_pixel_values, load_clip_image_processor, prepare_reference
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _expected_pixels(rgb_u8: np.ndarray, mask_u8: np.ndarray) -> torch.Tensor:
    picture = np.asarray(Image.fromarray(rgb_u8).resize((512, 512), Image.BILINEAR))
    foreground = np.asarray(Image.fromarray(mask_u8).resize((512, 512), Image.BILINEAR)) > 0
    white = np.where(foreground[..., None], picture, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(white).resize((336, 336), Image.BICUBIC))
    scaled = (small.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(((scaled - MEAN) / STD).transpose(2, 0, 1)[None].copy())


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC))  # smooth, not pure noise


def _mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 5 : height * 3 // 4, width // 4 : width * 2 // 3] = 255
    mask[2, 3] = 1  # a single faint pixel: "> 0" makes it object after the resize too
    return mask


def _comfy(array: np.ndarray) -> torch.Tensor:
    """What ComfyUI's LoadImage makes of an 8-bit file: float32 / 255."""
    return torch.from_numpy(array.astype(np.float32) / 255.0)


@pytest.fixture(scope="module")
def processor(clip_vision_dir: Path):
    return load_clip_image_processor(clip_vision_dir)


@pytest.mark.parametrize("height,width", [(512, 512), (300, 420), (777, 256)])
def test_pixels_match_the_pil_recipe(processor, height: int, width: int) -> None:
    rgb, mask = _picture(height, width, seed=height), _mask(height, width)
    pixels = llava_pixel_values(_comfy(rgb), _comfy(mask), processor)
    assert pixels.shape == (1, 3, 336, 336) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, _expected_pixels(rgb, mask), rtol=0, atol=1e-6)


def test_preprocessor_config_of_the_folder_equals_the_openai_defaults(clip_vision_dir: Path) -> None:
    rgb, mask = _picture(256, 256, seed=1), _mask(256, 256)
    from_folder = llava_pixel_values(_comfy(rgb), _comfy(mask), load_clip_image_processor(clip_vision_dir))
    defaults = llava_pixel_values(_comfy(rgb), _comfy(mask), load_clip_image_processor(None))
    assert torch.equal(from_folder, defaults)


def test_rgba_grey_and_16_bit_have_defined_results(processor) -> None:
    rgb, mask = _picture(200, 300, seed=5), _comfy(_mask(200, 300))
    reference = llava_pixel_values(_comfy(rgb), mask, processor)
    alpha = np.full((200, 300, 1), 17, np.uint8)
    rgba = llava_pixel_values(_comfy(np.concatenate([rgb, alpha], -1)), mask, processor)
    assert torch.equal(rgba, reference)  # alpha dropped, not composited

    grey = rgb[..., 1]
    as_grey = llava_pixel_values(_comfy(grey[..., None]), mask, processor)
    as_rgb = llava_pixel_values(_comfy(np.repeat(grey[..., None], 3, -1)), mask, processor)
    assert torch.equal(as_grey, as_rgb)

    sixteen = (rgb.astype(np.float64) * 257 + np.random.default_rng(3).integers(-120, 121, rgb.shape)).clip(0, 65535)
    deep = torch.from_numpy((sixteen / 65535).astype(np.float32))
    rounded = np.floor(sixteen / 65535 * 255 + 0.5).astype(np.uint8)
    torch.testing.assert_close(
        llava_pixel_values(deep, mask, processor), _expected_pixels(rounded, _mask(200, 300)), rtol=0, atol=1e-6
    )


def test_empty_mask_gives_white_and_prepared_reference_keeps_the_unwhitened_picture(processor) -> None:
    rgb = _picture(128, 128, seed=9)
    prepared = prepare_reference(_comfy(rgb), torch.zeros(128, 128))
    assert not prepared.object_mask.any()
    assert (np.asarray(prepared.whitened) == 255).all()
    assert np.array_equal(prepared.rgb, np.asarray(Image.fromarray(rgb).resize((512, 512), Image.BILINEAR)))
    white = llava_pixel_values(_comfy(rgb), torch.zeros(128, 128), processor)
    torch.testing.assert_close(white[0, :, 0, 0], torch.from_numpy((1.0 - MEAN) / STD), rtol=0, atol=1e-6)


def test_bad_shapes_are_refused(processor) -> None:
    with pytest.raises(MomaError, match="5 channels"):
        llava_pixel_values(torch.zeros(8, 8, 5), torch.zeros(8, 8), processor)
    with pytest.raises(MomaError, match=r"\[H, W\]"):
        llava_pixel_values(torch.zeros(8, 8, 3), torch.zeros(2, 8, 8), processor)
