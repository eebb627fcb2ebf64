"""Layer streaming (moma/streaming.py) on the fixture files: the streamed encoder gives the resident encoder's
tokens exactly, and really moves each layer's weights in before it runs and out after (CPU -> CPU copies here;
the same code copies to CUDA on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import comfyui_moma
import numpy as np
import pytest
import torch
from comfyui_moma.moma.model import MomaModel, encode_context
from comfyui_moma.moma.streaming import resolve_placement, streamed_layers
from PIL import Image

SUBJECT, PROMPT = "duck toy", "A duck toy in the rain."
PACK_MODULE = comfyui_moma.__name__  # the name ComfyUI imported the pack under (from its folder's path)
DEVICE = os.environ.get(
    "MOMA_TEST_DEVICE", "cpu"
)  # cpu (CI: cpu -> cpu copies), or cuda with MOMA_TEST_DEVICE=cuda (pinned, side stream)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(3)
    rgb = np.asarray(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((320, 240)))
    mask = np.zeros((240, 320), np.float32)
    mask[40:200, 60:260] = 1.0
    return torch.from_numpy(rgb / 255.0).float(), torch.from_numpy(mask)


def _encode(moma_model: MomaModel, encoder, **kwargs):
    picture, mask = _inputs()
    return encode_context(encoder, moma_model, picture, mask, SUBJECT, PROMPT, **kwargs)


def _our_hooks(module: torch.nn.Module) -> list:
    """Hooks the streamer (or the encoder's progress bookkeeping) left on ``module``; transformers' own
    output-capturing hooks stay installed by design."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return [hook for hook in hooks if getattr(hook, "__module__", "").startswith(PACK_MODULE + ".")]


def _storages(module: torch.nn.Module) -> dict[str, int]:
    return {name: tensor.data_ptr() for name, tensor in [*module.named_parameters(), *module.named_buffers()]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_streamed_tokens_equal_the_resident_encoders(
    adapter_file: Path, llava_dir: Path, clip_vision_dir: Path, precision: str
) -> None:
    moma_model = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision=precision)
    resident = _encode(moma_model, moma_model.load_encoder(DEVICE, placement="gpu"))
    encoder = moma_model.load_encoder(DEVICE, placement="stream", pin=DEVICE == "cuda")
    streamer = encoder.streamer
    assert streamer is not None and encoder.language_model.embed_tokens.weight.device.type == "cpu"
    layers = streamed_layers(encoder.vision_tower) + list(encoder.language_model.layers)
    assert len(layers) == 3 + 2  # the fixture's CLIP and decoder layers
    host = {index: _storages(layer) for index, layer in enumerate(layers)}
    host_resident = _storages(encoder.language_model.embed_tokens) | _storages(encoder.mm_projector)

    seen: dict[int, dict[str, int]] = {}
    watchers = [
        layer.register_forward_hook(lambda module, *_, index=index: seen.__setitem__(index, _storages(module)))
        for index, layer in enumerate(layers)
    ]  # registered first: runs before the streamer drops the layer
    try:
        progress: list[tuple[int, int]] = []
        streamed = _encode(moma_model, encoder, progress=lambda done, total: progress.append((done, total)))
    finally:
        for watcher in watchers:
            watcher.remove()

    for name in ("cond_tokens", "uncond_tokens", "llava_emb"):
        assert torch.equal(getattr(streamed, name), getattr(resident, name)), name
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # Each layer computed with copies of its weights, not the host tensors, and at most two were in at once ...
    assert sorted(seen) == list(range(len(layers)))
    for index in seen:
        assert seen[index].keys() == host[index].keys()
        assert all(seen[index][name] != host[index][name] for name in host[index]), index
    assert streamer.layers_fetched == len(layers) and 1 <= streamer.max_layers_on_device <= 2
    # ... and afterwards every weight is the host tensor again, with no hook left behind.
    for index, layer in enumerate(layers):
        assert _storages(layer) == host[index]
        assert not _our_hooks(layer)
    assert _storages(encoder.language_model.embed_tokens) | _storages(encoder.mm_projector) == host_resident

    again = _encode(moma_model, encoder)  # a kept streamed encoder can encode again
    assert torch.equal(again.cond_tokens, resident.cond_tokens)


def test_interrupted_streaming_puts_every_weight_back(
    adapter_file: Path, llava_dir: Path, clip_vision_dir: Path
) -> None:
    moma_model = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32", placement="stream")
    encoder = moma_model.load_encoder(DEVICE)
    assert encoder.streamer is not None
    before = _storages(encoder)

    class Interrupted(Exception):
        pass

    checks: list[int] = []

    def interrupt() -> None:
        checks.append(1)
        if len(checks) == 3:  # 1: before the vision tower, 2: before decoder layer 0, 3: before layer 1
            raise Interrupted

    with pytest.raises(Interrupted):
        _encode(moma_model, encoder, interrupt=interrupt)
    assert _storages(encoder) == before
    assert not [m for m in encoder.modules() if _our_hooks(m)]


def test_placement_choice() -> None:
    gb = 1 << 30
    assert resolve_placement("auto", "cuda", 14 * gb, 20 * gb) == "gpu"
    assert resolve_placement("auto", "cuda", 14 * gb, 6 * gb) == "stream"
    assert resolve_placement("auto", "cpu", 14 * gb, 1 * gb) == "cpu"
    assert resolve_placement("gpu", "cpu") == "cpu" and resolve_placement("stream", "cpu") == "stream"
    assert resolve_placement("auto", "mps", 14 * gb, 1 * gb) == "gpu"
