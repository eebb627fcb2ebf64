"""Reference picture preparation for the LLaVA path (spec 1 and 2, "Image preprocessing for the MLLM").

The reference opens 8-bit files with PIL, stretches image and mask to 512x512 (PIL bilinear, no aspect
preservation), binarises the mask with "value > 0", whitens the background (image*mask + 255*(1-mask))
and hands the 8-bit result to LLaVA's ``process_images`` (expand2square, a no-op on a square picture, then
CLIPImageProcessor: bicubic shortest edge 336, centre crop 336, /255, OpenAI mean/std).

ComfyUI hands us float tensors instead of files, so the one extra step is the conversion to 8 bit:
``floor(x * 255 + 0.5)`` after clamping to [0, 1]. For a picture ComfyUI loaded from an 8-bit file this
gives back the file's bytes exactly; a 16-bit source is quantised to 8 bit here (as the reference works in
8 bit). Channels: 3 = RGB; 4 = RGBA, alpha dropped (not composited, like PIL ``convert("RGB")``);
1 = grey, repeated to RGB; 2 = grey + alpha, alpha dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import MomaError
from .transformers_compat import clip_image_processor_class

REFERENCE_SIZE = 512  # the reference stretches every picture and mask to 512x512
CLIP_IMAGE_SIZE = 336
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHITE = 255


@dataclass
class PreparedReference:
    """The reference picture at 512x512, as the upstream dataset code builds it."""

    rgb: np.ndarray  # [512, 512, 3] uint8, un-whitened (what the UNet reference pass sees)
    object_mask: np.ndarray  # [512, 512] bool, "resized value > 0"
    whitened: Image.Image  # 512x512 RGB, background pure white (what LLaVA sees)


def to_uint8(values: torch.Tensor) -> np.ndarray:
    """Float 0..1 (any shape) -> uint8 with round-half-up; NaN counts as 0."""
    values = torch.nan_to_num(values.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0)
    return torch.floor(values * 255.0 + 0.5).to(torch.uint8).numpy()


def image_to_rgb_uint8(image: torch.Tensor) -> np.ndarray:
    """ComfyUI picture [H, W, C] float 0..1 -> [H, W, 3] uint8 (see the module docstring for channels)."""
    if image.ndim != 3:
        raise MomaError(f"Reference image must be [H, W, C] (one picture); got shape {tuple(image.shape)}.")
    channels = image.shape[-1]
    if channels in (1, 2):
        image = image[..., :1].expand(*image.shape[:-1], 3)
    elif channels in (3, 4):
        image = image[..., :3]
    else:
        raise MomaError(
            f"Reference image has {channels} channels; expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA)."
        )
    return to_uint8(image)


def mask_to_uint8(mask: torch.Tensor) -> np.ndarray:
    """ComfyUI mask [H, W] (or [1, H, W]) float 0..1 -> [H, W] uint8."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise MomaError(f"Object mask must be [H, W] (one mask); got shape {tuple(mask.shape)}.")
    return to_uint8(mask)


def prepare_reference(image: torch.Tensor, mask: torch.Tensor, size: int = REFERENCE_SIZE) -> PreparedReference:
    """Stretch picture and mask to ``size`` x ``size`` (PIL bilinear), binarise the mask (> 0), whiten.

    ``image`` [H, W, C] and ``mask`` [H, W] are resized independently, so they may differ in size (as two
    upstream files may).
    """
    rgb = Image.fromarray(image_to_rgb_uint8(image)).resize((size, size), Image.BILINEAR)
    mask_image = Image.fromarray(mask_to_uint8(mask)).resize((size, size), Image.BILINEAR)
    rgb_array = np.asarray(rgb, dtype=np.uint8)
    object_mask = np.asarray(mask_image) > 0
    whitened = np.where(object_mask[..., None], rgb_array, np.uint8(WHITE)).astype(np.uint8)
    return PreparedReference(rgb=rgb_array, object_mask=object_mask, whitened=Image.fromarray(whitened))


def load_clip_image_processor(clip_vision_path: str | Path | None = None):
    """CLIPImageProcessor (PIL backend) from the CLIP folder's preprocessor_config.json, else OpenAI 336 defaults."""
    processor_class = clip_image_processor_class()  # PIL-backed on transformers 4 and 5
    if clip_vision_path is not None:
        folder = Path(clip_vision_path)
        if folder.is_dir() and (folder / "preprocessor_config.json").is_file():
            try:
                return processor_class.from_pretrained(str(folder))
            except Exception as error:  # a broken json or unknown fields
                raise MomaError(
                    f"Could not read {folder / 'preprocessor_config.json'} ({type(error).__name__}: {error}). Use the "
                    f"file from openai/clip-vit-large-patch14-336 or delete it to use the OpenAI defaults."
                ) from None
    return processor_class(
        do_resize=True,
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        resample=Image.BICUBIC,
        do_center_crop=True,
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def clip_pixel_values(whitened: Image.Image, processor) -> torch.Tensor:
    """The whitened 512x512 picture -> CLIP pixel values [1, 3, 336, 336] float32.

    LLaVA's ``expand2square`` is skipped: it returns a square picture unchanged.
    """
    if whitened.width != whitened.height:
        raise MomaError(f"Internal: the LLaVA reference must be square, got {whitened.size}.")
    pixels = processor(images=whitened, return_tensors="pt")["pixel_values"]
    return torch.as_tensor(pixels, dtype=torch.float32)


def llava_pixel_values(image: torch.Tensor, mask: torch.Tensor, processor) -> torch.Tensor:
    """ComfyUI picture [H, W, C] + object mask [H, W] -> LLaVA's pixel values [1, 3, 336, 336]."""
    return clip_pixel_values(prepare_reference(image, mask).whitened, processor)
