#!/usr/bin/env python3
"""MoMA sampling benchmark (issue 7): plain SD1.5 vs the same model with MoMA applied, side by side.

    .host/comfyui-0.30/venv/bin/python benchmarks/sampling.py [--sizes 256 512] [--steps 3] [--repeats 2]
                                                 [--json out.json] [--device cpu|cuda] [--profile]

Boots the installed ComfyUI through the pack's one boot (tools/moma_runner/boot.py), loads an SD1.5 checkpoint through ComfyUI's own
``CheckpointLoaderSimple`` (default: the full-layout random-weight test checkpoint from tools/moma_demo, the
same shapes as a real SD1.5 file; ``--checkpoint`` for a real one), runs the pack's Feature Grab on a
synthetic 512x512 reference and patches the model with the pack's ``apply_moma``. Then, per size, it samples
with ComfyUI's ``sample_custom`` (sampler euler, CFG 7.5, same seed and noise) the plain model, MoMA with a
~30%-coverage object bank and MoMA with a full-frame bank (plus, at sizes other than 512, MoMA with a 30% bank
from a Feature Grab with the generation's LATENT connected, "ref@SIZE"), interleaved and repeated, and reports:

- per-step time (the fastest steady step: the first step of every run is left out, and interference from
  other processes only adds time) as wall clock and as process CPU time, and the ratio MoMA / plain;
- aten ops and host reads (host-device syncs on CUDA) per UNet call and per model evaluation, counted at
  64x64 with a dispatch-mode counter (tools/op_count.py); ``--count-only`` prints only these;
- the Feature Grab (reference pass) time in units of one plain CFG step;
- peak RSS of the process while sampling (a thread polls RSS every few ms; and peak CUDA memory on a GPU);
- the re-run check: the same workflow executed twice through ComfyUI's executor does not run the LLaVA
  context encoder (nor the reference pass) again.

``--batch-growth`` measures only how the cost grows with the latent batch: plain and MoMA (30% bank, Feature
Grab with the LATENT connected) at ``--batches`` (default 1 4 16) on ``--batch-image-size`` (default 128) images:
time per step and per batch item, MoMA / plain per batch size, peak RSS (the polling thread) per variant.

The measured steps are taken from the middle of a 50-step "normal" schedule (steps 10..), where MoMA's
object path is on (it is off for t >= 950, i.e. the first ~2 of 50 steps), so the ratio is that of a
typical step. ``--profile`` adds a torch.profiler table and the pack's Python hot spots for one step.
On a machine shared with other jobs use ``--threads 1 --metric cpu``: torch's OpenMP threads otherwise spin
against the other processes and the timings mean little.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime
import gc
import io as text_io
import json
import logging
import os
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tools"))  # last: the pack's one ComfyUI boot and the real-format model writers

from moma_runner import boot  # noqa: E402
from moma_runner.common import host_dir  # noqa: E402

TARGETS = {"30%": {256: 1.05, 512: 1.20}, "full": {256: 1.5, 512: 1.5}}
MEMORY_TARGET_MB = 250.0
SD_PROMPT = "photo of a car. A car in autumn with falling leaves."
SUBJECT = "car"
OBJECT_COVERAGE = 0.30
SCHEDULE_STEPS = 50  # the measured steps are a window of this schedule
FIRST_STEP = 10


# --------------------------------------------------------------------------------------------------
# host


def place_model(folder: str, source: Path, models_dir: Path) -> str:
    """Link ``source`` (a file or folder) into ``models_dir/folder`` and return the name ComfyUI lists."""
    link = models_dir / folder / source.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source.resolve(), target_is_directory=source.is_dir())
    return source.name


def boot_comfy(device: str, attention: str) -> boot.ComfyHost:
    """The pack's one ComfyUI boot (tools/moma_runner/boot.py), with a fresh base directory, on ``device``;
    ``--attention pytorch`` selects ComfyUI's SDPA backend (--use-pytorch-cross-attention)."""
    comfy_args = {"fp16_unet": False}  # the UNet in the dtype ComfyUI picks for users (the tests keep fp16 on CPU)
    if attention == "pytorch":
        comfy_args["use_pytorch_cross_attention"] = True
    base_dir = Path(tempfile.mkdtemp(prefix="moma-bench-base-"))
    hostinfo = boot.boot(host_dir() / "ComfyUI", base_dir, cpu=device == "cpu", comfy_args=comfy_args)
    if hostinfo.pack_module_name is None:
        raise SystemExit("ComfyUI did not import the pack from custom_nodes/ (see its log for IMPORT FAILED)")
    return hostinfo


# --------------------------------------------------------------------------------------------------
# measuring


class RssMonitor:
    """Polls the process RSS in a thread; ``window()`` gives the high-water mark while it is open."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._process = psutil.Process()
        self._interval = interval_s
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rss-monitor", daemon=True)
        self._thread.start()

    def rss(self) -> int:
        return self._process.memory_info().rss

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = self.rss()
            with self._lock:
                self._peak = max(self._peak, value)
            time.sleep(self._interval)

    @contextlib.contextmanager
    def window(self) -> Iterator[dict]:
        result: dict = {}
        start = self.rss()
        with self._lock:
            self._peak = start
        yield result
        end = self.rss()
        with self._lock:
            peak = max(self._peak, end)
        result.update(start=start, peak=peak, end=end)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def mb(value: float) -> float:
    return round(value / 2**20, 1)


def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# models and inputs


def load_checkpoint(hostinfo: boot.ComfyHost, checkpoint: Optional[Path]) -> tuple[Any, Any, Any, str]:
    """(model, clip, vae, file name) through ComfyUI's CheckpointLoaderSimple, from models/checkpoints."""
    import moma_demo
    import nodes

    if checkpoint is None:
        from moma_demo import sd15

        checkpoint = moma_demo.cached("moma_test_sd15.safetensors", sd15.write_sd15_checkpoint)
    target = hostinfo.models_dir / "checkpoints" / checkpoint.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(checkpoint.resolve())
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(checkpoint.name)[:3]
    return model, clip, vae, checkpoint.name


def load_moma_model(adapter_path: Optional[Path]) -> Any:
    """A MOMA_MODEL holding the adapter (default: the upstream-layout random test adapter)."""
    import moma_demo
    from comfyui_moma.moma.weights import load_adapter

    if adapter_path is None:
        from moma_demo import adapter

        adapter_path = moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th)
    weights = load_adapter(adapter_path)
    try:
        from comfyui_moma.moma.model import MomaModel

        return MomaModel(adapter=weights, adapter_path=Path(adapter_path), llava_dir=Path("unused"),
                         clip_vision_path=Path("unused"))
    except (ImportError, TypeError):
        from types import SimpleNamespace

        return SimpleNamespace(adapter=weights)


def make_context(seed: int) -> Any:
    """A MOMA_CONTEXT with random tokens (LLaVA is not part of the sampling benchmark)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = {name: torch.randn(1, 4, 768, generator=generator) for name in ("cond_tokens", "uncond_tokens")}
    try:
        from comfyui_moma.moma.context import MomaContext

        return MomaContext(llava_emb=torch.randn(1, 1024, generator=generator), subject=SUBJECT,
                           prompt=SD_PROMPT.split(". ", 1)[1], sd_prompt=SD_PROMPT, **tokens)
    except ImportError:
        from types import SimpleNamespace

        return SimpleNamespace(subject=SUBJECT, sd_prompt=SD_PROMPT, **tokens)


def reference_inputs(size: int = 512) -> tuple[Any, dict[str, Any]]:
    """A smooth random reference IMAGE [1,H,W,3] and MASKs: a centred disc of ~30% area, and full frame."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(7)
    coarse = torch.rand(1, 3, 16, 16, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).movedim(1, -1)
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    radius = (OBJECT_COVERAGE / torch.pi) ** 0.5
    disc = (axis.view(-1, 1) ** 2 + axis.view(1, -1) ** 2 <= radius**2).float()
    return image, {"30%": disc.unsqueeze(0), "full": torch.ones(1, size, size)}


# --------------------------------------------------------------------------------------------------
# sampling


class Sampling:
    """One size: the latent, noise, sigmas and conditioning shared by every variant."""

    def __init__(self, model: Any, positive: Any, negative: Any, size: int, steps: int, sampler_name: str,
                 cfg: float, seed: int, batch: int = 1) -> None:
        import comfy.sample
        import comfy.samplers
        import torch

        self.size, self.batch = size, batch
        self.positive, self.negative, self.cfg, self.seed = positive, negative, cfg, seed
        self.latent = torch.zeros(batch, 4, size // 8, size // 8)
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        self.sampler = comfy.samplers.sampler_object(sampler_name)
        model_sampling = model.get_model_object("model_sampling")
        schedule = comfy.samplers.calculate_sigmas(model_sampling, "normal", SCHEDULE_STEPS).cpu()
        self.sigmas = schedule[FIRST_STEP:FIRST_STEP + steps + 1]
        self.timesteps = [float(model_sampling.timestep(s)) for s in self.sigmas[:-1]]
        self.device = model.load_device

    def run(self, model: Any, steps: Optional[int] = None) -> tuple[list[float], list[float]]:
        """Sample; returns each step's wall-clock and process CPU seconds (step i ends at the i-th callback)."""
        import comfy.sample

        sigmas = self.sigmas if steps is None else self.sigmas[:steps + 1]
        ends: list[tuple[float, float]] = []

        def on_step(step: int, x0: Any, x: Any, total_steps: int) -> None:
            synchronize(self.device)
            ends.append((time.perf_counter(), time.process_time()))

        start = (time.perf_counter(), time.process_time())
        comfy.sample.sample_custom(model, self.noise, self.cfg, self.sampler, sigmas, self.positive, self.negative,
                                   self.latent, callback=on_step, disable_pbar=True, seed=self.seed)
        marks = [start] + ends
        return ([b[0] - a[0] for a, b in zip(marks, marks[1:])], [b[1] - a[1] for a, b in zip(marks, marks[1:])])


def steady(step_times: list[list[float]]) -> list[float]:
    """Every step but the first of each run (that one carries per-run set-up, paid once per generation)."""
    return [t for run in step_times for t in (run[1:] if len(run) > 1 else run)]


def time_reference_pass(model: Any, moma_model: Any, vae: Any, clip: Any, image: Any, mask: Any,
                        resolution: int = 512, latent_size: Optional[int] = None) -> tuple[Any, dict]:
    """The pack's Feature Grab node (at ``resolution``, or with a ``latent_size`` square LATENT connected, which
    sets the resolution), timed as a whole and its VAE-encode part alone."""
    import torch
    from comfyui_moma.moma.reference import reference_pixel_size, resize_reference_image
    from comfyui_moma.nodes.feature_grab import MomaFeatureGrab, encode_reference_latent, resolution_of_latent

    latent = None if latent_size is None else {"samples": torch.zeros(1, 4, latent_size // 8, latent_size // 8)}
    synchronize(model.load_device)
    start, start_cpu = time.perf_counter(), time.process_time()
    bank = MomaFeatureGrab.execute(model, moma_model, vae, clip, image, mask, SUBJECT, 0, resolution=resolution,
                                   latent=latent).result[0]
    if latent is not None:
        resolution = resolution_of_latent(latent)
    synchronize(model.load_device)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    pixels = resize_reference_image(image, reference_pixel_size(image.shape[1], image.shape[2], resolution))
    start, start_cpu = time.perf_counter(), time.process_time()
    encode_reference_latent(vae, pixels, torch.Generator().manual_seed(0))
    synchronize(model.load_device)
    return bank, {"total_s": round(total, 3), "total_cpu_s": round(total_cpu, 3),
                  "vae_encode_s": round(time.perf_counter() - start, 3),
                  "vae_encode_cpu_s": round(time.process_time() - start_cpu, 3)}


def profile_step(label: str, model: Any, sampling: Sampling) -> str:
    """torch.profiler op table and cProfile of the pack's functions for a 2-step run (2nd step kept)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                            and str(sampling.device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        sampling.run(model, steps=2)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    profiler = cProfile.Profile()
    profiler.enable()
    sampling.run(model, steps=2)
    profiler.disable()
    stream = text_io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(r"(comfyui_moma|" + REPO.name + r")/(nodes|moma)/", 25)
    return f"=== {label} @ {sampling.size}: torch ops (2 steps) ===\n{ops}\n=== {label}: pack functions ===\n{stream.getvalue()}"


COUNT_SIZE = 64  # image side for the op counts (latent 8x8): the counts do not depend on the size


def count_ops(variants: dict[str, Any], sampling: "Sampling", steps: int = 3) -> dict:
    """aten ops and host reads per UNet call and per model evaluation for each variant (tools/op_count.py).

    A ``steps``-step run per variant (euler, one UNet call per step with cond and uncond batched); the first
    call builds each run's device caches and has no subject mask yet, so the figures are the median of the
    later calls: what every step costs. ``added`` is the difference to plain.
    """
    from op_count import ModelCallCounts, count_model_calls, host_reads

    def median(values: list[int]) -> int:
        return int(statistics.median(values))

    counts: dict[str, dict] = {}
    for name, model in variants.items():
        sampling.run(model, steps=1)  # first use of these shapes (and of this model) is not counted
        with count_model_calls() as calls:
            sampling.run(model, steps=steps)
        later_calls, later_evals = calls.per_call[1:] or calls.per_call, calls.per_eval[1:] or calls.per_eval
        top = sum(later_calls, start=type(later_calls[0])()) if later_calls else {}
        counts[name] = {
            "unet_calls": len(calls.per_call),
            "evaluations": len(calls.per_eval),
            "ops_per_call": median([ModelCallCounts.ops(c) for c in later_calls]),
            "host_reads_per_call": median([host_reads(c) for c in later_calls]),
            "ops_per_evaluation": median([ModelCallCounts.ops(c) for c in later_evals]),
            "host_reads_per_evaluation": median([host_reads(c) for c in later_evals]),
            "host_reads_per_run": host_reads(calls.total),
            "top_ops_per_call": {op: round(n / len(later_calls), 1) for op, n in
                                 sorted(top.items(), key=lambda item: -item[1])[:12]} if later_calls else {},
        }
    plain = counts.get("plain")
    if plain is not None:
        for name, entry in counts.items():
            if name != "plain":
                for key in ("ops_per_call", "host_reads_per_call", "ops_per_evaluation", "host_reads_per_evaluation",
                            "host_reads_per_run"):
                    entry["added_" + key] = entry[key] - plain[key]
    return {"size": sampling.size, "steps": steps, "variants": counts}


def format_counts(report: dict) -> str:
    """The op counts as a Markdown table."""
    lines = [f"aten ops per UNet call at {report['size']}x{report['size']} (cond and uncond in one call; "
             f"median of calls 2..{report['steps']} of a run):", "",
             "| variant | ops / UNet call | added by MoMA | host reads / call (added) | ops / evaluation (added) | "
             "host reads / evaluation (added) | host reads / run (added) |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in report["variants"].items():
        def added(key: str) -> str:
            return f" ({entry['added_' + key]:+d})" if "added_" + key in entry else ""
        lines.append(f"| {name} | {entry['ops_per_call']} | {entry.get('added_ops_per_call', '-')} | "
                     f"{entry['host_reads_per_call']}{added('host_reads_per_call')} | "
                     f"{entry['ops_per_evaluation']}{added('ops_per_evaluation')} | "
                     f"{entry['host_reads_per_evaluation']}{added('host_reads_per_evaluation')} | "
                     f"{entry['host_reads_per_run']}{added('host_reads_per_run')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the re-run check (ComfyUI executor caching)


class _MessageSink:
    """The ``server`` a PromptExecutor reports to: keeps the messages so cached nodes can be read off."""

    client_id = "moma-benchmark"  # the executor reports "executing" only to a client (extra_data client_id)

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.last_node_id = None

    def send_sync(self, event: str, data: Any, sid: Optional[str] = None) -> None:
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
    import moma_demo
    import folder_paths
    import numpy as np
    from PIL import Image
    from moma_demo import adapter, clip_vision, llava

    adapter_name = place_model("moma", moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th),
                               hostinfo.models_dir)
    folders = {"LLM": moma_demo.cached("MoMA_llava_7b", llava.write_llava_folder),
               "clip_vision": moma_demo.cached("clip-vit-large-patch14-336", clip_vision.write_clip_vision_folder)}
    for folder, source in folders.items():
        place_model(folder, source, hostinfo.models_dir)
    llava_name, clip_name = folders["LLM"].name, folders["clip_vision"].name
    image, masks = reference_inputs(64)
    alpha = 1.0 - masks["30%"][0, ..., None].numpy()  # LoadImage's MASK output is 1 - alpha
    rgba = np.concatenate([image[0].numpy(), alpha], axis=-1)
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(
        Path(folder_paths.get_input_directory()) / "moma_bench_reference.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "3": {"class_type": "MomaLoader", "inputs": {
            "adapter_name": adapter_name, "llava_name": llava_name, "clip_vision_name": clip_name,
            "precision": "auto", "quantization": "none", "keep_llava_loaded": False}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "moma_bench_reference.png"}},
        "6": {"class_type": "MomaContextEncoder", "inputs": {
            "moma_model": ["3", 0], "image": ["4", 0], "mask": ["4", 1], "subject": SUBJECT,
            "prompt": SD_PROMPT.split(". ", 1)[1]}},
        "7": {"class_type": "MomaFeatureGrab", "inputs": {
            "model": ["1", 0], "moma_model": ["3", 0], "vae": ["1", 2], "clip": ["1", 1], "image": ["4", 0],
            "mask": ["4", 1], "subject": SUBJECT, "seed": 2, "resolution": 64}},
        "8": {"class_type": "MomaApply", "inputs": {
            "model": ["1", 0], "moma_model": ["3", 0], "context": ["6", 0], "reference": ["7", 0],
            "preset": "context", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ["6", 1]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0], "positive": ["9", 0], "negative": ["10", 0], "latent_image": ["11", 0],
            "seed": 0, "steps": 2, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "13": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "moma_bench"}},
    }
    sink = _MessageSink()
    executor = execution.PromptExecutor(sink, cache_type=execution.CacheType.CLASSIC,  # ComfyUI's default
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
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
        cached = sorted({str(nid) for event, data in sink.messages if event == "execution_cached"
                         for nid in data.get("nodes", [])})
        executed = [str(data["node"]) for event, data in sink.messages if event == "executing" and data.get("node")]
        runs.append({"seconds": round(elapsed, 2), "executed_nodes": executed, "cached_nodes": cached})
    second = runs[1]
    reran = [nid for nid in ("6", "7") if nid in second["executed_nodes"]]
    return {
        "status": "pass" if not reran and "6" in runs[0]["executed_nodes"] else "FAIL",
        "runs": runs,
        "detail": (f"run 1 {runs[0]['seconds']} s, run 2 {second['seconds']} s; run 2 executed only "
                   f"{second['executed_nodes'] or 'nothing'}: LLaVA Context Encoder (6) and Feature Grab (7) came "
                   f"from ComfyUI's cache" if not reran else f"run 2 executed {reran} again"),
    }


# --------------------------------------------------------------------------------------------------
# batch growth: the same step at batch sizes 1, 4, 16 (cost per item should stay flat)


def load_models(opts: argparse.Namespace, hostinfo: boot.ComfyHost) -> tuple[Any, ...]:
    """(model, clip, vae, checkpoint name, MOMA_MODEL, MOMA_CONTEXT, positive, negative): what every measurement
    samples with (the prompt SD_PROMPT, an empty negative)."""
    import nodes

    model, clip, vae, checkpoint_name = load_checkpoint(hostinfo, opts.checkpoint)
    moma_model = load_moma_model(opts.adapter)
    context = make_context(opts.seed)
    positive = nodes.CLIPTextEncode().encode(clip, SD_PROMPT)[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    return model, clip, vae, checkpoint_name, moma_model, context, positive, negative


def measure_variants(variants: dict[str, Any], sampling: "Sampling", repeats: int, monitor: "RssMonitor",
                     label: str) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]], dict[str, list[dict]]]:
    """Sample each variant ``repeats`` times, interleaved (the order rotates each repeat, so drift in the
    machine's speed hits every variant alike); per variant: wall and CPU step times of each run, and each run's
    memory window (RSS start/peak, plus ``cuda_peak`` on CUDA)."""
    import torch

    device = sampling.device
    on_cuda = getattr(device, "type", "") == "cuda"
    wall: dict[str, list[list[float]]] = {name: [] for name in variants}
    cpu: dict[str, list[list[float]]] = {name: [] for name in variants}
    memory: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            with monitor.window() as window:
                wall_times, cpu_times = sampling.run(variants[name])
            if on_cuda:
                window["cuda_peak"] = torch.cuda.max_memory_allocated(device)
            wall[name].append(wall_times)
            cpu[name].append(cpu_times)
            memory[name].append(window)
            print(f"  {label} {name:10s} run {repeat + 1}: wall " + " ".join(f"{t:.3f}" for t in wall_times)
                  + " s, cpu " + " ".join(f"{t:.2f}" for t in cpu_times) + " s", flush=True)
    return wall, cpu, memory


def measure_batch_growth(opts: argparse.Namespace, hostinfo: boot.ComfyHost, monitor: RssMonitor) -> dict:
    """Plain vs MoMA (30% object bank, Feature Grab with the generation's LATENT connected) at each of
    ``opts.batches`` latent batch sizes, ``opts.batch_image_size`` square: the fastest steady step, the time per
    batch item, MoMA / plain, and the peak RSS while sampling above the RSS before (both models are loaded)."""
    import torch
    from comfyui_moma.nodes.apply import apply_moma

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    model, clip, vae, checkpoint_name, moma_model, context, positive, negative = load_models(opts, hostinfo)
    device = model.load_device
    on_cuda = getattr(device, "type", "") == "cuda"
    size = opts.batch_image_size
    samplings = {batch: Sampling(model, positive, negative, size, opts.steps, opts.sampler, opts.cfg, opts.seed,
                                 batch=batch) for batch in opts.batches}
    print(f"Batch growth at {size}x{size}: loading {checkpoint_name} and warming up ({device}, "
          f"{torch.get_num_threads()} threads)...", flush=True)
    samplings[opts.batches[0]].run(model, steps=1)  # loads the model
    image, masks = reference_inputs(512)
    bank, reference = time_reference_pass(model, moma_model, vae, clip, image, masks["30%"], latent_size=size)
    variants = {"plain": model, "moma": apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)}
    rows: dict[int, dict] = {}
    for batch, sampling in samplings.items():
        for patched in variants.values():
            sampling.run(patched, steps=1)  # first use of this batch's shapes
        wall, cpu, memory = measure_variants(variants, sampling, opts.repeats, monitor, f"batch {batch:2d}")
        row: dict[str, Any] = {}
        for name in variants:
            per_wall, per_cpu = min(steady(wall[name])), min(steady(cpu[name]))
            row[name] = {
                "per_step_s": round(per_wall, 4), "per_step_cpu_s": round(per_cpu, 4),
                "per_item_s": round(per_wall / batch, 4), "per_item_cpu_s": round(per_cpu / batch, 4),
                "peak_rss_mb": mb(max(w["peak"] for w in memory[name])),
                "peak_rss_over_start_mb": mb(max(w["peak"] - w["start"] for w in memory[name])),
                "peak_cuda_mb": mb(max(w["cuda_peak"] for w in memory[name])) if on_cuda else None,
                "step_times_s": [[round(t, 4) for t in run] for run in wall[name]],
                "step_cpu_s": [[round(t, 4) for t in run] for run in cpu[name]],
            }
        row["ratio"] = round(row["moma"]["per_step_s"] / row["plain"]["per_step_s"], 3)
        row["ratio_cpu"] = round(row["moma"]["per_step_cpu_s"] / row["plain"]["per_step_cpu_s"], 3)
        rows[batch] = row
    metric = "per_item_s" if opts.metric == "wall" else "per_item_cpu_s"
    ratio_key = "ratio" if opts.metric == "wall" else "ratio_cpu"
    first = rows[opts.batches[0]]
    growth = {name: {batch: round(rows[batch][name][metric] / first[name][metric], 3) for batch in rows}
              for name in variants}
    ratios = [rows[batch][ratio_key] for batch in rows]
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device, load_before),
        "settings": {"metric": opts.metric, "sampler": opts.sampler, "cfg": opts.cfg, "seed": opts.seed,
                     "image_size": size, "batches": opts.batches, "steps_per_run": opts.steps,
                     "repeats": opts.repeats, "checkpoint": checkpoint_name, "dtype": str(model.model.get_dtype()),
                     "moma": "30% object bank, Feature Grab with the generation's LATENT connected, strength 1.0"},
        "reference_pass": reference,
        "batch_growth": {
            "rows": rows,
            # time per item relative to the first batch size (1.0 = linear growth of the step's cost)
            "per_item_relative_to_first": growth,
            "ratio_spread": round(max(ratios) - min(ratios), 3),
        },
    }


def format_batch_table(report: dict) -> str:
    """The batch-growth rows as a Markdown table."""
    settings, growth = report["settings"], report["batch_growth"]
    lines = [f"batch growth at {settings['image_size']}x{settings['image_size']} ({settings['metric']} metric):", "",
             "| batch | plain s/step | MoMA s/step | plain s/item | MoMA s/item | MoMA / plain (wall, CPU) | "
             "peak RSS plain / MoMA MB (over start) |",
             "|---|---|---|---|---|---|---|"]
    for batch, row in growth["rows"].items():
        plain, moma = row["plain"], row["moma"]
        per = "per_item_s" if settings["metric"] == "wall" else "per_item_cpu_s"
        step = "per_step_s" if settings["metric"] == "wall" else "per_step_cpu_s"
        lines.append(f"| {batch} | {plain[step]:.3f} | {moma[step]:.3f} | {plain[per]:.3f} | {moma[per]:.3f} | "
                     f"{row['ratio']:.3f}, {row['ratio_cpu']:.3f} | {plain['peak_rss_mb']:.0f} "
                     f"(+{plain['peak_rss_over_start_mb']:.0f}) / {moma['peak_rss_mb']:.0f} "
                     f"(+{moma['peak_rss_over_start_mb']:.0f}) |")
    machine = report["machine"]
    lines.append(f"\nper item relative to batch {settings['batches'][0]}: {growth['per_item_relative_to_first']}; "
                 f"MoMA/plain spread {growth['ratio_spread']}")
    lines.append(f"machine: {machine['cpu']} x{machine['cpu_count']} ({machine['torch_threads']} torch threads), "
                 f"{machine['ram_gb']} GB RAM, {machine['device']}, torch {machine['torch']}, ComfyUI attention "
                 f"{machine['comfyui_attention']}, load average {machine['load_average_start_end']}; {report['date']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (multiples of 64)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant per size")
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (euler, ddim, ...)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--attention", choices=["default", "pytorch"], default="default",
                        help="ComfyUI attention backend: its default for the device, or torch SDPA")
    parser.add_argument("--checkpoint", type=Path, help="an SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--adapter", type=Path, help="attn_adapters_projectors.th (default: the random test adapter)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--metric", choices=["wall", "cpu"], default="wall",
                        help="which per-step time the targets are judged on: wall clock, or process CPU time "
                             "(steadier on a machine shared with other jobs)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", action="store_true", help="also print a profile of one step per variant")
    parser.add_argument("--skip-rerun", action="store_true", help="skip the executor re-run check")
    parser.add_argument("--rerun-only", action="store_true", help="only the executor re-run check")
    parser.add_argument("--count-only", action="store_true",
                        help=f"only the aten op / host read counts per UNet call (at {COUNT_SIZE}x{COUNT_SIZE})")
    parser.add_argument("--batch-growth", action="store_true",
                        help="only the batch-growth rows: plain and MoMA at each --batches latent batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes for --batch-growth")
    parser.add_argument("--batch-image-size", type=int, default=128, help="image side for --batch-growth")
    parser.add_argument("--min-free-gb", type=float, default=8.0, help="refuse to start with less RAM available")
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Any, load_before: tuple[float, ...]) -> dict:
    import torch
    import comfy.ldm.modules.attention as comfy_attention

    on_cuda = getattr(device, "type", "") == "cuda"
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
        "torch": torch.__version__,
        "comfyui_attention": comfy_attention.optimized_attention.__name__,
        "load_average_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def measure(opts: argparse.Namespace, hostinfo: boot.ComfyHost, monitor: RssMonitor) -> tuple[dict, str]:
    """Everything but the re-run check; returns (report, profile text). Its models are freed on return."""
    import torch
    import comfy.ldm.modules.attention as comfy_attention
    from comfyui_moma.nodes.apply import apply_moma

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    model, clip, vae, checkpoint_name, moma_model, context, positive, negative = load_models(opts, hostinfo)
    device = model.load_device
    on_cuda = getattr(device, "type", "") == "cuda"

    if opts.count_only:
        opts.sizes = []
    samplings = {size: Sampling(model, positive, negative, size, opts.steps, opts.sampler, opts.cfg, opts.seed)
                 for size in opts.sizes}
    count_sampling = Sampling(model, positive, negative, COUNT_SIZE, 3, opts.sampler, opts.cfg, opts.seed)
    print(f"Loading {checkpoint_name} and warming up ({device}, {torch.get_num_threads()} threads, ComfyUI attention "
          f"{comfy_attention.optimized_attention.__name__})...", flush=True)
    (samplings[opts.sizes[0]] if opts.sizes else count_sampling).run(model, steps=1)  # loads the model

    reference_size = COUNT_SIZE if opts.count_only else 512  # the op counts do not depend on the bank's size
    image, masks = reference_inputs(reference_size)
    if on_cuda:  # CUDA's first use of the VAE encoder and of these shapes (kernel selection) is not the pass's cost
        time_reference_pass(model, moma_model, vae, clip, image, next(iter(masks.values())))
    banks, reference = {}, {}
    for label, mask in masks.items():
        banks[label], reference[label] = time_reference_pass(model, moma_model, vae, clip, image, mask,
                                                             resolution=reference_size)
        counts = banks[label].layer_token_counts()
        top_tokens = (reference_size // 8) ** 2
        reference[label]["bank_tokens_64x64"] = counts[("input", 1)]
        reference[label]["coverage"] = round(counts[("input", 1)] / top_tokens, 3)
        reference[label]["bank_mb"] = mb(sum(t.numel() * t.element_size()
                                             for d in (banks[label].keys, banks[label].values) for t in d.values()))
        print(f"Feature Grab, {label} mask: {reference[label]['total_s']:.2f} s", flush=True)
    variants: dict[str, Any] = {"plain": model}
    for label, bank in banks.items():
        variants[f"moma {label}"] = apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)
    print(f"Counting aten ops per UNet call at {COUNT_SIZE}x{COUNT_SIZE}...", flush=True)
    op_counts = count_ops(variants, count_sampling)
    print(format_counts(op_counts), flush=True)
    if opts.count_only:
        return {"date": started.isoformat(timespec="seconds"), "machine": machine_info(device, load_before),
                "op_counts": op_counts}, ""
    # Feature Grab with the generation's LATENT connected (its resolution widget left at the default): the
    # reference is encoded at the generation size, as the reference pipeline's reference and image are both
    # 512x512, and the bank holds about as many object keys as the image has object queries.
    matched: dict[int, Any] = {}
    matched_reference: dict[str, dict] = {}
    for size in opts.sizes:
        if size != 512:
            bank, info = time_reference_pass(model, moma_model, vae, clip, image, masks["30%"], latent_size=size)
            matched_reference[f"30% ref@{size}"] = {**info, "bank_tokens_top": bank.layer_token_counts()[("input", 1)]}
            matched[size] = apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)
    # Feature Grab with every setting at its default (resolution 0, auto): the reference pass runs when sampling
    # starts, at the size sampled (its time is in each run's first step, which the per-step figures leave out)
    from comfyui_moma.nodes.feature_grab import MomaFeatureGrab

    auto_reference = MomaFeatureGrab.execute(model, moma_model, vae, clip, image, masks["30%"], SUBJECT, 0).result[0]
    auto_model = apply_moma(model, moma_model, context, auto_reference, 1.0, 0.0, 1.0)

    results: dict[str, Any] = {}
    for size, sampling in samplings.items():
        print(f"{size}x{size}: warm-up", flush=True)
        sampling.run(model, steps=1)  # first use of this size's shapes; every run's own first step is left out too
        size_variants = dict(variants)
        if size in matched:
            size_variants[f"moma 30% ref@{size}"] = matched[size]
            size_variants["moma 30% default (auto)"] = auto_model
        names = list(size_variants)
        wall, cpu, memory = measure_variants(size_variants, sampling, opts.repeats, monitor, str(size))
        entry: dict[str, Any] = {"timesteps": [round(t, 1) for t in sampling.timesteps], "variants": {}}
        # The fastest steady step: interference from other processes only ever adds time.
        plain_wall, plain_cpu = min(steady(wall["plain"])), min(steady(cpu["plain"]))
        for name in names:
            per_wall, per_cpu = min(steady(wall[name])), min(steady(cpu[name]))
            entry["variants"][name] = {
                "per_step_s": round(per_wall, 4),
                "per_step_cpu_s": round(per_cpu, 4),
                "ratio": round(per_wall / plain_wall, 3),
                "ratio_cpu": round(per_cpu / plain_cpu, 3),
                "median_step_s": round(statistics.median(steady(wall[name])), 4),
                "ratio_per_repeat": [round(min(steady([m])) / min(steady([p])), 3)
                                     for m, p in zip(wall[name], wall["plain"])],
                "step_times_s": [[round(t, 4) for t in run] for run in wall[name]],
                "step_cpu_s": [[round(t, 4) for t in run] for run in cpu[name]],
                "peak_rss_mb": mb(max(w["peak"] for w in memory[name])),
                "rss_before_mb": mb(min(w["start"] for w in memory[name])),
                "peak_cuda_mb": mb(max(w["cuda_peak"] for w in memory[name])) if on_cuda else None,
            }
        results[size] = entry

    unit_size = 512 if 512 in results else max(results)
    plain_unit = results[unit_size]["variants"]["plain"]
    for label, info in reference.items():
        info["plain_cfg_steps"] = round(info["total_s"] / plain_unit["per_step_s"], 2)
        info["plain_cfg_steps_cpu"] = round(info["total_cpu_s"] / plain_unit["per_step_cpu_s"], 2)
        info["unit"] = f"plain CFG step at {unit_size}x{unit_size}"

    profile_text = ""
    if opts.profile:
        for sampling in samplings.values():
            for name, patched in variants.items():
                profile_text += profile_step(name, patched, sampling) + "\n"

    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device, load_before),
        "settings": {"metric": opts.metric, "sampler": opts.sampler, "cfg": opts.cfg, "seed": opts.seed,
                     "steps_per_run": opts.steps, "repeats": opts.repeats,
                     "schedule": f"normal {SCHEDULE_STEPS}, steps {FIRST_STEP}..{FIRST_STEP + opts.steps - 1}",
                     "checkpoint": checkpoint_name, "dtype": str(model.model.get_dtype()),
                     "strength": 1.0, "prompt": SD_PROMPT},
        "sampling": results,
        "op_counts": op_counts,
        "reference_pass": reference,
        "reference_pass_at_generation_size": matched_reference,
        "targets": {"ratio": TARGETS, "memory_over_plain_mb": MEMORY_TARGET_MB},
    }
    return report, profile_text


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    available_gb = psutil.virtual_memory().available / 2**30
    if available_gb < opts.min_free_gb:
        print(f"Only {available_gb:.1f} GB RAM available (need {opts.min_free_gb} GB for a full SD1.5 in fp32); "
              f"try again later or pass --min-free-gb.", file=sys.stderr)
        return 2
    if any(size % 64 for size in opts.sizes) or opts.batch_image_size % 64:
        print("--sizes must be multiples of 64", file=sys.stderr)
        return 2

    quiet = logging.Filter()
    quiet.filter = lambda record: record.levelno >= logging.ERROR  # ComfyUI lists optional nodes it can't import
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    hostinfo = boot_comfy(opts.device, opts.attention)
    for handler in logging.getLogger().handlers:
        handler.removeFilter(quiet)
    import torch
    import comfy.model_management

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.rerun_only:
        import moma_demo
        from moma_demo import sd15

        checkpoint = opts.checkpoint or moma_demo.cached("moma_test_sd15.safetensors", sd15.write_sd15_checkpoint)
        result = rerun_check(hostinfo, place_model("checkpoints", checkpoint, hostinfo.models_dir))
        print(json.dumps(result, indent=2))
        return 0 if result["status"] == "pass" else 1

    monitor = RssMonitor()
    if opts.batch_growth:
        report = measure_batch_growth(opts, hostinfo, monitor)
        monitor.close()
        print()
        print(format_batch_table(report))
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"\nJSON written to {opts.json}")
        return 0
    report, profile_text = measure(opts, hostinfo, monitor)
    monitor.close()
    if opts.count_only:
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"\nJSON written to {opts.json}")
        return 0
    if opts.skip_rerun:
        report["rerun_check"] = {"status": "skipped"}
    else:
        gc.collect()  # the graph loads the checkpoint again: free the benchmark's copy first
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        print("Re-run check through ComfyUI's executor...", flush=True)
        report["rerun_check"] = rerun_check(hostinfo, report["settings"]["checkpoint"])
    print()
    print(format_table(report))
    print()
    print(format_counts(report["op_counts"]))
    if profile_text:
        print(profile_text)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON written to {opts.json}")
    return 0


def _verdict(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("ok" if ok else "MISSED")


def format_table(report: dict) -> str:
    """The report as Markdown tables (the README's Performance section shows the same layout)."""
    metric = report["settings"]["metric"]
    ratio_key = "ratio" if metric == "wall" else "ratio_cpu"
    lines = [f"| size | variant | s/step (wall) | CPU s/step | MoMA/plain (wall) | MoMA/plain (CPU) | target | "
             f"peak RSS MB | vs plain MB | met ({metric}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size, entry in report["sampling"].items():
        plain = entry["variants"]["plain"]
        for name, info in entry["variants"].items():
            label = name.split(" ", 1)[1] if name != "plain" else None
            target = TARGETS.get(label.split(" ref@")[0], {}).get(int(size)) if label else None
            on_gpu = info.get("peak_cuda_mb") is not None
            extra = (info["peak_cuda_mb"] - plain["peak_cuda_mb"]) if on_gpu else (info["peak_rss_mb"] - plain["peak_rss_mb"])
            met = None if label is None else ((target is None or info[ratio_key] <= target) and extra <= MEMORY_TARGET_MB)
            lines.append(
                f"| {size} | {name} | {info['per_step_s']:.3f} | {info['per_step_cpu_s']:.3f} | {info['ratio']:.3f} | "
                f"{info['ratio_cpu']:.3f} | {'<= %.2f' % target if target else '-'} | {info['peak_rss_mb']:.0f}"
                f"{' (CUDA %.0f)' % info['peak_cuda_mb'] if on_gpu else ''} | "
                f"{'-' if label is None else '%+d' % round(extra)} | {_verdict(met)} |")
    unit = next(iter(report["reference_pass"].values()))["unit"]
    lines += ["", f"| reference pass (Feature Grab, 512x512 reference) | s (wall) | CPU s | of which VAE encode s | "
              f"x {unit} (wall / CPU) | bank tokens at 64x64 |",
              "|---|---|---|---|---|---|"]
    for label, info in report["reference_pass"].items():
        lines.append(f"| {label} mask | {info['total_s']:.2f} | {info['total_cpu_s']:.2f} | {info['vae_encode_s']:.2f} | "
                     f"{info['plain_cfg_steps']:.2f} / {info['plain_cfg_steps_cpu']:.2f} | "
                     f"{info['bank_tokens_64x64']} ({info['coverage']:.0%}) |")
    for label, info in report.get("reference_pass_at_generation_size", {}).items():
        lines.append(f"| {label} (LATENT connected: reference at the generation size) | {info['total_s']:.2f} | {info['total_cpu_s']:.2f} | "
                     f"{info['vae_encode_s']:.2f} | - | {info['bank_tokens_top']} at its top grid |")
    rerun = report["rerun_check"]
    note = rerun.get("reason") or rerun.get("detail")
    lines += ["", f"re-run check (same workflow twice through ComfyUI's executor): {rerun['status']}"
              + (f" - {note}" if note else "")]
    machine = report["machine"]
    lines.append(f"machine: {machine['cpu']} x{machine['cpu_count']} ({machine['torch_threads']} torch threads), "
                 f"{machine['ram_gb']} GB RAM, {machine['device']}{' ' + machine['gpu'] if machine['gpu'] else ''}, "
                 f"torch {machine['torch']}, ComfyUI attention {machine['comfyui_attention']}, "
                 f"load average {machine['load_average_start_end']} (start, end); {report['date']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
