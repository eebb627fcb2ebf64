"""Conversion of the pickled downloads to safetensors (moma/convert.py): the converted adapter and LLaVA folder
load in preference to the pickles and give the same context tokens; a damaged write is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_moma.moma.checkpoint import weight_files
from comfyui_moma.moma.convert import convert_folder, main, verify_shard
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.llava import LlavaFolder
from comfyui_moma.moma.model import MomaModel, encode_context


def _copy_of(llava_dir: Path, adapter_file: Path, root: Path) -> tuple[Path, Path]:
    """The fixture folder as symlinks (the pickles are only read) and the adapter, in a folder of their own."""
    folder = root / "MoMA_llava_7b"
    folder.mkdir(parents=True)
    for item in llava_dir.iterdir():
        (folder / item.name).symlink_to(item)
    (root / "moma").mkdir()
    adapter = root / "moma" / adapter_file.name
    adapter.symlink_to(adapter_file)
    return folder, adapter


def _context(moma_model: MomaModel):
    rng = np.random.default_rng(8)
    picture = torch.from_numpy(rng.random((200, 260, 3), dtype=np.float32))
    mask = torch.zeros(200, 260)
    mask[30:170, 40:220] = 1
    return encode_context(
        moma_model.load_encoder("cpu"), moma_model, picture, mask, "robot toy", "A robot toy in outer space."
    )


def test_converted_files_are_preferred_and_give_the_same_tokens(
    tmp_path: Path, llava_dir: Path, adapter_file: Path, clip_vision_dir: Path
) -> None:
    folder, adapter = _copy_of(llava_dir, adapter_file, tmp_path)
    assert main([str(adapter), str(folder)]) == 0  # the CLI (python -m moma.convert)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert not list(tmp_path.rglob("*.partial*"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    pickled_index = json.loads((llava_dir / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"]) == set(pickled_index["weight_map"])  # every key, lm_head and tower keys too
    assert index["metadata"]["total_size"] == pickled_index["metadata"]["total_size"]
    assert [p.suffix for p in weight_files(folder, "")] == [".safetensors"] * 2  # preferred over the .bin next to it
    assert LlavaFolder.open(folder).weight_files == [
        folder / "model-00001-of-00002.safetensors",
        folder / "model-00002-of-00002.safetensors",
    ]

    converted = MomaModel.load(adapter, folder, clip_vision_dir, precision="fp32")
    assert converted.adapter_path == adapter.with_suffix(".safetensors")
    pickled = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32")
    assert pickled.adapter_path.suffix == ".th"
    a, b = _context(converted), _context(pickled)
    for name in ("cond_tokens", "uncond_tokens", "llava_emb"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name

    assert main([str(adapter), str(folder)]) == 0  # converting again skips what is converted


def test_a_damaged_conversion_is_refused(tmp_path: Path, llava_dir: Path) -> None:
    source = llava_dir / "pytorch_model-00002-of-00002.bin"
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "pytorch_model.bin").symlink_to(source)
    convert_folder(folder)
    written = folder / "model-00001-of-00001.safetensors"
    verify_shard(source, written)
    damaged = tmp_path / "damaged.safetensors"
    data = bytearray(written.read_bytes())
    data[-100] ^= 0xFF  # a bit of the last tensor's data
    damaged.write_bytes(bytes(data))
    with pytest.raises(MomaError, match="Conversion check failed.*differs from its source"):
        verify_shard(source, damaged)
    damaged.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(MomaError, match="cannot be read back"):
        verify_shard(source, damaged)


def test_tied_tensors_convert(tmp_path: Path) -> None:
    """Checkpoints with shared storage (tied embeddings) are written as separate tensors, equal to the source."""
    folder = tmp_path / "tied"
    folder.mkdir()
    table = torch.randn(16, 8)
    torch.save(
        {"model.embed_tokens.weight": table, "lm_head.weight": table, "half": table[:8]}, folder / "pytorch_model.bin"
    )
    index = convert_folder(folder)
    assert json.loads(index.read_text())["weight_map"] == {
        key: "model-00001-of-00001.safetensors" for key in ("half", "lm_head.weight", "model.embed_tokens.weight")
    }
    shutil.rmtree(folder)
