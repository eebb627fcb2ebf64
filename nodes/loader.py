"""MoMA Loader: the adapter file (read now), and which LLaVA folder / CLIP vision tower the encoder loads later
('none': neither is needed, the MOMA_MODEL then applies saved contexts only)."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from ..moma.clip_vision import CLIP_WHERE_TO_GET, check_clip_vision_path
from ..moma.errors import MomaError
from ..moma.llava import PRECISIONS, QUANTIZATIONS, LlavaFolder
from ..moma.model import MomaModel as MomaModelObject
from ..moma.prompt import LLAVA_WHERE_TO_GET, LlavaTokenizer
from ..moma.streaming import PLACEMENTS
from ..moma.weights import WHERE_TO_GET as ADAPTER_WHERE_TO_GET
from . import host_contract
from .node_api import io
from .paths import (
    CLIP_VISION_FOLDER,
    LLM_FOLDER,
    MOMA_FOLDER,
    find_inside,
    for_input,
    model_folders,
    resolve_inside,
    walk_folders,
)
from .types import MomaModel
from .validation import choice_problem, input_problems, verdict

HF_CONFIG = "config.json"
# Last in the llava/clip_vision lists, so a node added to a full install defaults to the real model, while an
# install without LLaVA (saved contexts only) gets 'none' as its only choice and default.
NONE = "none"
NONE_HINT = f"Choose '{NONE}' if you only apply saved contexts (Load MoMA Context): they need neither."


def _folders_with_config(folder_name: str) -> list[str]:
    """Sub-folders (relative names) of a model folder that hold a config.json, like ComfyUI's DiffusersLoader.
    Nothing is read but the folder listings (``walk_folders``: unreadable folders and symlink loops are skipped)."""
    found: set[str] = set()
    for search_path in folder_paths.get_folder_paths(folder_name):
        for root, files in walk_folders(search_path):
            if HF_CONFIG in files and os.path.abspath(root) != os.path.abspath(search_path):
                found.add(os.path.relpath(root, start=search_path).replace(os.sep, "/"))
    return sorted(found)


def llava_choices() -> list[str]:
    return [name for name in _folders_with_config(LLM_FOLDER) if name != NONE] + [NONE]


def clip_vision_choices() -> list[str]:
    """CLIP vision folders (with config.json) and single .safetensors files outside those folders."""
    folders = _folders_with_config(CLIP_VISION_FOLDER)
    files = [
        name
        for name in folder_paths.get_filename_list(CLIP_VISION_FOLDER)
        if name.lower().endswith(".safetensors") and not any(name.startswith(folder + "/") for folder in folders)
    ]
    return [name for name in sorted(folders + files) if name != NONE] + [NONE]


def resolve_adapter(name: str) -> Path:
    """The adapter file named by ``adapter_name``, inside a registered models/moma folder."""
    return resolve_inside(
        "adapter_name", name, model_folders(MOMA_FOLDER), "file", "MoMA adapter", ADAPTER_WHERE_TO_GET
    )


def resolve_llava(name: str) -> Path | None:
    """The LLaVA folder named by ``llava_name`` (checked complete: config, index, shards, tokenizer), or None
    for 'none'."""
    if name == NONE:
        return None
    roots = model_folders(LLM_FOLDER)
    path = resolve_inside("llava_name", name, roots, "dir", "LLaVA folder", f"{LLAVA_WHERE_TO_GET} {NONE_HINT}")
    with for_input("llava_name"):
        LlavaFolder.open(path)
        LlavaTokenizer.from_folder(path)
    return path


def resolve_clip_vision(name: str) -> Path | None:
    """The CLIP vision folder or .safetensors file named by ``clip_vision_name``, or None for 'none'."""
    if name == NONE:
        return None
    roots = model_folders(CLIP_VISION_FOLDER)
    path = find_inside("clip_vision_name", name, roots, "dir", "CLIP vision model")
    if path is None:
        path = resolve_inside(
            "clip_vision_name", name, roots, "file", "CLIP vision model", f"{CLIP_WHERE_TO_GET} {NONE_HINT}"
        )
    with for_input("clip_vision_name"):
        check_clip_vision_path(path)
    return path


class MomaLoader(io.ComfyNode):
    """Loads the adapter weights now; LLaVA (~14 GB) is loaded only by the LLaVA Context Encoder, when needed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaLoader",
            display_name="MoMA Loader",
            category="MoMA",
            description=(
                "Loads MoMA's adapter (attn_adapters_projectors.th or its .safetensors) and records which LLaVA "
                "folder (models/LLM, e.g. KunpengSong/MoMA_llava_7b) and CLIP ViT-L/14-336 vision tower "
                "(models/clip_vision) the LLaVA Context Encoder will load. LLaVA itself is loaded lazily. Set both "
                "to 'none' when you only apply saved contexts (Load MoMA Context): then neither needs to be "
                "installed."
            ),
            inputs=[
                io.Combo.Input(
                    "adapter_name",
                    options=folder_paths.get_filename_list(MOMA_FOLDER),
                    tooltip="attn_adapters_projectors.th (or .safetensors) from models/moma.",
                ),
                io.Combo.Input(
                    "llava_name",
                    options=llava_choices(),
                    tooltip="The MoMA_llava_7b folder under models/LLM (config.json, shards, "
                    "tokenizer.model). 'none': for saved contexts (Load MoMA Context) only.",
                ),
                io.Combo.Input(
                    "clip_vision_name",
                    options=clip_vision_choices(),
                    tooltip="openai/clip-vit-large-patch14-336: a folder or a .safetensors file in "
                    "models/clip_vision. 'none': for saved contexts (Load MoMA Context) only.",
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip="auto: bf16 on CUDA (the reference's; fp16 on GPUs without bf16), fp16 on "
                    "Apple MPS, bf16 on a CPU where torch supports it (half the memory of fp32; "
                    "fp32 there otherwise). fp32: exact, twice the memory.",
                ),
                io.Combo.Input(
                    "quantization",
                    options=list(QUANTIZATIONS),
                    default="none",
                    tooltip="8bit/4bit LLaVA via bitsandbytes (CUDA only): 8bit about halves LLaVA's "
                    "memory with nearly the same context tokens; 4bit saves more but changes them "
                    "noticeably.",
                ),
                io.Boolean.Input(
                    "keep_llava_loaded",
                    default=False,
                    tooltip="Keep LLaVA in memory between encodes (handed to ComfyUI's model management, "
                    "so it is offloaded to RAM when sampling needs the VRAM; 8bit/4bit models stay "
                    "on the GPU). Off: loaded for each encode and freed afterwards.",
                ),
                io.Combo.Input(
                    "llava_placement",
                    options=list(PLACEMENTS),
                    default="auto",
                    optional=True,
                    tooltip="Where LLaVA lives while encoding. gpu: all on the GPU (fp16: ~14 GB). "
                    "stream: weights stay in RAM and each layer visits the GPU just before it "
                    "runs (~2 GB of VRAM, same tokens, a few seconds slower). cpu: encode on "
                    "the CPU. auto: gpu when ComfyUI says it fits, else stream (on a CPU-only "
                    "install: cpu). A kept stream encoder stays in RAM.",
                ),
            ],
            outputs=[MomaModel.Output(display_name="moma_model")],
        )

    @classmethod
    def validate_inputs(
        cls,
        adapter_name: str | None = None,
        llava_name: str | None = None,
        clip_vision_name: str | None = None,
        precision: str | None = None,
        quantization: str | None = None,
        llava_placement: str | None = None,
    ) -> bool | str:
        # Replaces ComfyUI's "value not in list" check with messages that say where to put the files; the same
        # confinement rule refuses absolute paths and '..'. Every problem, once (nodes/validation.py: verdict).
        values = {
            "adapter_name": adapter_name,
            "llava_name": llava_name,
            "clip_vision_name": clip_vision_name,
            "precision": precision,
            "quantization": quantization,
            "llava_placement": llava_placement,
        }
        problems = input_problems(cls, values)
        if problems:  # a name over its length limit never reaches the file system
            return verdict(problems, values)
        for resolve, value in (
            (resolve_adapter, adapter_name),
            (resolve_llava, llava_name),
            (resolve_clip_vision, clip_vision_name),
        ):
            if value is None:
                continue
            try:
                resolve(value)
            except MomaError as error:
                problems.append(str(error))
        # ComfyUI 0.3.x does not check V3 combo values, and this method replaces the check on 0.30
        for name, choices in (
            ("precision", PRECISIONS),
            ("quantization", QUANTIZATIONS),
            ("llava_placement", PLACEMENTS),
        ):
            problem = choice_problem(name, values[name], choices)
            if problem:
                problems.append(problem)
        return verdict(problems, values)

    @classmethod
    def execute(
        cls,
        adapter_name: str,
        llava_name: str,
        clip_vision_name: str,
        precision: str,
        quantization: str,
        keep_llava_loaded: bool,
        llava_placement: str = "auto",
    ) -> io.NodeOutput:
        host_contract.require(host_contract.LOADER)
        moma_model = MomaModelObject.load(
            resolve_adapter(adapter_name),
            resolve_llava(llava_name),
            resolve_clip_vision(clip_vision_name),
            precision=precision,
            quantization=quantization,
            keep_llava_loaded=keep_llava_loaded,
            placement=llava_placement,
        )
        return io.NodeOutput(moma_model)
