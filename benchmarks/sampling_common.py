"""Shared by the sampling benchmark's measurements (benchmarks/sampling.py): the ComfyUI boot, the models and
inputs every measurement samples with, sampling one schedule window with step times, the RSS monitor and the
machine description."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.append(str(REPO / "tools"))  # last: the pack's one ComfyUI boot and the real-format model writers

from moma_runner import boot  # noqa: E402
from moma_runner.common import host_dir  # noqa: E402

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


def load_checkpoint(hostinfo: boot.ComfyHost, checkpoint: Path | None) -> tuple[Any, Any, Any, str]:
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


def load_moma_model(adapter_path: Path | None) -> Any:
    """A MOMA_MODEL holding the adapter (default: the upstream-layout random test adapter)."""
    import moma_demo
    from comfyui_moma.moma.weights import load_adapter

    if adapter_path is None:
        from moma_demo import adapter

        adapter_path = moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th)
    weights = load_adapter(adapter_path)
    try:
        from comfyui_moma.moma.model import MomaModel

        return MomaModel(
            adapter=weights, adapter_path=Path(adapter_path), llava_dir=Path("unused"), clip_vision_path=Path("unused")
        )
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

        return MomaContext(
            llava_emb=torch.randn(1, 1024, generator=generator),
            subject=SUBJECT,
            prompt=SD_PROMPT.split(". ", 1)[1],
            sd_prompt=SD_PROMPT,
            **tokens,
        )
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


# --------------------------------------------------------------------------------------------------
# sampling


class Sampling:
    """One size: the latent, noise, sigmas and conditioning shared by every variant."""

    def __init__(
        self,
        model: Any,
        positive: Any,
        negative: Any,
        size: int,
        steps: int,
        sampler_name: str,
        cfg: float,
        seed: int,
        batch: int = 1,
    ) -> None:
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
        self.sigmas = schedule[FIRST_STEP : FIRST_STEP + steps + 1]
        self.timesteps = [float(model_sampling.timestep(s)) for s in self.sigmas[:-1]]
        self.device = model.load_device

    def run(self, model: Any, steps: int | None = None) -> tuple[list[float], list[float]]:
        """Sample; returns each step's wall-clock and process CPU seconds (step i ends at the i-th callback)."""
        import comfy.sample

        sigmas = self.sigmas if steps is None else self.sigmas[: steps + 1]
        ends: list[tuple[float, float]] = []

        def on_step(step: int, x0: Any, x: Any, total_steps: int) -> None:
            synchronize(self.device)
            ends.append((time.perf_counter(), time.process_time()))

        start = (time.perf_counter(), time.process_time())
        comfy.sample.sample_custom(
            model,
            self.noise,
            self.cfg,
            self.sampler,
            sigmas,
            self.positive,
            self.negative,
            self.latent,
            callback=on_step,
            disable_pbar=True,
            seed=self.seed,
        )
        marks = [start] + ends
        return ([b[0] - a[0] for a, b in zip(marks, marks[1:])], [b[1] - a[1] for a, b in zip(marks, marks[1:])])


def steady(step_times: list[list[float]]) -> list[float]:
    """Every step but the first of each run (that one carries per-run set-up, paid once per generation)."""
    return [t for run in step_times for t in (run[1:] if len(run) > 1 else run)]


def time_reference_pass(
    model: Any,
    moma_model: Any,
    vae: Any,
    clip: Any,
    image: Any,
    mask: Any,
    resolution: int = 512,
    latent_size: int | None = None,
) -> tuple[Any, dict]:
    """The pack's Feature Grab node (at ``resolution``, or with a ``latent_size`` square LATENT connected, which
    sets the resolution), timed as a whole and its VAE-encode part alone."""
    import torch
    from comfyui_moma.moma.reference import reference_pixel_size, resize_reference_image
    from comfyui_moma.nodes.feature_grab import MomaFeatureGrab, encode_reference_latent, resolution_of_latent

    latent = None if latent_size is None else {"samples": torch.zeros(1, 4, latent_size // 8, latent_size // 8)}
    synchronize(model.load_device)
    start, start_cpu = time.perf_counter(), time.process_time()
    bank = MomaFeatureGrab.execute(
        model, moma_model, vae, clip, image, mask, SUBJECT, 0, resolution=resolution, latent=latent
    ).result[0]
    if latent is not None:
        resolution = resolution_of_latent(latent)
    synchronize(model.load_device)
    total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    pixels = resize_reference_image(image, reference_pixel_size(image.shape[1], image.shape[2], resolution))
    start, start_cpu = time.perf_counter(), time.process_time()
    encode_reference_latent(vae, pixels, torch.Generator().manual_seed(0))
    synchronize(model.load_device)
    return bank, {
        "total_s": round(total, 3),
        "total_cpu_s": round(total_cpu, 3),
        "vae_encode_s": round(time.perf_counter() - start, 3),
        "vae_encode_cpu_s": round(time.process_time() - start_cpu, 3),
    }


def measure_variants(
    variants: dict[str, Any], sampling: Sampling, repeats: int, monitor: RssMonitor, label: str
) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]], dict[str, list[dict]]]:
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
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats(device)
            with monitor.window() as window:
                wall_times, cpu_times = sampling.run(variants[name])
            if on_cuda:
                window["cuda_peak"] = torch.cuda.max_memory_allocated(device)
            wall[name].append(wall_times)
            cpu[name].append(cpu_times)
            memory[name].append(window)
            print(
                f"  {label} {name:10s} run {repeat + 1}: wall "
                + " ".join(f"{t:.3f}" for t in wall_times)
                + " s, cpu "
                + " ".join(f"{t:.2f}" for t in cpu_times)
                + " s",
                flush=True,
            )
    return wall, cpu, memory


# --------------------------------------------------------------------------------------------------
# the machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Any, load_before: tuple[float, ...]) -> dict:
    import comfy.ldm.modules.attention as comfy_attention
    import torch

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
