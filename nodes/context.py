"""LLaVA Context Encoder (reference + texts -> MOMA_CONTEXT) and Save / Load MoMA Context (.safetensors)."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import comfy.cli_args
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch

from ..moma.context import (
    CONTEXT_HINT,
    check_context_texts,
    context_metadata,
    load_context,
    save_context,
)
from ..moma.context import (
    MomaContext as MomaContextObject,
)
from ..moma.errors import MomaError
from ..moma.llava import LlavaContextEncoder
from ..moma.model import MomaModel as MomaModelObject
from ..moma.model import check_texts, encode_context_views
from ..moma.streaming import resolve_placement, stream_device_bytes
from . import host_contract
from .common import warn_if_constant_picture
from .node_api import io
from .paths import log_listing_problem, output_prefix, resolve_inside, walk_folders
from .types import MomaContext, MomaModel
from .validation import checked_inputs, input_problems, verdict

log = logging.getLogger(__name__)

REFERENCE_NOTES = (
    "A batch of pictures is several views of the same object: LLaVA encodes each with the same subject and "
    "prompt, and the context is the mean of their LLaVA embeddings (cond tokens = the projector of that mean; "
    "one picture gives MoMA's own context). Give one mask per picture, or one mask for all. Any size or aspect "
    "is stretched to 512x512 like the reference; RGBA loses its alpha (not composited), grey is repeated to RGB, "
    "deeper than 8-bit pictures are rounded to 8 bit; the mask counts every pixel > 0 after resizing as object, "
    "an empty mask gives an all-white picture."
)


def reference_views(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [B, H, W, C] and MASK [B, H, W] (or one mask, [1, H, W] / [H, W], for every view) -> the views
    [B, H, W, C] and one mask per view [B, H, W]; warns about single-colour pictures and empty masks per view."""
    node = "LLaVA Context Encoder"
    if image.ndim != 4 or image.shape[0] < 1:
        raise MomaError(
            f"{node}: image has shape {tuple(image.shape)}; expected an IMAGE [B, H, W, C] (B pictures of the object)."
        )
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise MomaError(f"{node}: mask has shape {tuple(mask.shape)}; expected a MASK [B, H, W].")
    views, masks = image.shape[0], mask.shape[0]
    if masks == 1 and views > 1:
        mask = mask.expand(views, -1, -1)
    elif masks != views:
        raise MomaError(
            f"{node}: image is a batch of {views} picture(s) but mask a batch of {masks}; give one mask "
            f"per picture ({views}) or a single mask for all of them."
        )
    for index in range(views):
        where = node if views == 1 else f"{node} (view {index + 1} of {views})"
        warn_if_constant_picture(image[index], where)
        if not bool((mask[index] > 0).any()):
            log.warning("%s: the object mask is empty, so LLaVA sees an all-white picture.", where)
    return image, mask


def _estimated_bytes(moma_model: MomaModelObject, device: torch.device) -> int:
    """Rough size of the loaded encoder: the fp16 LLaVA shards scaled to the dtype, plus the CLIP files."""
    from ..moma.llava import LlavaFolder, resolve_dtype

    itemsize = torch.empty((), dtype=resolve_dtype(moma_model.precision, device)).element_size()
    scale = {"none": itemsize / 2, "8bit": 0.5, "4bit": 0.3}[moma_model.quantization]
    llava = sum(file.stat().st_size for file in LlavaFolder.open(moma_model.llava_dir).weight_files)
    clip_path = moma_model.clip_vision_path
    clip_files = [*clip_path.glob("*.safetensors"), *clip_path.glob("*.bin")] if clip_path.is_dir() else [clip_path]
    clip = sum(file.stat().st_size for file in clip_files)
    return int(llava * scale + clip * itemsize / 4)


def _stream_bytes(moma_model: MomaModelObject, device: torch.device) -> int:
    """GPU memory a streamed encode holds at its peak: embeddings, projectors and two layers per tower."""
    from ..moma.llava import LlavaFolder, resolve_dtype

    itemsize = torch.empty((), dtype=resolve_dtype(moma_model.precision, device)).element_size()
    if moma_model.quantization != "none":
        itemsize = 2  # layers arrive in fp16 and are quantised on the GPU
    return stream_device_bytes(LlavaFolder.open(moma_model.llava_dir).config, itemsize)


def choose_placement(moma_model: MomaModelObject, device: torch.device) -> str:
    """``gpu``, ``stream`` or ``cpu`` for the loader's llava_placement; ``auto`` asks ComfyUI's model management
    whether the whole encoder fits in what is free on ``device`` plus what it could unload there."""
    if moma_model.placement != "auto" or device.type != "cuda":
        return resolve_placement(moma_model.placement, device)
    needed = _estimated_bytes(moma_model, device) + comfy.model_management.minimum_inference_memory()
    available = comfy.model_management.get_free_memory(device) + sum(
        loaded.model_loaded_memory()
        for loaded in comfy.model_management.current_loaded_models
        if loaded.device == device
        and loaded.model is not None
        and not isinstance(getattr(loaded.model, "model", None), LlavaContextEncoder)
    )
    placement = resolve_placement("auto", device, needed, available)
    log.info(
        "LLaVA Context Encoder: llava_placement auto -> %s (needs %.1f GB, %.1f GB free or freeable on %s).",
        placement,
        needed / 2**30,
        available / 2**30,
        device,
    )
    return placement


def _make_room(moma_model: MomaModelObject, device: torch.device, placement: str) -> None:
    """Ask ComfyUI to free what ``placement`` needs on ``device``: all of LLaVA, its streaming peak, or nothing."""
    if device.type == "cpu" or placement == "cpu":
        return
    needed = _estimated_bytes(moma_model, device) if placement == "gpu" else _stream_bytes(moma_model, device)
    comfy.model_management.free_memory(needed + comfy.model_management.minimum_inference_memory(), device)


def _loaded_encoder(
    moma_model: MomaModelObject, device: torch.device, placement: str, progress: Any, interrupt: Any
) -> LlavaContextEncoder:
    """Load LLaVA for ``placement`` after asking ComfyUI to make room for it."""
    _make_room(moma_model, device, placement)
    pin = False
    if placement == "stream" and device.type == "cuda":
        # Page-locked RAM makes the copies asynchronous; only where the host has room for a pinned copy.
        from ..moma.llava import LlavaFolder

        host = sum(file.stat().st_size for file in LlavaFolder.open(moma_model.llava_dir).weight_files)  # ~fp16
        pin = comfy.model_management.get_free_memory(torch.device("cpu")) > 2 * host
        pin = pin and not getattr(
            comfy.cli_args.args, "disable_pinned_memory", False
        )  # the user's --disable-pinned-memory
    return moma_model.load_encoder(device, progress=progress, interrupt=interrupt, placement=placement, pin=pin)


def _resident_encoder(
    moma_model: MomaModelObject, device: torch.device, placement: str, progress: Any, interrupt: Any
) -> LlavaContextEncoder:
    """The kept encoder: registered with ComfyUI's model management so sampling can offload it to RAM, or, when
    streamed, held in RAM by the MOMA_MODEL (each encode streams it through the GPU)."""
    held = moma_model.resident_encoder
    if isinstance(held, LlavaContextEncoder) and held.streamer is not None:
        _make_room(moma_model, device, "stream")
        return held
    if held is None:
        encoder = _loaded_encoder(moma_model, device, placement, progress, interrupt)
        if moma_model.quantization != "none" or encoder.streamer is not None:
            held = encoder  # bitsandbytes layers stay where they were quantised; a streamed one lives in RAM
        else:
            load_device = encoder._device()  # the CPU for llava_placement 'cpu'
            encoder.device = load_device  # ModelPatcher reads and writes .device (a plain attribute on our wrapper)
            held = comfy.model_patcher.ModelPatcher(
                encoder,
                load_device=load_device,
                offload_device=comfy.model_management.text_encoder_offload_device(),
            )
        moma_model.resident_encoder = held
    if isinstance(held, comfy.model_patcher.ModelPatcher):
        comfy.model_management.load_models_gpu([held], force_full_load=True)
        return held.model
    return held


def run_context_encoder(
    moma_model: MomaModelObject, pictures: torch.Tensor, object_masks: torch.Tensor, subject: str, prompt: str
) -> MomaContextObject:
    """Encode the views [B, H, W, C] with masks [B, H, W] with LLaVA (loaded for this call unless the model keeps
    it), with one progress bar over loading and then over all views, and interrupt."""
    bar = comfy.utils.ProgressBar(1)

    def progress(done: int, total: int) -> None:
        bar.update_absolute(done, total)

    interrupt = comfy.model_management.throw_exception_if_processing_interrupted
    device = comfy.model_management.get_torch_device()
    encoder = None
    try:
        placement = choose_placement(moma_model, device)
        if moma_model.keep_llava_loaded:
            encoder = _resident_encoder(moma_model, device, placement, progress, interrupt)
        else:
            encoder = _loaded_encoder(moma_model, device, placement, progress, interrupt)
        return encode_context_views(encoder, moma_model, pictures, object_masks, subject, prompt, progress, interrupt)
    except torch.cuda.OutOfMemoryError:
        raise MomaError(
            f"LLaVA ({moma_model.precision}, quantization {moma_model.quantization}, llava_placement "
            f"{moma_model.placement}) does not fit in the GPU's memory. In MoMA Loader choose llava_placement "
            f"'stream' (about 2 GB of VRAM, the same tokens) or 'cpu', or quantization '8bit' / '4bit'."
        ) from None
    finally:
        encoder = None  # drops this frame's reference even if a traceback keeps the frame alive
        if not moma_model.keep_llava_loaded:
            gc.collect()
            comfy.model_management.soft_empty_cache()


class MomaContextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaContextEncoder",
            display_name="LLaVA Context Encoder",
            category="MoMA",
            description=(
                "Runs MoMA's LLaVA on the reference picture with a white background (from the object mask) and the "
                "prompt, and turns its answer into the 4 context tokens (cond and uncond) for Apply MoMA. LLaVA is "
                "loaded for the encode and freed afterwards unless the loader keeps it; identical inputs are not "
                "encoded twice. Outputs the SD prompt 'photo of a {subject}. {prompt}' for the positive "
                "CLIPTextEncode. " + REFERENCE_NOTES
            ),
            inputs=[
                MomaModel.Input("moma_model", tooltip="From MoMA Loader."),
                io.Image.Input(
                    "image",
                    tooltip="The reference picture of the object; a batch = several views of "
                    "the same object (their LLaVA embeddings are averaged).",
                ),
                io.Mask.Input(
                    "mask",
                    tooltip="The object's mask (white = object), e.g. from MoMA Object Masker: one "
                    "per picture of the batch, or one for all.",
                ),
                io.String.Input(
                    "subject", default="car", tooltip="The object's class word(s), e.g. 'car', 'teddy bear'."
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="A car in autumn with falling leaves.",
                    tooltip="The new scene or texture. A prompt already starting with 'photo of a "
                    "{subject}' is used as the SD prompt unchanged, and LLaVA gets the rest.",
                ),
            ],
            outputs=[
                MomaContext.Output(display_name="context"),
                io.String.Output(display_name="sd_prompt"),
            ],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None, prompt: str | None = None) -> bool | str:
        values = {"subject": subject, "prompt": prompt}
        problems = input_problems(cls, values)
        if not problems and subject is not None and prompt is not None:
            try:
                check_texts(subject, prompt)  # an empty subject, LLaVA's control tokens
            except MomaError as error:
                problems.append(str(error))
        return verdict(problems, values)

    @classmethod
    def execute(
        cls, moma_model: Any, image: torch.Tensor, mask: torch.Tensor, subject: str, prompt: str
    ) -> io.NodeOutput:
        host_contract.require(host_contract.ENCODER)
        if not isinstance(moma_model, MomaModelObject):
            raise MomaError("LLaVA Context Encoder: moma_model must come from a 'MoMA Loader' node.")
        moma_model.require_encoder()  # a loader set to 'none' (saved contexts only) cannot encode
        check_texts(subject, prompt)
        pictures, object_masks = reference_views(image, mask)
        key = moma_model.context_key(pictures, object_masks, subject, prompt)  # all views and masks
        context = moma_model.remembered_context(key)
        if context is None:
            context = run_context_encoder(moma_model, pictures, object_masks, subject, prompt)
            moma_model.remember_context(key, context)
        return io.NodeOutput(context, context.sd_prompt)


# ------------------------------------------------------------------------------------ save / load


def _is_context_file(path: str) -> bool:
    """Whether ``path`` is a MoMA context (its header's metadata; no tensor is read). Another tool's .safetensors
    is skipped quietly; a file that cannot be read or has a malformed header is skipped with one log line."""
    try:
        context_metadata(path)
    except MomaError as error:
        if "is not a MoMA context file" not in str(error):
            log_listing_problem(f"{path} skipped in the context list: {error}")
        return False
    return True


def context_file_choices() -> list[str]:
    """Context files in ComfyUI's input/ and output/ folders, as annotated names ('x.safetensors [output]').
    One odd file (unreadable, malformed, a FIFO, a symlink loop) never breaks the list: it is skipped."""
    choices = []
    for kind, root in (("input", folder_paths.get_input_directory()), ("output", folder_paths.get_output_directory())):
        for folder, files in walk_folders(root):
            for name in files:
                full = os.path.join(folder, name)
                if name.lower().endswith(".safetensors") and _is_context_file(full):
                    relative = os.path.relpath(full, root).replace(os.sep, "/")
                    choices.append(f"{relative} [{kind}]")
    return sorted(choices)


_ANNOTATIONS = {"input": folder_paths.get_input_directory, "output": folder_paths.get_output_directory}


def resolve_context_file(context_file: str, path: str) -> Path:
    """The context file: ``path`` (relative to input/ or output/) when set, else the listed ``context_file``
    ('name [input]' / 'name [output]'); both confined to those folders."""
    if path.strip():
        roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory()]
        return resolve_inside("path", path, roots, "file", "MoMA context file", CONTEXT_HINT)
    if not context_file:
        raise MomaError(f"context_file: no MoMA context file chosen. {CONTEXT_HINT}")
    name, kind = context_file, "input"
    for annotation in _ANNOTATIONS:
        if context_file.endswith(f" [{annotation}]"):
            name, kind = context_file[: -len(annotation) - 3], annotation
    return resolve_inside("context_file", name, [_ANNOTATIONS[kind]()], "file", "MoMA context file", CONTEXT_HINT)


class MomaSaveContext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaSaveContext",
            display_name="Save MoMA Context",
            category="MoMA",
            description="Saves a MOMA_CONTEXT (4+4 tokens, LLaVA embedding, subject and prompts) as .safetensors "
            "in ComfyUI's output folder, so a later run can skip LLaVA with Load MoMA Context.",
            is_output_node=True,
            inputs=[
                MomaContext.Input("context"),
                io.String.Input(
                    "filename_prefix",
                    default="moma/context",
                    tooltip="Path under the output folder; a counter and .safetensors are appended.",
                ),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, context: Any, filename_prefix: str) -> io.NodeOutput:
        host_contract.require(host_contract.SAVE)
        if not isinstance(context, MomaContextObject):
            raise MomaError("Save MoMA Context: 'context' must come from LLaVA Context Encoder or Load MoMA Context.")
        checked_inputs(cls, {"filename_prefix": filename_prefix})
        output_dir = folder_paths.get_output_directory()
        prefix = output_prefix("filename_prefix", filename_prefix)
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
        name = f"{filename}_{counter:05}_.safetensors"
        save_context(context, Path(folder) / name)
        return io.NodeOutput(ui={"moma_context": [{"filename": name, "subfolder": subfolder, "type": "output"}]})

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        values = {"filename_prefix": filename_prefix}
        problems = input_problems(cls, values)
        if not problems and filename_prefix is not None:
            try:
                output_prefix("filename_prefix", filename_prefix)
            except MomaError as error:
                problems.append(str(error))
        return verdict(problems, values)


class MomaLoadContext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaLoadContext",
            display_name="Load MoMA Context",
            category="MoMA",
            description="Loads a context saved by Save MoMA Context (from input/ or output/), instead of "
            "running LLaVA. Outputs the context and its SD prompt.",
            inputs=[
                io.Combo.Input(
                    "context_file",
                    options=context_file_choices(),
                    tooltip="MoMA context files found in ComfyUI's input and output folders.",
                ),
                io.String.Input(
                    "path",
                    default="",
                    optional=True,
                    tooltip="Optional: a file path relative to ComfyUI's input/ or output/ folder "
                    "(absolute paths and '..' are refused); overrides context_file when set.",
                ),
            ],
            outputs=[
                MomaContext.Output(display_name="context"),
                io.String.Output(display_name="sd_prompt"),
            ],
        )

    @classmethod
    def validate_inputs(cls, context_file: str | None = None, path: str | None = "") -> bool | str:
        values = {"context_file": context_file, "path": path}
        problems = input_problems(cls, values)
        if not problems and path is not None and (context_file is not None or path.strip()):
            try:
                resolved = resolve_context_file(context_file or "", path)
                check_context_texts(context_metadata(resolved), resolved)  # found, a context, its texts fine
            except MomaError as error:
                problems.append(str(error))
        return verdict(problems, values)

    @classmethod
    def fingerprint_inputs(cls, context_file: str, path: str = "") -> Any:
        try:
            resolved = resolve_context_file(context_file or "", path or "")
            return f"{resolved}:{resolved.stat().st_mtime_ns}"
        except (MomaError, OSError):
            return float("nan")  # never equal: always re-run, so the error shows

    @classmethod
    def execute(cls, context_file: str, path: str = "") -> io.NodeOutput:
        host_contract.require(host_contract.LOAD)
        checked_inputs(cls, {"context_file": context_file, "path": path})
        context = load_context(resolve_context_file(context_file or "", path or ""))
        return io.NodeOutput(context, context.sd_prompt)
