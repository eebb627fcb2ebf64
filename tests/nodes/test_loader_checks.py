"""MoMA Loader refuses an incomplete LLaVA or CLIP vision folder at validation, before anything is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import comfy_exec
import pytest
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.model import MomaModel
from comfyui_moma.nodes.loader import MomaLoader

ADAPTER_NAME = "attn_adapters_projectors.th"
CLIP_NAME = "clip-vit-large-patch14-336"


_CREATED: list[Path] = []


@pytest.fixture(scope="module")
def placed(comfy_host, adapter_file: Path, clip_vision_dir: Path):
    """The host's models folder with the adapter and CLIP placed; the broken folders made here are removed after
    (other test modules list the same folders)."""
    import folder_paths
    from PIL import Image

    comfy_exec.link(comfy_host.models_dir / "moma" / ADAPTER_NAME, adapter_file)
    comfy_exec.link(comfy_host.models_dir / "clip_vision" / CLIP_NAME, clip_vision_dir)
    Image.new("RGB", (32, 32), (10, 200, 30)).save(Path(folder_paths.get_input_directory()) / "moma_checks_ref.png")
    yield comfy_host.models_dir
    for path in _CREATED:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(
            missing_ok=True
        )


def _incomplete(models: Path, source: Path, name: str, drop: str) -> str:
    """models/<LLM|clip_vision>/<name>: symlinks to each file of ``source`` except ``drop``."""
    folder = models / name
    folder.mkdir(parents=True, exist_ok=True)
    _CREATED.append(folder)
    for item in source.iterdir():
        link = folder / item.name
        if item.name != drop and not link.exists():
            link.symlink_to(item)
    return folder.relative_to(models).as_posix().split("/", 1)[1]


def _graph(llava: str, clip: str = CLIP_NAME) -> dict:
    return {
        "1": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": ADAPTER_NAME,
                "llava_name": llava,
                "clip_vision_name": clip,
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        },
        "2": {"class_type": "LoadImage", "inputs": {"image": "moma_checks_ref.png"}},
        "4": {
            "class_type": "MomaContextEncoder",
            "inputs": {
                "moma_model": ["1", 0],
                "image": ["2", 0],
                "mask": ["2", 1],
                "subject": "car",
                "prompt": "a car",
            },
        },
        "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["4", 0], "filename_prefix": "moma/checks"}},
    }


@pytest.mark.parametrize(
    "drop,expected",
    [
        ("tokenizer.model", r"incomplete: missing \['tokenizer.model'\]"),
        ("pytorch_model-00002-of-00002.bin", r"lists \['pytorch_model-00002-of-00002.bin'\], which are missing"),
        ("pytorch_model.bin.index.json", "No model weights"),
        ("config.json", r"not a LLaVA folder \(no config.json\)"),
    ],
)
def test_incomplete_llava_folder_fails_validation(placed, llava_dir: Path, drop: str, expected: str) -> None:
    name = _incomplete(placed, llava_dir, f"LLM/incomplete-{drop.replace('.', '-')}", drop)
    with pytest.raises(comfy_exec.WorkflowError) as error:
        comfy_exec.run_api_workflow(_graph(name))
    messages = [item["details"] for item in error.value.node_errors["1"]["errors"]]
    assert len(messages) == 1 and "llava_name: " in messages[0], messages
    import re

    assert all(re.search(expected, m) for m in messages), messages
    assert not error.value.execution_error  # refused before any node ran
    with pytest.raises(MomaError, match=expected):
        MomaModel.load(placed / "moma" / ADAPTER_NAME, placed / "LLM" / name, None)


def test_empty_shard_and_bad_index_are_named(placed, llava_dir: Path) -> None:
    name = _incomplete(placed, llava_dir, "LLM/empty-shard", "pytorch_model-00001-of-00002.bin")
    (placed / "LLM" / name / "pytorch_model-00001-of-00002.bin").write_bytes(b"")
    message = comfy_exec.validation_message(MomaLoader.validate_inputs, ADAPTER_NAME, name, CLIP_NAME)
    assert "llava_name: " in message and "empty ['pytorch_model-00001-of-00002.bin']" in message
    name = _incomplete(placed, llava_dir, "LLM/bad-index", "pytorch_model.bin.index.json")
    (placed / "LLM" / name / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": []}))
    assert "has no weight_map" in comfy_exec.validation_message(
        MomaLoader.validate_inputs, ADAPTER_NAME, name, CLIP_NAME
    )


@pytest.mark.parametrize(
    "drop,expected", [("model.safetensors", "No model weights"), ("config.json", "has no config.json")]
)
def test_incomplete_clip_vision_folder_fails_validation(
    placed, llava_dir: Path, clip_vision_dir: Path, drop: str, expected: str
) -> None:
    comfy_exec.link(placed / "LLM" / "MoMA_llava_7b", llava_dir)
    name = _incomplete(placed, clip_vision_dir, f"clip_vision/incomplete-{drop.replace('.', '-')}", drop)
    message = comfy_exec.validation_message(MomaLoader.validate_inputs, ADAPTER_NAME, "MoMA_llava_7b", name)
    assert message.startswith("clip_vision_name: ") and expected in message, message


def test_clip_single_file_that_is_not_safetensors_fails_validation(placed, llava_dir: Path) -> None:
    comfy_exec.link(placed / "LLM" / "MoMA_llava_7b", llava_dir)
    (placed / "clip_vision" / "broken.safetensors").write_bytes(b"\xff" * 64)
    _CREATED.append(placed / "clip_vision" / "broken.safetensors")
    message = comfy_exec.validation_message(
        MomaLoader.validate_inputs, ADAPTER_NAME, "MoMA_llava_7b", "broken.safetensors"
    )
    assert message.startswith("clip_vision_name: ") and "not a readable .safetensors file" in message, message
