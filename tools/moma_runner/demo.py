"""``--demo``: the tiny random-weight models of tools/moma_demo under the real file names a graph uses.

The models are written once (cached by moma_demo) and linked into the demo base directory's models/;
the reference picture is moma_demo's test picture; a saved MoMA context a graph loads is encoded from
that picture by the tiny LLaVA through the pack's own code.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import moma_demo

from . import boot
from .common import REPO, RunnerError
from .models import ModelUse
from .workflow import LATENT_SIZE_CLASSES, STEPS_INPUTS, Overrides, ids_of

DEMO_SIZE, DEMO_STEPS, DEMO_REFERENCE_RESOLUTION = 64, 2, 128
DEMO_CONTEXT_PROMPT = "A car in autumn with falling leaves."
STANDALONE_MOMA = "comfyui_moma_core"  # the pack's moma/ package when ComfyUI has not loaded the pack


def _vae_writer(checkpoint: Path) -> Callable[[Path], None]:
    """A VAE file in the layout of vae-ft-mse-840000-ema-pruned.safetensors, cut out of the demo checkpoint."""

    def write(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        prefix = "first_stage_model."
        with safe_open(str(checkpoint), framework="pt") as f:
            tensors = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        save_file(tensors, str(path))

    return write


def demo_model_builders() -> dict[str, Callable[[], Path]]:
    """Model folder -> function building (or taking from the cache) the file that stands in for its models.
    Each writer (most import torch) is imported when its file is first asked for: a ``--server`` client never is."""

    def writer(module: str, function: str) -> Callable[[Path], None]:
        return getattr(importlib.import_module(f"moma_demo.{module}"), function)

    def checkpoint() -> Path:
        return moma_demo.cached("moma_test_sd15.safetensors", writer("sd15", "write_sd15_checkpoint"))

    def vae() -> Path:
        ckpt = checkpoint()  # the cache key of a closure is this file; name the entry after the checkpoint's
        return moma_demo.cached(f"demo_vae_of_{ckpt.parent.name}.safetensors", _vae_writer(ckpt))

    files = {
        "LLM": ("MoMA_llava_7b", "llava", "write_llava_folder"),
        "clip_vision": ("clip-vit-large-patch14-336", "clip_vision", "write_clip_vision_folder"),
        "moma": ("attn_adapters_projectors.th", "adapter", "write_adapter_th"),
        "rembg": ("u2net.onnx", "rembg", "write_u2net_onnx"),
        "loras": ("moma_test_sd15_lora.safetensors", "lora", "write_sd15_lora"),
    }

    def builder(name: str, module: str, function: str) -> Callable[[], Path]:
        return lambda: moma_demo.cached(name, writer(module, function))

    return {"checkpoints": checkpoint, "vae": vae, **{folder: builder(*entry) for folder, entry in files.items()}}


def demo_images() -> dict[str, tuple[Path, Path]]:
    """name -> (image, mask) demo pictures (moma_demo/images.py)."""
    from moma_demo import images

    return images.index(moma_demo.cached("images", images.write_test_images))


def link_demo_models(models_dir: Path, uses: list[ModelUse], builders: dict[str, Callable[[], Path]]) -> None:
    """Link a stand-in into ``models_dir/<folder>/<name>`` for every model the graph uses."""
    for use in uses:
        if use.folder not in builders:
            raise RunnerError(f"--demo has no stand-in for the {use.folder} model {use.name}.")
        started = time.perf_counter()
        print(f"demo: models/{use.folder}/{use.name} = tiny random stand-in", flush=True)
        source = builders[use.folder]()
        elapsed = time.perf_counter() - started
        if elapsed > 1:
            print(f"      built in {elapsed:.1f}s (cached for later runs)", flush=True)
        link = models_dir / use.folder / use.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == source:
                continue
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink()
        link.symlink_to(source, target_is_directory=source.is_dir())


def demo_overrides(prompt: dict, ov: Overrides) -> None:
    """Small and short unless asked otherwise: 64x64, 2 steps, Feature Grab at 128, the demo picture."""
    if ids_of(prompt, *LATENT_SIZE_CLASSES):
        ov.width, ov.height = ov.width or DEMO_SIZE, ov.height or DEMO_SIZE
    if ids_of(prompt, *STEPS_INPUTS):
        ov.steps = ov.steps or DEMO_STEPS
    if ids_of(prompt, "LoadImage") and ov.image is None:
        ov.image, _mask = demo_images()["rgb"]
        print(f"demo: reference image {ov.image.name} (generated test picture)")
    if ids_of(prompt, "MomaFeatureGrab") and ov.reference_resolution is None:
        ov.reference_resolution = DEMO_REFERENCE_RESOLUTION


def shrink_for_demo(prompt: dict) -> list[str]:
    """``--gui --demo``: cut a queued graph down to what a CPU runs in under a minute on the tiny models, in place.

    Empty latents larger than DEMO_SIZE get DEMO_SIZE on their longer side (aspect kept, multiples of 8), sampler
    steps above DEMO_STEPS become DEMO_STEPS (a KSamplerAdvanced only when it starts at step 0), and a Feature Grab
    resolution above DEMO_REFERENCE_RESOLUTION becomes that ('auto' stays: it follows the shrunk size). Only literal
    values; what is already small stays. Returns what changed, e.g. ``["image 512x512 -> 64x64", "steps 50 -> 2"]``.
    """
    changes: list[str] = []
    for nid in ids_of(prompt, *LATENT_SIZE_CLASSES):
        inputs = prompt[nid]["inputs"]
        width, height = inputs.get("width"), inputs.get("height")
        if isinstance(width, int) and isinstance(height, int) and max(width, height) > DEMO_SIZE:
            scale = DEMO_SIZE / max(width, height)
            inputs["width"], inputs["height"] = (max(16, round(side * scale / 8) * 8) for side in (width, height))
            changes.append(f"image {width}x{height} -> {inputs['width']}x{inputs['height']}")
    for class_type, name in STEPS_INPUTS.items():
        for nid in ids_of(prompt, class_type):
            inputs = prompt[nid]["inputs"]
            steps = inputs.get(name)
            if class_type == "KSamplerAdvanced" and inputs.get("start_at_step", 0) != 0:
                continue
            if isinstance(steps, int) and steps > DEMO_STEPS:
                inputs[name] = DEMO_STEPS
                changes.append(f"steps {steps} -> {DEMO_STEPS}")
    for nid in ids_of(prompt, "MomaFeatureGrab"):
        inputs = prompt[nid]["inputs"]
        resolution = inputs.get("resolution")
        if isinstance(resolution, int) and resolution > DEMO_REFERENCE_RESOLUTION:
            inputs["resolution"] = DEMO_REFERENCE_RESOLUTION
            changes.append(f"Feature Grab resolution {resolution} -> {DEMO_REFERENCE_RESOLUTION}")
    return list(dict.fromkeys(changes))


def demo_context_subject(prompt: dict) -> str:
    """The subject the graph's Feature Grab uses (the saved context must name the same object)."""
    for nid in ids_of(prompt, "MomaFeatureGrab"):
        subject = prompt[nid]["inputs"].get("subject")
        if isinstance(subject, str) and subject.strip():
            return subject.strip()
    return "car"


def pack_moma_module(name: str) -> ModuleType:
    """``moma.<name>`` of this checkout: from the pack ComfyUI loaded, else the ``moma`` package (pure torch,
    no ComfyUI) imported by path under its own name (the pack's root never goes on sys.path)."""
    pack = boot.loaded_pack_module()
    if pack is not None:
        return importlib.import_module(f"{pack}.moma.{name}")
    if STANDALONE_MOMA not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            STANDALONE_MOMA, REPO / "moma" / "__init__.py", submodule_search_locations=[str(REPO / "moma")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[STANDALONE_MOMA] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{STANDALONE_MOMA}.{name}")


def demo_context_file(subject: str) -> Path:
    """A MoMA context of the demo picture, encoded by the tiny LLaVA through the pack's own code (cached).

    Stands in for the file Save MoMA Context writes."""
    import numpy as np
    import torch
    from PIL import Image

    builders = demo_model_builders()
    try:
        model_module, context_module = pack_moma_module("model"), pack_moma_module("context")
    except ImportError as e:
        raise RunnerError(f"The pack's moma package did not import ({e}); run with --verbose.") from None
    image_path, mask_path = demo_images()["rgb"]
    llava = builders["LLM"]()

    def write(path: Path) -> None:
        moma = model_module.MomaModel.load(builders["moma"](), llava, builders["clip_vision"](), precision="fp32")
        with Image.open(image_path) as picture:
            image = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)
        with Image.open(mask_path) as picture:
            mask = torch.from_numpy(np.asarray(picture.convert("L"), dtype=np.float32) / 255.0)
        encoder = moma.load_encoder("cpu")
        context = model_module.encode_context(encoder, moma, image, mask, subject, DEMO_CONTEXT_PROMPT)
        context_module.save_context(context, path)

    slug = re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_") or "subject"
    # named after the LLaVA stand-in's version, as the cache key only covers this file
    return moma_demo.cached(f"demo_context_{slug}_of_{llava.parent.name}.safetensors", write)
