"""Reading the LLaVA folder and the CLIP vision tower: the fixture files are real-format, wrong files give
named MomaErrors, safetensors shards load like the pickles, nothing in a pickle runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
from comfyui_moma.moma.clip_vision import load_clip_vision
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.llava import LlavaFolder, _load_language_model, _Steps, resolve_dtype
from comfyui_moma.moma.weights import load_adapter, save_adapter_safetensors


def _variant(tmp_path: Path, llava_dir: Path, name: str = "variant") -> Path:
    """A copy of the LLaVA folder made of symlinks, for editing single files."""
    folder = tmp_path / name
    folder.mkdir()
    for item in llava_dir.iterdir():
        (folder / item.name).symlink_to(item)
    return folder


def _replace(folder: Path, name: str) -> Path:
    path = folder / name
    path.unlink()
    return path


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    _replace(folder, "config.json").write_text(json.dumps(config))


def _load(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    return _load_language_model(LlavaFolder.open(folder), torch.float32, torch.device("cpu"), _Steps(0, None, None))


# --- the fixture files are what real users' files are, read by the libraries real files are read with


def test_fixture_llava_folder_is_in_the_original_format(llava_dir: Path) -> None:
    config = json.loads((llava_dir / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert (config["hidden_size"], config["mm_hidden_size"], config["mm_projector_type"]) == (4096, 1024, "mlp2x_gelu")
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == (-2, "patch")
    index = json.loads((llava_dir / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    keys = set()
    dtypes = set()
    for shard in sorted(llava_dir.glob("pytorch_model-*.bin")):
        state = torch.load(shard, map_location="cpu", weights_only=True)
        keys |= set(state)
        dtypes |= {t.dtype for t in state.values()}
        assert all(index["weight_map"][k] == shard.name for k in state)
    assert keys == set(index["weight_map"])
    assert "lm_head.weight" in keys and any(k.startswith("model.vision_tower.") for k in keys)
    assert dtypes == {torch.float16, torch.float32}

    sp = sentencepiece.SentencePieceProcessor(model_file=str(llava_dir / "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, config["vocab_size"])
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]  # byte fallback + dummy prefix, as LLaMA
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llava_dir))
    assert hf("photo").input_ids[0] == 1
    assert json.loads((llava_dir / "tokenizer_config.json").read_text())["legacy"] is False


def test_fixture_clip_folder_reads_with_transformers(clip_vision_dir: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    model, info = CLIPVisionModel.from_pretrained(str(clip_vision_dir), output_loading_info=True)
    assert not info["missing_keys"]
    assert (model.config.hidden_size, model.config.image_size, model.config.patch_size) == (1024, 336, 14)
    processor = CLIPImageProcessor.from_pretrained(str(clip_vision_dir))
    assert processor.crop_size["height"] == 336 and processor.size["shortest_edge"] == 336


# --- the language model loader


def test_safetensors_shards_load_like_the_pickles(tmp_path: Path, llava_dir: Path) -> None:
    from safetensors.torch import save_file

    folder = tmp_path / "safetensors"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        (folder / name).symlink_to(llava_dir / name)
    weight_map = {}
    for number, shard in enumerate(sorted(llava_dir.glob("pytorch_model-*.bin")), start=1):
        name = f"model-0000{number}-of-00002.safetensors"
        state = torch.load(shard, map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in state})
        del state
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    from_bin, from_safetensors = _load(llava_dir), _load(folder)
    for pickled, safe in zip(from_bin, from_safetensors):
        a, b = dict(pickled.named_parameters()), dict(safe.named_parameters())
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_renamed_key_is_named_missing_and_unexpected(tmp_path: Path, llava_dir: Path) -> None:
    folder = _variant(tmp_path, llava_dir)
    shard = "pytorch_model-00002-of-00002.bin"
    state = torch.load(llava_dir / shard, map_location="cpu", weights_only=True, mmap=True)
    state["model.final_norm.weight"] = state.pop("model.norm.weight")
    torch.save(state, _replace(folder, shard))
    del state
    with pytest.raises(MomaError) as error:
        _load(folder)
    message = str(error.value)
    assert "missing keys ['model.norm.weight'] (1)" in message
    assert "unexpected keys ['model.final_norm.weight'] (1)" in message and str(folder) in message


def test_llava_hf_key_names_get_a_hint(tmp_path: Path, llava_dir: Path) -> None:
    folder = _variant(tmp_path, llava_dir)
    torch.save({"language_model.model.norm.weight": torch.ones(4096)}, folder / "extra.bin")
    index = json.loads((llava_dir / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["language_model.model.norm.weight"] = "extra.bin"
    _replace(folder, "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(MomaError, match="'llava-hf' key names"):
        _load(folder)


def test_shape_mismatch_names_file_key_and_shapes(tmp_path: Path, llava_dir: Path) -> None:
    folder = _variant(tmp_path, llava_dir)
    _edit_config(folder, intermediate_size=128)
    with pytest.raises(
        MomaError,
        match=r"pytorch_model-00001-of-00002\.bin: model\.layers\.0\.mlp\.gate_proj\.weight "
        r"has shape \(64, 4096\), config\.json implies \(128, 4096\)",
    ):
        _load(folder)


def test_missing_shard_truncated_shard_and_bad_configs(tmp_path: Path, llava_dir: Path) -> None:
    folder = _variant(tmp_path, llava_dir, "missing")
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(
        MomaError, match=r"lists \['pytorch_model-00002-of-00002.bin'\], which are missing.*MoMA_llava_7b"
    ):
        LlavaFolder.open(folder)

    folder = _variant(tmp_path, llava_dir, "truncated")
    data = (llava_dir / "pytorch_model-00002-of-00002.bin").read_bytes()[:5_000_000]
    _replace(folder, "pytorch_model-00002-of-00002.bin").write_bytes(data)
    with pytest.raises(MomaError, match="pytorch_model-00002-of-00002.bin.*truncated"):
        _load(folder)

    for changes, message in [
        ({"text_config": {}, "vision_config": {}}, "llava-hf"),
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"hidden_size": 5120}, r"hidden_size=5120 \(MoMA needs 4096\)"),
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear'"),
    ]:
        folder = tmp_path / f"config-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        config = json.loads((llava_dir / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(MomaError, match=message):
            LlavaFolder.open(folder)
    with pytest.raises(MomaError, match="no config.json"):
        LlavaFolder.open(tmp_path / "nothing")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_shard_that_would_run_code_is_refused(tmp_path: Path, llava_dir: Path) -> None:
    folder = _variant(tmp_path, llava_dir)
    marker = tmp_path / "pwned"
    torch.save({"model.norm.weight": _RunsCode(marker)}, _replace(folder, "pytorch_model-00002-of-00002.bin"))
    with pytest.raises(MomaError, match="Refused to load"):
        _load(folder)
    assert not marker.exists()


def test_precision_names() -> None:
    from comfyui_moma.moma.llava import cpu_supports_bf16

    # auto on a CPU: bf16 (half fp32's memory) where this torch computes the encoder's ops in bf16.
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(MomaError, match="precision must be one of"):
        resolve_dtype("fp64", "cpu")


# --- CLIP vision


def test_clip_single_safetensors_file_equals_the_folder(clip_vision_dir: Path, tmp_path: Path) -> None:
    single = tmp_path / "clip-vit-large-patch14-336.safetensors"
    shutil.copy(clip_vision_dir / "model.safetensors", single)
    from_folder, from_file = load_clip_vision(clip_vision_dir), load_clip_vision(single)
    assert from_file.config.num_hidden_layers == 3 and from_file.config.image_size == 336
    a, b = dict(from_folder.named_parameters()), dict(from_file.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            from_file(pixel_values=pixels, output_hidden_states=True).hidden_states[-2],
            from_folder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2],
        )


def test_clip_wrong_file_is_named(tmp_path: Path, adapter_file: Path) -> None:
    wrong = save_adapter_safetensors(load_adapter(adapter_file), tmp_path / "not_clip.safetensors")
    with pytest.raises(MomaError, match="not a transformers CLIPVisionModel state dict.*clip-vit-large-patch14-336"):
        load_clip_vision(wrong)
    with pytest.raises(MomaError, match="not found"):
        load_clip_vision(tmp_path / "absent.safetensors")


def test_clip_vision_only_save_loads_too(clip_vision_dir: Path, tmp_path: Path) -> None:
    """A CLIPVisionModel saved by transformers itself (5.x writes bare 'embeddings.*' keys), folder or file."""
    from transformers import CLIPVisionModel

    CLIPVisionModel.from_pretrained(str(clip_vision_dir)).save_pretrained(str(tmp_path / "vision-only"))
    reference = dict(load_clip_vision(clip_vision_dir).named_parameters())
    for source in (tmp_path / "vision-only", tmp_path / "vision-only" / "model.safetensors"):
        loaded = dict(load_clip_vision(source).named_parameters())
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)


def test_every_parameter_and_buffer_lands_on_the_requested_device(
    llava_dir: Path, clip_vision_dir: Path, adapter_file: Path
) -> None:
    """The meta device stands in for a GPU on a CPU-only machine: nothing (RoPE frequencies, CLIP position ids,
    mapping, projector) may be left behind on the CPU."""
    from comfyui_moma.moma.llava import load_context_encoder

    encoder = load_context_encoder(
        llava_dir, clip_vision_dir, load_adapter(adapter_file), precision="bf16", device="meta"
    )
    tensors = list(encoder.named_parameters()) + list(encoder.named_buffers())
    assert [name for name, tensor in tensors if tensor.device.type != "meta"] == []
    assert {tensor.dtype for name, tensor in encoder.named_parameters()} == {torch.bfloat16}
    features = encoder.picture_features(torch.zeros(1, 3, 336, 336))  # the vision tower and projector run there
    assert features.shape == (1, 576, 4096) and features.device.type == "meta"
