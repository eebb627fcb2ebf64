"""The re-run check (benchmarks/sampling.py ``--rerun-only``): the MoMA workflow executed twice through ComfyUI's
executor; the second run takes the LLaVA context encoder and the Feature Grab from its cache."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sampling_common import SD_PROMPT, SUBJECT, boot, place_model, reference_inputs


class _MessageSink:
    """The ``server`` a PromptExecutor reports to: keeps the messages so cached nodes can be read off."""

    client_id = "moma-benchmark"  # the executor reports "executing" only to a client (extra_data client_id)

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.last_node_id = None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def rerun_check(hostinfo: boot.ComfyHost, checkpoint_name: str) -> dict:
    """Execute the MoMA graph twice through ComfyUI's PromptExecutor (the 2nd time with a new sampler seed,
    reference and prompt unchanged); the 2nd run must take the LLaVA context encoder and the Feature Grab
    from the executor's cache."""
    import nodes

    needed = ("MomaLoader", "MomaContextEncoder", "MomaFeatureGrab", "MomaApply")
    missing = [name for name in needed if name not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        return {"status": "not measured", "reason": f"nodes not registered yet: {', '.join(missing)}"}
    return run_rerun_graph(hostinfo, checkpoint_name)


def run_rerun_graph(hostinfo: boot.ComfyHost, checkpoint_name: str) -> dict:
    import execution
    import folder_paths
    import moma_demo
    import numpy as np
    from moma_demo import adapter, clip_vision, llava
    from PIL import Image

    adapter_name = place_model(
        "moma", moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th), hostinfo.models_dir
    )
    folders = {
        "LLM": moma_demo.cached("MoMA_llava_7b", llava.write_llava_folder),
        "clip_vision": moma_demo.cached("clip-vit-large-patch14-336", clip_vision.write_clip_vision_folder),
    }
    for folder, source in folders.items():
        place_model(folder, source, hostinfo.models_dir)
    llava_name, clip_name = folders["LLM"].name, folders["clip_vision"].name
    image, masks = reference_inputs(64)
    alpha = 1.0 - masks["30%"][0, ..., None].numpy()  # LoadImage's MASK output is 1 - alpha
    rgba = np.concatenate([image[0].numpy(), alpha], axis=-1)
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(
        Path(folder_paths.get_input_directory()) / "moma_bench_reference.png"
    )
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "3": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": adapter_name,
                "llava_name": llava_name,
                "clip_vision_name": clip_name,
                "precision": "auto",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        },
        "4": {"class_type": "LoadImage", "inputs": {"image": "moma_bench_reference.png"}},
        "6": {
            "class_type": "MomaContextEncoder",
            "inputs": {
                "moma_model": ["3", 0],
                "image": ["4", 0],
                "mask": ["4", 1],
                "subject": SUBJECT,
                "prompt": SD_PROMPT.split(". ", 1)[1],
            },
        },
        "7": {
            "class_type": "MomaFeatureGrab",
            "inputs": {
                "model": ["1", 0],
                "moma_model": ["3", 0],
                "vae": ["1", 2],
                "clip": ["1", 1],
                "image": ["4", 0],
                "mask": ["4", 1],
                "subject": SUBJECT,
                "seed": 2,
                "resolution": 64,
            },
        },
        "8": {
            "class_type": "MomaApply",
            "inputs": {
                "model": ["1", 0],
                "moma_model": ["3", 0],
                "context": ["6", 0],
                "reference": ["7", 0],
                "preset": "context",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ["6", 1]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["8", 0],
                "positive": ["9", 0],
                "negative": ["10", 0],
                "latent_image": ["11", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 7.5,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "moma_bench"}},
    }
    sink = _MessageSink()
    executor = execution.PromptExecutor(
        sink,
        cache_type=execution.CacheType.CLASSIC,  # ComfyUI's default
        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0},
    )
    runs = []
    for attempt in range(2):
        sink.messages.clear()
        prompt["12"]["inputs"]["seed"] = attempt  # a new sampler seed: the usual reason to queue again
        prompt_id = f"moma-bench-{attempt}"
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            return {"status": "error", "reason": f"the graph did not validate: {error} {node_errors}"}
        start = time.perf_counter()
        executor.execute(prompt, prompt_id, {"client_id": _MessageSink.client_id}, outputs)
        elapsed = time.perf_counter() - start
        if not executor.success:
            errors = [data for event, data in executor.status_messages if event == "execution_error"]
            return {"status": "error", "reason": f"execution failed: {errors[:1]}"}
        cached = sorted(
            {str(nid) for event, data in sink.messages if event == "execution_cached" for nid in data.get("nodes", [])}
        )
        executed = [str(data["node"]) for event, data in sink.messages if event == "executing" and data.get("node")]
        runs.append({"seconds": round(elapsed, 2), "executed_nodes": executed, "cached_nodes": cached})
    second = runs[1]
    reran = [nid for nid in ("6", "7") if nid in second["executed_nodes"]]
    return {
        "status": "pass" if not reran and "6" in runs[0]["executed_nodes"] else "FAIL",
        "runs": runs,
        "detail": (
            f"run 1 {runs[0]['seconds']} s, run 2 {second['seconds']} s; run 2 executed only "
            f"{second['executed_nodes'] or 'nothing'}: LLaVA Context Encoder (6) and Feature Grab (7) came "
            f"from ComfyUI's cache"
            if not reran
            else f"run 2 executed {reran} again"
        ),
    }
