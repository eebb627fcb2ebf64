"""Soak: many consecutive MoMA runs through a real ComfyUI server (main.py on 127.0.0.1), varying reference, prompt
and seed, with an interrupt in the middle of some runs. Every run after an interrupt is correct, the same inputs
give the same image, and the server's RSS after warm-up grows less than 5%.

Not in the default suite: ``MOMA_SOAK=1 pytest -m soak tests/test_soak.py`` (``MOMA_SOAK_RUNS``, default 200).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import comfy_exec
import host
import numpy as np
import psutil
import pytest
from moma_runner.common import PACK_LINK_NAME
from PIL import Image

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(os.environ.get("MOMA_SOAK") != "1", reason="soak test: set MOMA_SOAK=1 (minutes)"),
]

RUNS = int(os.environ.get("MOMA_SOAK_RUNS", "200"))
INTERRUPT_EVERY = 10  # every 10th run is interrupted mid-way, then the same inputs are run again
WARM_UP = 20
REFERENCES = ("soak_a.png", "soak_b.png")
PROMPTS = ("A car in autumn with falling leaves.", "A car on a snowy street at night.", "A car on the beach.")
SEEDS = (1, 2)


def _graph(reference: str, prompt: str, seed: int, prefix: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "moma_test_sd15.safetensors"}},
        "loader": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": "attn_adapters_projectors.th",
                "llava_name": "MoMA_llava_7b",
                "clip_vision_name": "clip-vit-large-patch14-336",
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": True,
            },
        },
        "img": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": "soak_mask.png", "channel": "red"}},
        "enc": {
            "class_type": "MomaContextEncoder",
            "inputs": {
                "moma_model": ["loader", 0],
                "image": ["img", 0],
                "mask": ["mask", 0],
                "subject": "car",
                "prompt": prompt,
            },
        },
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
                "seed": seed,
                "resolution": 64,
            },
        },
        "apply": {
            "class_type": "MomaApply",
            "inputs": {
                "model": ["ckpt", 0],
                "moma_model": ["loader", 0],
                "context": ["enc", 0],
                "reference": ["grab", 0],
                "preset": "context",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": ["enc", 1], "clip": ["ckpt", 1]}},
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
                "steps": 1,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": prefix}},
    }


class Server:
    def __init__(self, base: Path, log: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        comfy_root = host.host_dir() / "ComfyUI"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(comfy_root / "main.py"),
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(base),
                "--disable-api-nodes",
                "--database-url",
                "sqlite:///:memory:",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client_id = uuid.uuid4().hex
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)

    def post(self, path: str, payload: dict | None = None) -> dict:
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else {}

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def queue(self, graph: dict) -> str:
        return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _image_digest(base: Path, entry: dict) -> str:
    (image,) = entry["outputs"]["save"]["images"]
    path = base / "output" / image["subfolder"] / image["filename"]
    return hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()


def test_soak(sd15_checkpoint: Path, adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="moma-soak-"))
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir()
    comfy_exec.link(base / "custom_nodes" / PACK_LINK_NAME, host.REPO)
    comfy_exec.link(base / "models" / "checkpoints" / sd15_checkpoint.name, sd15_checkpoint)
    comfy_exec.link(base / "models" / "moma" / adapter_file.name, adapter_file)
    comfy_exec.link(base / "models" / "LLM" / "MoMA_llava_7b", llava_dir)
    comfy_exec.link(base / "models" / "clip_vision" / "clip-vit-large-patch14-336", clip_vision_dir)
    rng = np.random.default_rng(3)
    for name in REFERENCES:
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((96, 72)).save(base / "input" / name)
    mask = np.zeros((72, 96), np.uint8)
    mask[10:62, 16:80] = 255
    Image.fromarray(mask).save(base / "input" / "soak_mask.png")

    combos = [(r, p, s) for r in REFERENCES for p in PROMPTS for s in SEEDS]
    order = random.Random(5)
    server = Server(base, base / "server.log")
    digests: dict[tuple, str] = {}
    rss: list[int] = []
    interrupts = interrupted_runs = 0
    start = time.monotonic()
    try:
        for run in range(RUNS):
            combo = combos[order.randrange(len(combos))]
            graph = _graph(*combo, prefix=f"soak/{run:03d}")
            if run % INTERRUPT_EVERY == INTERRUPT_EVERY - 1:
                prompt_id = server.queue(graph)
                time.sleep(order.uniform(0.05, 0.6))
                server.post("/interrupt")
                interrupts += 1
                entry = server.wait(prompt_id)
                interrupted_runs += entry["status"]["status_str"] == "error"
                graph = _graph(*combo, prefix=f"soak/{run:03d}-again")  # the same inputs right after
            entry = server.wait(server.queue(graph))
            assert entry["status"]["status_str"] == "success", (run, combo, entry["status"])
            digest = _image_digest(base, entry)
            assert digests.setdefault(combo, digest) == digest, f"run {run}: {combo} gave another image"
            rss.append(server.rss())
    finally:
        elapsed = time.monotonic() - start
        server.close()
    warm = rss[min(WARM_UP, len(rss) - 1)]
    growth = (max(rss[WARM_UP:] or rss) - warm) / warm
    print(
        f"\nsoak: {RUNS} runs in {elapsed:.0f} s ({elapsed / RUNS:.2f} s/run), {interrupts} interrupts "
        f"({interrupted_runs} stopped a run), {len(digests)} distinct inputs, server RSS after warm-up "
        f"{warm / 2**30:.2f} GiB, growth {growth * 100:+.1f}%"
    )
    assert len(digests) == len(combos) or RUNS < 3 * len(combos)
    assert growth < 0.05, [r / 2**30 for r in rss]
