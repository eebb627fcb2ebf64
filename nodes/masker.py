"""MoMA Object Masker: reference IMAGE -> object MASK and the white-background IMAGE LLaVA sees."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..moma import masker
from . import host_contract
from .node_api import io
from .paths import REMBG_FOLDER
from .validation import checked_inputs, choice_problem, input_problems, verdict

log = logging.getLogger(__name__)


def rembg_model_choices() -> list[str]:
    """Supported rembg models, those whose file is already in models/rembg first (then table order)."""
    folders = folder_paths.get_folder_paths(REMBG_FOLDER)
    names = list(masker.REMBG_MODELS)
    present = [name for name in names if masker.find_model_file(name, folders) is not None]
    return present + [name for name in names if name not in present]


def _onnx_providers() -> list[str] | None:
    # ComfyUI on CPU (--cpu) keeps rembg on CPU too; otherwise rembg picks CUDA when onnxruntime-gpu has it.
    if comfy.model_management.get_torch_device().type == "cpu":
        return ["CPUExecutionProvider"]
    return None


class _DownloadProgress:
    """Reports a model download on ComfyUI's progress bar in KiB, once per percent (each update is also
    an interrupt point)."""

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None
        self.last_percent = -1

    def __call__(self, done: int, total: int | None) -> None:
        total_kib = (total or done) // 1024 or 1
        percent = 100 * done // (total or done or 1)
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total_kib)
        if percent != self.last_percent:
            self.last_percent = percent
            self.bar.update_absolute(done // 1024, total_kib)


class MomaObjectMasker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        choices = rembg_model_choices()
        return io.Schema(
            node_id="MomaObjectMasker",
            display_name="MoMA Object Masker",
            category="MoMA",
            description=(
                "Masks the object of a reference image and shows it on a white background, the picture MoMA's "
                "LLaVA sees. The mask is the one you connect, else the IMAGE's alpha when it is an RGBA cut-out, "
                "else rembg's. Load Image splits a cut-out PNG into the picture without alpha (IMAGE) and its "
                "transparency (MASK, 1 = transparent): to use the cut-out, pass both through Join Image with Alpha "
                "into 'image' (a picture without transparency then goes to rembg), or wire that MASK into 'mask' "
                "with 'invert' on."
            ),
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="The reference image(s). An RGBA IMAGE with a real cut-out uses its "
                    "alpha instead of rembg. Load Image's IMAGE has no alpha: for a cut-out PNG, join it "
                    "with Load Image's MASK in Join Image with Alpha first.",
                ),
                io.Combo.Input(
                    "rembg_model",
                    options=choices,
                    default=masker.DEFAULT_REMBG_MODEL,
                    tooltip=(
                        "rembg model, read from models/rembg/<name>.onnx (models already there are listed "
                        "first). A missing file is downloaded from rembg's release page with a progress bar. "
                        "Not used when a mask is connected or the image has an alpha cut-out."
                    ),
                ),
                io.Float.Input(
                    "threshold",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Pixels with mask > threshold become object (1), the rest background (0). "
                    "0 keeps the soft mask values.",
                ),
                io.Int.Input(
                    "grow",
                    default=0,
                    min=-512,
                    max=512,
                    step=1,
                    tooltip="Grow the object by this many pixels (square neighbourhood); negative shrinks it. "
                    "Applied after the threshold, before invert.",
                ),
                io.Boolean.Input(
                    "invert",
                    default=False,
                    tooltip="Swap object and background (applied last).",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional object mask (1 = object), e.g. from SAM: it is thresholded, grown and "
                    "inverted like rembg's, and rembg is not run. Load Image's MASK of a cut-out PNG is "
                    "its transparency (1 = background): use it here with invert on. For a picture without "
                    "transparency that MASK is all 0 (the whole picture, inverted): use Join Image with "
                    "Alpha instead.",
                ),
            ],
            outputs=[
                # V3 ids must differ from the input ids ("mask" is the optional input); the socket reads "mask".
                io.Mask.Output("object_mask", display_name="mask", tooltip="The object mask [B, H, W], 1 = object."),
                io.Image.Output(
                    "white_background",
                    display_name="white_background",
                    tooltip="The image with the background painted white: image·mask + (1 − mask), RGB.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, threshold: float | None = None, rembg_model: str | None = None) -> bool | str:
        values = {"threshold": threshold, "rembg_model": rembg_model}
        problems = input_problems(cls, values)
        if not problems:  # ComfyUI 0.3.x does not check V3 combo values
            problem = choice_problem("rembg_model", rembg_model, list(masker.REMBG_MODELS))
            problems += [problem] if problem else []
        return verdict(problems, values)

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        rembg_model: str,
        threshold: float,
        grow: int,
        invert: bool,
        mask: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        host_contract.require(host_contract.MASKER)
        checked_inputs(cls, {"threshold": threshold, "rembg_model": rembg_model})

        def load_session() -> Any:
            folders = folder_paths.get_folder_paths(REMBG_FOLDER)
            path = masker.resolve_model_file(rembg_model, folders, progress=_DownloadProgress())
            return masker.load_rembg_session(rembg_model, path, providers=_onnx_providers())

        if mask is not None and mask.numel() and bool(mask.min() == mask.max()):
            value = mask.reshape(-1)[:1].reshape(1, 1).float()
            whole = bool(masker.refine_mask(value, threshold, 0, invert).all())
            log.warning(
                "MoMA Object Masker: the connected mask is %g everywhere (Load Image's MASK of a picture "
                "without transparency is all 0), so the object is %s. Disconnect it to use rembg; for a "
                "cut-out PNG, pass Load Image's IMAGE and MASK through Join Image with Alpha into 'image'.",
                float(value),
                "the whole picture" if whole else "nothing",
            )
        object_mask, white = masker.object_masks(
            image, load_session, input_mask=mask, threshold=threshold, grow=grow, invert=invert
        )
        device = comfy.model_management.intermediate_device()
        return io.NodeOutput(object_mask.to(device), white.to(device))
