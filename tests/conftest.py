"""Session set-up: a real ComfyUI host with the pack loaded, and the tiny real-format model fixtures."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers (host.py, fixtures/)

import host

# MOMA_TEST_SPLIT (set by scripts/test.sh, which runs pytest twice): "in-process" leaves out the modules whose
# tests start their own ComfyUI processes (PROCESS_MODULES); "processes" runs only those, and this pytest process
# neither boots ComfyUI nor imports torch, so a demo run's checkpoint load in a child comes beside a 0.05 GiB
# process, not the 3.3 GiB test host holding the run's loaded checkpoint. Unset (plain `pytest`): everything in
# one process.
PROCESS_MODULES = {"test_runner.py", "test_scripts.py", "test_hostile_server.py"}
SPLIT = os.environ.get("MOMA_TEST_SPLIT", "")
if SPLIT not in ("", "in-process", "processes"):
    raise pytest.UsageError(f"MOMA_TEST_SPLIT={SPLIT!r}: use 'in-process', 'processes' or leave it unset")
BOOT_HOST = SPLIT != "processes"


def _in_this_part(path: Path) -> bool:
    """Whether a test file belongs to this MOMA_TEST_SPLIT part (folders: their files are sorted one by one)."""
    is_process_module = path.name in PROCESS_MODULES and path.parent == Path(__file__).resolve().parent
    return path.is_dir() or is_process_module == (SPLIT == "processes")


def pytest_configure(config):
    # files named on the command line are collected whatever pytest_ignore_collect says: sorted here
    if SPLIT:
        here = config.invocation_params.dir
        config.args[:] = [arg for arg in config.args if _in_this_part((here / arg.split("::", 1)[0]).resolve())]


def pytest_ignore_collect(collection_path, config):
    if SPLIT and collection_path.suffix == ".py" and not _in_this_part(collection_path.resolve()):
        return True
    return None


HOST = host.boot() if BOOT_HOST else None
# Everything ComfyUI, torch and transformers created while booting lives for the whole run: out of the garbage
# collector's view, its full collections (ComfyUI runs one whenever a freed model clone is noticed, several
# per executed graph) scan only what the tests create, instead of ~0.35 s each over the whole heap.
import gc  # noqa: E402

gc.freeze()


_LOADED_CHECKPOINTS: dict = {}


def _share_loaded_checkpoints() -> None:
    """One loaded copy of each checkpoint for the whole run: ComfyUI's own loader runs once per file and options,
    and every later CheckpointLoaderSimple (graphs, fixtures) gets the same MODEL/CLIP/VAE objects, which MoMA only
    ever clones. Without this each executor run loaded a second full SD1.5 beside the fixture's (the suite peaked
    at 10-12 GB of RSS), and loading it again per module put each load's peak (its file mapped beside the copy
    being filled, ~4 GiB above the process) on top of what earlier modules left. Between modules ComfyUI unloads
    every model (``_release_models``), which undoes a LoRA graph's in-place weight patches, so no module sees
    another's patched weights."""
    import os

    import comfy.sd

    load = comfy.sd.load_checkpoint_guess_config

    def load_once(ckpt_path, *args, **kwargs):
        key = (os.path.realpath(ckpt_path), repr(args), repr(sorted(kwargs.items(), key=lambda item: item[0])))
        if key not in _LOADED_CHECKPOINTS:
            with _recording_log() as messages:
                _LOADED_CHECKPOINTS[key] = load(ckpt_path, *args, **kwargs)
            _LOAD_LOGS[os.path.realpath(ckpt_path)] = messages
        return _LOADED_CHECKPOINTS[key]

    comfy.sd.load_checkpoint_guess_config = load_once


_LOAD_LOGS: dict[str, list[str]] = {}  # checkpoint file -> what ComfyUI logged (DEBUG and up) while loading it


@contextlib.contextmanager
def _recording_log():
    """The messages logged (DEBUG and up, any logger) inside the block."""
    import logging

    class Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    messages: list[str] = []
    root, handler = logging.getLogger(), Records(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


if BOOT_HOST:
    _share_loaded_checkpoints()


@pytest.fixture(scope="session")
def checkpoint_load_log():
    """checkpoint path -> the messages ComfyUI logged while it loaded that file (the run loads it once)."""
    return lambda path: _LOAD_LOGS[os.path.realpath(path)]


# MOMA_TEST_MEMORY_LOG=path: after each test (and, for a module's last one, after its models are released), a
# line: time, this process's RSS now and its peak so far (GiB), the test's id; to find which test raises the
# suite's peak.
_MEMORY_LOG = os.environ.get("MOMA_TEST_MEMORY_LOG")


def _log_memory(nodeid: str) -> None:
    import resource
    import time

    import psutil

    rss = psutil.Process().memory_info().rss / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with open(_MEMORY_LOG, "a") as log:
        log.write(f"{time.time():.1f}\t{rss:.2f}\t{peak:.2f}\t{nodeid}\n")


def pytest_collection_finish(session):
    # The run's one checkpoint load comes first, while this process is smallest: its peak is the run's. The other
    # fixture files are built before it (in a fresh clone: writing them beside the loaded checkpoint added ~0.3 GiB).
    if session.config.option.collectonly or not BOOT_HOST or session.testsfailed or not session.items:
        return
    used = [item for item in session.items if _runs_here(item)]
    try:
        for name in FIXTURE_FILES:
            if any(name in item.fixturenames for item in used):
                fixture_file(name)
        if any("sd15_checkpoint" in item.fixturenames for item in used):
            import comfy_exec

            comfy_exec.load_checkpoint(
                comfy_exec.place_model("checkpoints", fixture_file("sd15_checkpoint"), HOST.models_dir)
            )
    except Exception as err:  # the fixtures that need them fail with the full story
        import logging

        logging.getLogger(__name__).warning("preparing the model fixtures failed: %s", err)


def _runs_here(item) -> bool:
    """Whether the item uses this process's fixtures: not skipped by a marker (skipif with a bool condition),
    not the soak test (its own ComfyUI server loads the checkpoint)."""
    if item.get_closest_marker("skip") is not None or item.get_closest_marker("soak") is not None:
        return False
    return not any(marker.args and marker.args[0] is True for marker in item.iter_markers("skipif"))


# Between test modules ComfyUI unloads every model (undoing patches) and what the module freed (its LLaVA
# encoders, clones, activations) is handed back to the OS. This runs once the module's last test is completely
# done (pytest_runtest_logfinish): until then pytest still holds that test's fixture values (item.funcargs),
# which a module-scoped fixture's teardown cannot release.
_MODULE_ENDS: set[str] = set()


def pytest_runtest_teardown(item, nextitem):
    if nextitem is None or nextitem.module is not item.module:
        _MODULE_ENDS.add(item.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    if nodeid in _MODULE_ENDS:
        _MODULE_ENDS.discard(nodeid)
        if BOOT_HOST:
            _release_models()
    if _MEMORY_LOG:
        _log_memory(nodeid)


def _release_models() -> None:
    import gc

    import comfy.model_management
    import comfy.model_patcher

    # The run's loaded checkpoints outlive their clones: a clone ComfyUI loaded and the test then dropped stays
    # in ComfyUI's list as "dead" (its model alive), which unload_all_models skips. Detaching the checkpoint's own
    # patchers restores every weight a clone patched (clones share the backup), and the dead entries go.
    for loaded in _LOADED_CHECKPOINTS.values():
        for part in loaded:
            patcher = part if isinstance(part, comfy.model_patcher.ModelPatcher) else getattr(part, "patcher", None)
            if isinstance(patcher, comfy.model_patcher.ModelPatcher):
                patcher.detach(unpatch_all=True)
    loaded_models = comfy.model_management.current_loaded_models
    loaded_models[:] = [entry for entry in loaded_models if not entry.is_dead()]
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the freed model memory back to the OS: most SD1.5 weights are under glibc's mmap threshold, so
    they live in malloc's heap, which keeps freed pages (the next module's load would add its own on top)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# The method tests (tests/moma/) never touch ComfyUI. CI's second host (ComfyUI 0.3.75) also carries the oldest
# dependencies the pack declares (transformers 4, an older torch: scripts/setup_host.sh), so there the files whose
# results depend on torch or transformers run too (LLaVA's tokenizer, loader, encoder and streaming, the context
# files, the attention maths, the weight files); the others (text parsing, rembg's ONNX session, whose versions
# are the same on both hosts) run on the default host only.
METHOD_TESTS = Path(__file__).resolve().parent / "moma"
METHOD_TESTS_DEFAULT_HOST_ONLY = {"test_sd15.py", "test_masker.py"}


def pytest_collection_modifyitems(config, items):
    if host.on_default_host():
        return
    skip = pytest.mark.skip(
        reason=f"independent of ComfyUI and of the torch/transformers versions: run on the "
        f"default host, ComfyUI {host.DEFAULT_COMFYUI}"
    )
    covered = pytest.mark.skip(
        reason=f"the same on every ComfyUI version: run on the default host, ComfyUI "
        f"{host.DEFAULT_COMFYUI} (other cases cover this host)"
    )
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == METHOD_TESTS and path.name in METHOD_TESTS_DEFAULT_HOST_ONLY:
            item.add_marker(skip)
        elif item.get_closest_marker("default_host_only") is not None:
            item.add_marker(covered)


@pytest.fixture(scope="session")
def comfy_host() -> host.Host:
    """The booted ComfyUI host (base directory, models directory, the pack's module name)."""
    if HOST is None:
        pytest.fail(
            f"MOMA_TEST_SPLIT=processes: this pytest process boots no ComfyUI; a test that needs one "
            f"belongs outside {sorted(PROCESS_MODULES)}"
        )
    return HOST


# --- model fixtures in the real formats (each built once, cached across sessions by source hash) ---
import fixtures  # noqa: E402

# fixture name -> (cache entry, writer module, writer function) of the real-format model files the tests build
FIXTURE_FILES = {
    "sd15_checkpoint": ("moma_test_sd15.safetensors", "sd15", "write_sd15_checkpoint"),
    "llava_dir": ("MoMA_llava_7b", "llava", "write_llava_folder"),
    "clip_vision_dir": ("clip-vit-large-patch14-336", "clip_vision", "write_clip_vision_folder"),
    "adapter_file": ("attn_adapters_projectors.th", "adapter", "write_adapter_th"),
    "test_images": ("images", "images", "write_test_images"),
}


def fixture_file(fixture_name: str) -> Path:
    """The fixture's file or folder, built first if the cache lacks it (tests/fixtures, tools/moma_demo)."""
    entry, module, writer = FIXTURE_FILES[fixture_name]
    return fixtures.cached(entry, getattr(getattr(fixtures, module), writer))


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    """Full-layout SD1.5 single-file checkpoint (.safetensors, LDM keys, fp16), random weights."""
    return fixture_file("sd15_checkpoint")


@pytest.fixture(scope="session")
def llava_dir() -> Path:
    """A folder in the original MoMA_llava_7b format (config, 2 pickled shards + index, SentencePiece)."""
    return fixture_file("llava_dir")


@pytest.fixture(scope="session")
def clip_vision_dir() -> Path:
    """A transformers folder shaped like openai/clip-vit-large-patch14-336 (shrunk, width 1024)."""
    return fixture_file("clip_vision_dir")


@pytest.fixture(scope="session")
def adapter_file() -> Path:
    """attn_adapters_projectors.th with exactly the upstream groups, keys and shapes (spec 4.4)."""
    return fixture_file("adapter_file")


@pytest.fixture(scope="session")
def test_images() -> dict:
    """name -> (image path, mask path) for rgb, rgba, grey, wide (non-square) test pictures."""
    from fixtures import images

    return images.index(fixture_file("test_images"))


@pytest.fixture(scope="module")
def sd15_models(sd15_checkpoint, comfy_host):
    """(model, clip, vae) of the SD1.5 fixture, loaded once through ComfyUI's CheckpointLoaderSimple
    from the host's models/checkpoints folder, as a user's file is."""
    import comfy_exec

    ckpt_name = comfy_exec.place_model("checkpoints", sd15_checkpoint, comfy_host.models_dir)
    model, clip, vae = comfy_exec.load_checkpoint(ckpt_name)[:3]
    return model, clip, vae


@pytest.fixture(scope="session")
def load_image_tensor():
    """path(s) -> ComfyUI tensors, the way core LoadImage builds them: IMAGE [1,H,W,C] 0..1 (C as stored:
    1 for grey, 3, or 4 kept here so RGBA handling is exercised) and MASK [1,H,W] 0..1."""
    import numpy as np
    import torch
    from PIL import Image

    def load(image_path, mask_path=None):
        with Image.open(image_path) as picture:
            array = np.asarray(picture).astype(np.float32) / 255.0
        image = torch.from_numpy(array)
        image = image.unsqueeze(-1) if image.dim() == 2 else image
        mask = None
        if mask_path is not None:
            with Image.open(mask_path) as picture:
                mask = torch.from_numpy(np.asarray(picture.convert("L")).astype(np.float32) / 255.0)
            mask = mask.unsqueeze(0)
        return image.unsqueeze(0), mask

    return load


MOMA_SUBJECT = "car"
MOMA_PROMPT = "A car in autumn with falling leaves."


@pytest.fixture(scope="session")
def moma_model(adapter_file, llava_dir, clip_vision_dir):
    """MOMA_MODEL from the real loading code on the fixture files (fp32, so comparisons are exact)."""
    from comfyui_moma.moma.model import MomaModel

    return MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32")


@pytest.fixture(scope="session")
def moma_context(moma_model, test_images, load_image_tensor):
    """MOMA_CONTEXT of the rgb test picture, encoded by the fixture LLaVA through the real encoder."""
    from comfyui_moma.moma.model import encode_context

    image, mask = load_image_tensor(*test_images["rgb"])
    encoder = moma_model.load_encoder("cpu")
    context = encode_context(encoder, moma_model, image[0], mask[0], MOMA_SUBJECT, MOMA_PROMPT)
    del encoder
    return context
