"""Drive the in-process ComfyUI host (booted by tests/host.py) the way a user's install would.

- ``link``: a symlink to a fixture file or folder (in a model, input or output folder), replaced if it points elsewhere;
- ``place_model``: put a model file in one of ComfyUI's model folders (a symlink) and get its name;
- ``load_checkpoint``: ``CheckpointLoaderSimple`` on such a name;
- ``saved_context_graph``: the API graph checkpoint -> MoMA (saved context, Feature Grab) -> KSampler -> decode;
- ``run_api_workflow``: validate and run an API-format graph through ComfyUI's real executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class WorkflowError(RuntimeError):
    """An API workflow failed validation or execution; carries ComfyUI's own error records."""

    def __init__(self, message: str, node_errors: dict | None = None, execution_error: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.execution_error = execution_error or {}


class NullServer:
    """The parts of ComfyUI's PromptServer the executor touches, discarding every message."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        pass

    def queue_updated(self) -> None:
        pass


def link(link_path: Path, target: Path) -> None:
    """Make ``link_path`` a symlink to ``target`` (its parents created); an existing link or file there is replaced
    unless it already points at ``target``."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() and link_path.resolve() == target.resolve():
        return
    if link_path.is_symlink() or link_path.is_file():
        link_path.unlink()
    elif link_path.exists():
        raise FileExistsError(f"{link_path} is a real folder: the tests only replace links and files")
    link_path.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def place_model(folder_name: str, path: Path, models_dir: Path) -> str:
    """Link ``path`` into ``models_dir/folder_name`` and return the file name ComfyUI lists for it."""
    import folder_paths

    link(models_dir / folder_name / path.name, path)
    if folder_paths.get_full_path(folder_name, path.name) is None:
        searched = folder_paths.get_folder_paths(folder_name)
        raise RuntimeError(f"ComfyUI does not see {link}: its {folder_name!r} folders are {searched}")
    return path.name


def load_checkpoint(ckpt_name: str) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) from ``nodes.CheckpointLoaderSimple``, as a workflow would get them."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)


def saved_context_graph(
    ckpt: str,
    context_file: str,
    image: str,
    mask: str,
    llava: str = "none",
    clip_vision: str = "none",
    seed: int = 1,
    steps: int = 1,
) -> dict:
    """Checkpoint -> MoMA Loader, a saved context (``context_file`` in the output folder), Feature Grab at 64 of
    ``image``/``mask`` (input folder, subject 'car') -> Apply MoMA -> euler KSampler at 64x64 (positive: the
    context's sd_prompt) -> VAE Decode (node "dec"). The caller adds the output node."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "loader": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": "attn_adapters_projectors.th",
                "llava_name": llava,
                "clip_vision_name": clip_vision,
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        },
        "img": {"class_type": "LoadImage", "inputs": {"image": image}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        "ctx": {"class_type": "MomaLoadContext", "inputs": {"context_file": f"{context_file} [output]", "path": ""}},
        "grab": {
            "class_type": "MomaFeatureGrab",
            "inputs": {
                "model": ["ckpt", 0],
                "moma_model": ["loader", 0],
                "vae": ["ckpt", 2],
                "clip": ["ckpt", 1],
                "image": ["img", 0],
                "mask": ["mask", 0],
                "subject": "car",
                "seed": 1,
                "resolution": 64,
            },
        },
        "apply": {
            "class_type": "MomaApply",
            "inputs": {
                "model": ["ckpt", 0],
                "moma_model": ["loader", 0],
                "context": ["ctx", 0],
                "reference": ["grab", 0],
                "preset": "context",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": ["ctx", 1], "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["apply", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["lat", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
    }


def run_api_workflow(prompt: dict, prompt_id: str | None = None) -> dict:
    """Run an API-format graph through ComfyUI's validator and PromptExecutor; return the UI outputs.

    The result maps output node id -> what the node showed (e.g. SaveImage's ``{"images": [...]}``).
    Raises ``WorkflowError`` with ComfyUI's node errors if validation fails, or with the failing
    node's exception (type, message, traceback) if execution fails. Each call uses a fresh executor
    with no cache, so models loaded by the graph are freed when it returns.
    """
    import execution

    prompt_id = prompt_id or uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise WorkflowError(f"workflow invalid: {error}; node errors: {node_errors}", node_errors=node_errors)
    executor = execution.PromptExecutor(
        NullServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )
    try:
        executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
        if not executor.success:
            failure = next(
                (
                    data
                    for event, data in executor.status_messages
                    if event in ("execution_error", "execution_interrupted")
                ),
                {},
            )
            raise WorkflowError(
                f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: "
                f"{failure.get('exception_type')}: {failure.get('exception_message')}\n"
                + "".join(failure.get("traceback", [])),
                execution_error=failure,
            )
        return executor.history_result["outputs"]
    finally:
        del executor
        gc.collect()


def validation_message(validate: Any, *args: Any, **kwargs: Any) -> Any:
    """What ComfyUI reports for a node's ``validate_inputs`` called directly: True, or the problem's text, whether
    the node returns it (one input checked) or raises it as a MomaError (several: reported once, on the node)."""
    from comfyui_moma.moma.errors import MomaError

    try:
        return validate(*args, **kwargs)
    except MomaError as error:
        return str(error)


@contextlib.contextmanager
def deadline(seconds: int, label: str) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (SIGALRM, main thread): a generous bound
    that tells a hang from an answer, not a timing assertion."""
    import signal

    def expired(*_: Any) -> None:
        raise TimeoutError(f"{label}: no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
