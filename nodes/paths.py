"""Model folders the pack registers with ComfyUI (honouring extra_model_paths.yaml and --base-directory)."""
from __future__ import annotations

import os

import folder_paths

# name -> (default folder under models/, file extensions listed in dropdowns; empty set = any)
MOMA_FOLDER = "moma"  # attn_adapters_projectors.th / .safetensors
LLM_FOLDER = "LLM"  # MoMA_llava_7b folder(s)
CLIP_VISION_FOLDER = "clip_vision"  # core folder; the CLIP ViT-L/14-336 folder or file goes here
REMBG_FOLDER = "rembg"  # u2net.onnx, isnet-general-use.onnx, ...

_EXTENSIONS = {
    MOMA_FOLDER: {".th", ".pt", ".pth", ".bin", ".safetensors"},
    LLM_FOLDER: set(),
    REMBG_FOLDER: {".onnx"},
}


def _register(name: str, extensions: set[str]) -> None:
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        exts.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


for _name, _exts in _EXTENSIONS.items():
    _register(_name, _exts)
