"""Fuzz-style: every file kind the pack reads, replaced by random bytes, truncations at several offsets, other
formats and valid files of neighbouring tools, gives a MomaError naming the file (never another exception
type, never a hang, nothing in a pickle executed).

Each case goes through what the pack runs on that file: ``load_adapter`` (MoMA Loader), ``MomaModel.load``
(the LLaVA folder and tokenizer checks) then the language model's weight loading (Context Encoder),
``check_clip_vision_path`` + ``load_clip_vision``, ``load_context`` (Load MoMA Context).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import signal
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from comfyui_moma.moma.clip_vision import check_clip_vision_path, load_clip_vision
from comfyui_moma.moma.context import MomaContext, load_context, save_context
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.llava import LlavaFolder, _load_language_model, _Steps
from comfyui_moma.moma.model import MomaModel
from comfyui_moma.moma.weights import load_adapter, save_adapter_safetensors

SHARD = "pytorch_model-00001-of-00002.bin"
INDEX = "pytorch_model.bin.index.json"
CASE_SECONDS = 20  # a case taking longer counts as a hang


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@contextmanager
def _deadline(seconds: int, label: str) -> Iterator[None]:
    def expired(*_):
        raise TimeoutError(f"{label}: no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip_of_junk(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", rng.randbytes(300))
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _generic(valid: bytes, seed: int) -> Iterator[tuple[str, bytes]]:
    """Random bytes, truncations, a corrupted header and other formats, derived from one valid file."""
    rng = random.Random(seed)
    yield "empty", b""
    for size in (1, 7, 64, 4096):
        yield f"random-{size}", rng.randbytes(size)
    for cut in sorted({1, 8, 9, 64, 1000, len(valid) // 2, len(valid) - 1}):
        if 0 < cut < len(valid) and valid[cut:].strip():  # cutting a JSON file's final newline leaves it valid
            yield f"truncated-at-{cut}", valid[:cut]
    if valid[:8] and int.from_bytes(valid[:8], "little") < len(valid):  # safetensors: break the JSON header
        header = bytearray(valid)
        for position in (8, 9, 20):
            header[position] = 0xFF
        yield "corrupt-header", bytes(header)
        yield "header-length-too-big", struct.pack("<Q", 1 << 40) + valid[8:]
    yield "text", b"this is not a model\n"
    yield "json", b'{"weight_map": {"a": "b"}}'
    yield (
        "git-lfs-pointer",
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 113103551\n"),
    )
    yield "html-error-page", b"<!DOCTYPE html><html><body>404 Not Found</body></html>"
    yield "png", _png()
    yield "zip-of-junk", _zip_of_junk(rng)


def _assert_moma_error(run: Callable[[Path], object], path: Path, data: bytes, label: str, marker: Path) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    with _deadline(CASE_SECONDS, label):
        try:
            run(path)
        except MomaError as error:
            assert str(error).strip(), label
            assert path.name in str(error) or str(path.parent) in str(error), (label, str(error))
        except Exception as error:
            pytest.fail(f"{label}: {type(error).__name__} escaped instead of a MomaError: {error}")
        else:
            pytest.fail(f"{label}: accepted without an error")
    assert not marker.exists(), f"{label}: a pickle ran code"


def _variant(tmp_path: Path, source: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).symlink_to(item)
    return folder


# ---------------------------------------------------------------------------------------------- adapter


@pytest.fixture(scope="module")
def adapter_bytes(adapter_file: Path) -> bytes:
    return adapter_file.read_bytes()


def _tiny_lora() -> bytes:
    down, up = torch.zeros(4, 320), torch.zeros(320, 4)
    return _safetensors_bytes(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up,
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        },
        {"ss_network_module": "networks.lora"},
    )


def _context_bytes() -> bytes:
    context = MomaContext(
        torch.zeros(1, 4, 768), torch.zeros(1, 4, 768), torch.zeros(1, 1024), "car", "x", "photo of a car. x"
    )
    from safetensors.torch import save

    return save(
        {"cond_tokens": context.cond_tokens, "uncond_tokens": context.uncond_tokens, "llava_emb": context.llava_emb},
        metadata={
            "format": "moma-context",
            "version": "1",
            "subject": "car",
            "prompt": "x",
            "sd_prompt": "photo of a car. x",
        },
    )


def test_adapter_th(tmp_path: Path, adapter_bytes: bytes) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "attn_adapters_projectors.th"
    upstream = torch.load(io.BytesIO(adapter_bytes), weights_only=True)
    neighbours = {
        "ip-adapter": _torch_bytes(
            {"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}}
        ),
        "sd-state-dict": _torch_bytes(
            {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}
        ),
        "plain-tensor": _torch_bytes(torch.zeros(3)),
        "list-of-groups": _torch_bytes([upstream["projectors"]]),
        "group-is-a-tensor": _torch_bytes({**upstream, "projectors": torch.zeros(1)}),
        "int-weights": _torch_bytes(
            {**upstream, "llm_mapping": {k: v.long() for k, v in upstream["llm_mapping"].items()}}
        ),
        "lora-safetensors-renamed": _tiny_lora(),
        "context-renamed": _context_bytes(),
        "runs-code": _torch_bytes({"projectors": _RunsCode(marker)}),
        "runs-code-legacy": (
            lambda b: (torch.save({"x": _RunsCode(marker)}, b, _use_new_zipfile_serialization=False), b.getvalue())[1]
        )(io.BytesIO()),
    }
    for label, data in [*_generic(adapter_bytes, 1), *neighbours.items()]:
        _assert_moma_error(load_adapter, path, data, f"adapter .th {label}", marker)


def test_adapter_safetensors(tmp_path: Path, adapter_file: Path) -> None:
    marker = tmp_path / "pwned"
    valid = save_adapter_safetensors(load_adapter(adapter_file), tmp_path / "valid.safetensors").read_bytes()
    path = tmp_path / "attn_adapters_projectors.safetensors"
    neighbours = {
        "lora": _tiny_lora(),
        "context": _context_bytes(),
        "flat-key-without-group": _safetensors_bytes({"proj": torch.zeros(2)}),
        "ip-adapter-flat": _safetensors_bytes(
            {"image_proj.proj.weight": torch.zeros(2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2)}
        ),
        "torch-pickle-renamed": _torch_bytes({"a": torch.zeros(1)}),
    }
    for label, data in [*_generic(valid, 2), *neighbours.items()]:
        _assert_moma_error(load_adapter, path, data, f"adapter .safetensors {label}", marker)


# ---------------------------------------------------------------------------------------------- LLaVA folder


def _open_and_load_llava(folder: Path) -> None:
    """What MoMA Loader checks, then what the Context Encoder loads."""
    from comfyui_moma.moma.prompt import LlavaTokenizer

    llava = LlavaFolder.open(folder)
    LlavaTokenizer.from_folder(folder)  # what MomaModel.load checks after LlavaFolder.open
    _load_language_model(llava, torch.float32, torch.device("cpu"), _Steps(0, None, None))


def _llava_case(tmp_path: Path, llava_dir: Path, file_name: str) -> tuple[Path, Callable[[Path], None]]:
    folder = _variant(tmp_path, llava_dir, f"llava-{file_name.replace('.', '-')}")
    (folder / file_name).unlink()
    return folder / file_name, lambda _path: _open_and_load_llava(folder)


def test_llava_config(tmp_path: Path, llava_dir: Path) -> None:
    marker = tmp_path / "pwned"
    path, run = _llava_case(tmp_path, llava_dir, "config.json")
    valid = json.loads((llava_dir / "config.json").read_text())
    neighbours = {
        "llava-hf": {"model_type": "llava", "text_config": {"model_type": "llama"}, "vision_config": {}},
        "plain-llama": {**valid, "model_type": "llama"},
        "clip-config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336},
        "list": [valid],
        "sizes-as-strings": {**valid, "num_hidden_layers": "2"},
        "negative-layers": {**valid, "num_hidden_layers": -1},
        "huge-layers": {**valid, "num_hidden_layers": 10**9},
        "float-heads": {**valid, "num_attention_heads": 32.5},
        "heads-not-dividing": {**valid, "num_attention_heads": 3},
        "bad-rope-scaling": {**valid, "rope_scaling": {"type": "nonsense", "factor": "x"}},
        "bad-eps": {**valid, "rms_norm_eps": "small"},
        "unknown-activation": {**valid, "hidden_act": "not_an_activation"},
        "fewer-layers-than-shards": {**valid, "num_hidden_layers": 1},
        "bigger-vocab": {**valid, "vocab_size": 32000},
    }
    cases = [*_generic(json.dumps(valid).encode(), 3), *((k, json.dumps(v).encode()) for k, v in neighbours.items())]
    for label, data in cases:
        _assert_moma_error(run, path, data, f"LLaVA config.json {label}", marker)


def test_llava_index(tmp_path: Path, llava_dir: Path) -> None:
    marker = tmp_path / "pwned"
    path, run = _llava_case(tmp_path, llava_dir, INDEX)
    valid = json.loads((llava_dir / INDEX).read_text())
    weight_map = valid["weight_map"]
    neighbours = {
        "no-weight-map": {"metadata": {}},
        "weight-map-list": {"weight_map": list(weight_map)},
        "file-not-a-string": {"weight_map": {key: 3 for key in weight_map}},
        "escapes-the-folder": {"weight_map": {key: "../../../etc/passwd" for key in weight_map}},
        "absolute-file": {"weight_map": {key: "/etc/passwd" for key in weight_map}},
        "missing-shard": {"weight_map": {key: "pytorch_model-00003-of-00003.bin" for key in weight_map}},
        "safetensors-index-of-clip": {"weight_map": {"vision_model.embeddings.class_embedding": "model.safetensors"}},
    }
    cases = [*_generic(json.dumps(valid).encode(), 4), *((k, json.dumps(v).encode()) for k, v in neighbours.items())]
    for label, data in cases:
        _assert_moma_error(run, path, data, f"LLaVA index {label}", marker)


def test_llava_shard(tmp_path: Path, llava_dir: Path) -> None:
    marker = tmp_path / "pwned"
    path, run = _llava_case(tmp_path, llava_dir, SHARD)
    valid = (llava_dir / SHARD).read_bytes()
    state = torch.load(io.BytesIO(valid), weights_only=True)
    first = next(iter(state))
    neighbours = {
        "runs-code": _torch_bytes({first: _RunsCode(marker)}),
        "not-a-dict": _torch_bytes([state[first]]),
        "llava-hf-keys": _torch_bytes({"language_model." + key: value for key, value in list(state.items())[:3]}),
        "wrong-shape": _torch_bytes({**state, first: torch.zeros(3, 3)}),
        "safetensors-renamed": _safetensors_bytes({first: state[first].clone()}),
        "adapter-file": _torch_bytes({"projectors": {"proj.weight": torch.zeros(2)}}),
    }
    del state
    for label, data in [*_generic(valid, 5), *neighbours.items()]:
        _assert_moma_error(run, path, data, f"LLaVA shard {label}", marker)


def test_llava_tokenizer(tmp_path: Path, llava_dir: Path) -> None:
    marker = tmp_path / "pwned"
    path, run = _llava_case(tmp_path, llava_dir, "tokenizer.model")
    valid = (llava_dir / "tokenizer.model").read_bytes()
    neighbours = {
        "tokenizer-json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}).encode(),
        "adapter-pickle": _torch_bytes({"a": torch.zeros(1)}),
    }
    for label, data in [*_generic(valid, 6), *neighbours.items()]:
        _assert_moma_error(run, path, data, f"tokenizer.model {label}", marker)


def test_moma_model_load_checks_the_tokenizer(tmp_path: Path, llava_dir: Path, adapter_file: Path) -> None:
    """The loader itself (not only the encoder) reads tokenizer.model, so a broken one fails before LLaVA loads."""
    folder = _variant(tmp_path, llava_dir, "llava-bad-tokenizer")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x0a\x05junk" * 50)
    with pytest.raises(MomaError, match="tokenizer.model"):
        MomaModel.load(adapter_file, folder, None)


# ---------------------------------------------------------------------------------------------- CLIP vision


def _load_clip(path: Path) -> None:
    check_clip_vision_path(path)
    load_clip_vision(path)


def test_clip_vision_folder(tmp_path: Path, clip_vision_dir: Path, llava_dir: Path) -> None:
    marker = tmp_path / "pwned"
    folder = _variant(tmp_path, clip_vision_dir, "clip-weights")
    (folder / "model.safetensors").unlink()
    valid = (clip_vision_dir / "model.safetensors").read_bytes()
    run = lambda _path: _load_clip(folder)  # noqa: E731
    neighbours = {
        "lora": _tiny_lora(),
        "context": _context_bytes(),
        "llava-shard-renamed": _torch_bytes({"a": torch.zeros(1)}),
    }
    for label, data in [*_generic(valid, 7), *neighbours.items()]:
        _assert_moma_error(run, folder / "model.safetensors", data, f"CLIP model.safetensors {label}", marker)

    folder = _variant(tmp_path, clip_vision_dir, "clip-config")
    (folder / "config.json").unlink()
    run = lambda _path: _load_clip(folder)  # noqa: E731
    config = json.loads((clip_vision_dir / "config.json").read_text())
    neighbours = {
        "llava-config": (llava_dir / "config.json").read_bytes(),
        "narrower": json.dumps(
            {**config, "vision_config": {**config.get("vision_config", {}), "hidden_size": 768}, "hidden_size": 768}
        ).encode(),
        "list": b"[1, 2]",
    }
    for label, data in [*_generic((clip_vision_dir / "config.json").read_bytes(), 8), *neighbours.items()]:
        _assert_moma_error(run, folder / "config.json", data, f"CLIP config.json {label}", marker)


def test_clip_vision_single_file(tmp_path: Path, clip_vision_dir: Path) -> None:
    marker = tmp_path / "pwned"
    valid = (clip_vision_dir / "model.safetensors").read_bytes()
    neighbours = {
        "lora": _tiny_lora(),
        "context": _context_bytes(),
        "text-tower-only": _safetensors_bytes({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}),
    }
    for label, data in [*_generic(valid, 9), *neighbours.items()]:
        _assert_moma_error(_load_clip, tmp_path / "clip_vision.safetensors", data, f"CLIP single file {label}", marker)


# ---------------------------------------------------------------------------------------------- saved context


def test_saved_context(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    valid = save_context(
        MomaContext(
            torch.randn(1, 4, 768), torch.randn(1, 4, 768), torch.randn(1, 1024), "car", "x", "photo of a car. x"
        ),
        tmp_path / "valid.safetensors",
    ).read_bytes()
    meta = {"format": "moma-context", "version": "1", "subject": "car", "prompt": "x", "sd_prompt": "photo of a car. x"}
    good = {
        "cond_tokens": torch.zeros(1, 4, 768),
        "uncond_tokens": torch.zeros(1, 4, 768),
        "llava_emb": torch.zeros(1, 1024),
    }
    neighbours = {
        "comfy-latent": _safetensors_bytes({"latent_tensor": torch.zeros(1, 4, 8, 8)}, {"format": "pt"}),
        "lora": _tiny_lora(),
        "adapter-pickle": _torch_bytes({"projectors": {}}),
        "no-format": _safetensors_bytes(good, {k: v for k, v in meta.items() if k != "format"}),
        "no-metadata": _safetensors_bytes(good),
        "wrong-shape": _safetensors_bytes({**good, "llava_emb": torch.zeros(1, 4096)}, meta),
        "int-tokens": _safetensors_bytes({**good, "cond_tokens": torch.zeros(1, 4, 768, dtype=torch.int32)}, meta),
        "missing-text": _safetensors_bytes(good, {k: v for k, v in meta.items() if k != "sd_prompt"}),
        "extra-tensor": _safetensors_bytes({**good, "extra": torch.zeros(1)}, meta),
    }
    for label, data in [*_generic(valid, 10), *neighbours.items()]:
        _assert_moma_error(load_context, tmp_path / "context.safetensors", data, f"context {label}", marker)


# ---------------------------------------------------------------------------------------------- values
# Valid files whose numbers are not: NaN, infinities, or finite but absurd (1e30, beyond float16's 65504, which the
# pack may compute in). Each tensor is checked once as it loads; the error names the file and the tensor.

BAD_VALUES = {
    "nan": (math.nan, "contains NaN"),
    "inf": (math.inf, "contains an infinite value"),
    "-inf": (-math.inf, "contains an infinite value"),
    "absurd": (1e30, r"reaches 1e\+30, beyond the plausible 65504"),
}


def _poisoned(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of ``tensor`` with one entry set to ``value`` (float32 where float16 cannot hold it)."""
    bad = tensor.clone().float() if abs(value) > 65504 and math.isfinite(value) else tensor.clone()
    bad.view(-1)[bad.numel() // 2] = value
    return bad


def _assert_names_tensor(
    run: Callable[[Path], object], path: Path, data: bytes, key: str, expected: str, label: str
) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    with _deadline(CASE_SECONDS, label):
        with pytest.raises(MomaError) as error:
            run(path)
    message = str(error.value)
    assert path.name in message and f"tensor {key!r}" in message, (label, message)
    assert re.search(expected, message), (label, message)


@pytest.mark.parametrize("label", BAD_VALUES)
def test_adapter_values(tmp_path: Path, adapter_bytes: bytes, label: str) -> None:
    value, expected = BAD_VALUES[label]
    upstream = torch.load(io.BytesIO(adapter_bytes), weights_only=True)
    group, key = {
        "nan": ("projectors", "norm.weight"),
        "inf": ("self_cross_attentions", "3.to_v_ip.weight"),
        "-inf": ("llm_mapping", "mapping.down_proj.weight"),
        "absurd": ("self_cross_attentions", "0.scale_learnable"),
    }[label]
    upstream[group][key] = _poisoned(upstream[group][key], value)
    _assert_names_tensor(
        load_adapter,
        tmp_path / "attn_adapters_projectors.th",
        _torch_bytes(upstream),
        f"{group}.{key}",
        expected,
        f"adapter .th {label}",
    )
    flat = {f"{name}.{inner}": tensor for name, tensors in upstream.items() for inner, tensor in tensors.items()}
    _assert_names_tensor(
        load_adapter,
        tmp_path / "attn_adapters_projectors.safetensors",
        _safetensors_bytes(flat),
        f"{group}.{key}",
        expected,
        f"adapter .safetensors {label}",
    )


@pytest.mark.parametrize("label", ["nan", "absurd"])
def test_llava_shard_values(tmp_path: Path, llava_dir: Path, label: str) -> None:
    value, expected = BAD_VALUES[label]
    path, run = _llava_case(tmp_path, llava_dir, SHARD)
    state = torch.load(llava_dir / SHARD, weights_only=True)
    key = next(key for key in state if ".layers.0.mlp.down_proj" in key)
    state[key] = _poisoned(state[key], value)
    _assert_names_tensor(run, path, _torch_bytes(state), key, expected, f"LLaVA shard {label}")


@pytest.mark.parametrize("label", ["inf", "absurd"])
def test_clip_vision_values(tmp_path: Path, clip_vision_dir: Path, label: str) -> None:
    from safetensors.torch import load_file

    value, expected = BAD_VALUES[label]
    state = load_file(clip_vision_dir / "model.safetensors")
    key = next(key for key in state if key.endswith("encoder.layers.0.self_attn.k_proj.weight") and "text" not in key)
    state[key] = _poisoned(state[key], value)
    relative = "vision_model." + key.split("vision_model.", 1)[-1]
    folder = _variant(tmp_path, clip_vision_dir, "clip-values")
    (folder / "model.safetensors").unlink()
    _assert_names_tensor(
        _load_clip_folder_of,
        folder / "model.safetensors",
        _safetensors_bytes(state),
        relative,
        expected,
        f"CLIP folder {label}",
    )
    _assert_names_tensor(
        _load_clip,
        tmp_path / "clip_vision.safetensors",
        _safetensors_bytes(state),
        relative,
        expected,
        f"CLIP single file {label}",
    )


def _load_clip_folder_of(path: Path) -> None:
    _load_clip(path.parent)


@pytest.mark.parametrize("label", BAD_VALUES)
def test_saved_context_values(tmp_path: Path, label: str) -> None:
    value, expected = BAD_VALUES[label]
    meta = {"format": "moma-context", "version": "1", "subject": "car", "prompt": "x", "sd_prompt": "photo of a car. x"}
    good = {
        "cond_tokens": torch.randn(1, 4, 768),
        "uncond_tokens": torch.randn(1, 4, 768),
        "llava_emb": torch.randn(1, 1024),
    }
    key = {"nan": "cond_tokens", "inf": "uncond_tokens", "-inf": "llava_emb", "absurd": "cond_tokens"}[label]
    data = _safetensors_bytes({**good, key: _poisoned(good[key], value)}, meta)
    _assert_names_tensor(load_context, tmp_path / "context.safetensors", data, key, expected, f"context {label}")


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("subject", "", "the saved subject is empty"),
        ("subject", "  ", "the saved subject is empty"),
        ("subject", "car " * 100_000, r"the saved subject: 'car car .*\(400,000 characters\) is longer than the 256"),
        ("sd_prompt", "x" * 1_000_000, r"the saved sd_prompt: 'xxx.*is longer than the 32,768 characters"),
    ],
)
def test_saved_context_texts(tmp_path: Path, field: str, value: str, expected: str) -> None:
    meta = {"format": "moma-context", "version": "1", "subject": "car", "prompt": "x", "sd_prompt": "photo of a car. x"}
    good = {
        "cond_tokens": torch.randn(1, 4, 768),
        "uncond_tokens": torch.randn(1, 4, 768),
        "llava_emb": torch.randn(1, 1024),
    }
    path = tmp_path / "context.safetensors"
    path.write_bytes(_safetensors_bytes(good, {**meta, field: value}))
    with _deadline(CASE_SECONDS, f"context {field}"), pytest.raises(MomaError) as error:
        load_context(path)
    assert str(path) in str(error.value) and re.search(expected, str(error.value)), str(error.value)[:500]
    assert len(str(error.value)) < 1000
