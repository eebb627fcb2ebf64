"""Every name or path a workflow supplies stays inside the folders ComfyUI registered for it: MoMA Loader's
adapter / LLaVA / CLIP vision names, Load MoMA Context's context_file and path, Save MoMA Context's prefix.
Run through ComfyUI's real validator (and the nodes' own execute), with real fixture files placed *outside*
those folders as the targets an escape would reach."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import comfy_exec
import pytest
import torch
from comfyui_moma.moma.context import MomaContext, save_context
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.nodes.context import MomaLoadContext, MomaSaveContext
from comfyui_moma.nodes.loader import MomaLoader

LLAVA_NAME = "MoMA_llava_7b"
CLIP_NAME = "clip-vit-large-patch14-336"
ADAPTER_NAME = "attn_adapters_projectors.th"


@pytest.fixture(scope="module")
def placed(comfy_host, llava_dir: Path, clip_vision_dir: Path, adapter_file: Path) -> Path:
    models = comfy_host.models_dir
    comfy_exec.link(models / "moma" / ADAPTER_NAME, adapter_file)
    comfy_exec.link(models / "LLM" / LLAVA_NAME, llava_dir)
    comfy_exec.link(models / "clip_vision" / CLIP_NAME, clip_vision_dir)
    return models


def _loader_graph(adapter: str = ADAPTER_NAME, llava: str = LLAVA_NAME, clip: str = CLIP_NAME) -> dict:
    # A Save node makes the graph an output graph; validation of the loader runs before anything executes.
    return {
        "1": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": adapter,
                "llava_name": llava,
                "clip_vision_name": clip,
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        },
        "2": {"class_type": "LoadImage", "inputs": {"image": "moma_paths_ref.png"}},
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
        "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["4", 0], "filename_prefix": "moma/paths"}},
    }


def _node_messages(error: comfy_exec.WorkflowError, node: str) -> list[str]:
    return [item["details"] for item in error.node_errors[node]["errors"]]


def _refused(graph: dict, node: str) -> list[str]:
    with pytest.raises(comfy_exec.WorkflowError) as error:
        comfy_exec.run_api_workflow(graph)
    assert node in error.value.node_errors, error.value
    return _node_messages(error.value, node)


@pytest.fixture(scope="module")
def reference_picture(comfy_host) -> None:
    import folder_paths
    from PIL import Image

    Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(
        Path(folder_paths.get_input_directory()) / "moma_paths_ref.png"
    )


def _escapes(target: Path, folder: Path) -> list[str]:
    """Names that point at ``target`` (outside ``folder``): absolute, '..'-relative, and a '..' hidden mid-way."""
    relative = os.path.relpath(target, folder)
    assert relative.startswith(".."), (target, folder)
    return [str(target), relative, f"sub/../{relative}", relative.replace("/", "\\")]


@pytest.mark.parametrize("input_name", ["adapter_name", "llava_name", "clip_vision_name"])
def test_loader_refuses_paths_out_of_its_folders_naming_input_value_and_folders(
    placed, reference_picture, input_name: str, adapter_file: Path, llava_dir: Path, clip_vision_dir: Path
) -> None:
    import folder_paths

    folder_name, target = {
        "adapter_name": ("moma", adapter_file),
        "llava_name": ("LLM", llava_dir),
        "clip_vision_name": ("clip_vision", clip_vision_dir),
    }[input_name]
    folder = Path(folder_paths.get_folder_paths(folder_name)[0])
    for value in _escapes(target, folder):
        inputs = {"adapter": ADAPTER_NAME, "llava": LLAVA_NAME, "clip": CLIP_NAME}
        inputs[input_name.removesuffix("_name").replace("clip_vision", "clip")] = value
        messages = _refused(_loader_graph(**inputs), "1")
        # reported once (not under each of the Loader's inputs), naming the input it concerns
        assert len(messages) == 1, messages
        for message in messages:
            assert f"{input_name}: {value!r} is refused" in message, message
            assert str(folder) in message
            for other in {"adapter_name", "llava_name", "clip_vision_name"} - {input_name}:
                assert f"{other}:" not in message
        with pytest.raises(MomaError, match=f"^{input_name}: "):
            MomaLoader.execute(
                **{
                    "adapter_name": ADAPTER_NAME,
                    "llava_name": LLAVA_NAME,
                    "clip_vision_name": CLIP_NAME,
                    input_name: value,
                },
                precision="fp32",
                quantization="none",
                keep_llava_loaded=False,
            )


def test_a_wrong_llava_name_is_reported_as_llava_name(placed, reference_picture) -> None:
    messages = _refused(_loader_graph(llava="NotThere"), "1")
    assert len(messages) == 1 and "llava_name: LLaVA folder 'NotThere' not found in" in messages[0], messages
    assert not any("adapter_name:" in message for message in messages)
    messages = _refused(_loader_graph(clip="NotThere"), "1")
    assert len(messages) == 1 and "clip_vision_name: CLIP vision model 'NotThere' not found in" in messages[0]


def test_a_missing_adapter_is_reported_once(placed, reference_picture) -> None:
    """ComfyUI lists a text returned by validate_inputs under every input the method takes (the Loader's five);
    the Loader raises it instead, which ComfyUI reports once, on the node."""
    messages = _refused(_loader_graph(adapter="absent.th"), "1")
    assert len(messages) == 1, messages
    assert messages[0].startswith("adapter_name: MoMA adapter 'absent.th' not found in"), messages


def test_symlinks_inside_and_extra_model_paths_folders_are_fine(
    placed, tmp_path: Path, llava_dir: Path, adapter_file: Path, clip_vision_dir: Path
) -> None:
    import folder_paths

    nested = placed / "LLM" / "shared" / "llava-copy"
    comfy_exec.link(nested, llava_dir)  # a user's symlink inside models/LLM to a folder on another disk
    try:
        assert MomaLoader.validate_inputs(ADAPTER_NAME, "shared/llava-copy", CLIP_NAME) is True
        assert MomaLoader.validate_inputs(ADAPTER_NAME, "shared/../shared/llava-copy", CLIP_NAME) is True
    finally:
        shutil.rmtree(placed / "LLM" / "shared")  # other modules list models/LLM

    extra = tmp_path / "extra_models"
    comfy_exec.link(extra / "moma" / "other_adapter.th", adapter_file)
    comfy_exec.link(extra / "clip_vision" / "vision", clip_vision_dir)
    saved = {
        name: (list(folder_paths.folder_names_and_paths[name][0]), set(folder_paths.folder_names_and_paths[name][1]))
        for name in ("moma", "clip_vision")
    }
    try:
        folder_paths.add_model_folder_path("moma", str(extra / "moma"))  # what extra_model_paths.yaml does
        folder_paths.add_model_folder_path("clip_vision", str(extra / "clip_vision"))
        assert MomaLoader.validate_inputs("other_adapter.th", LLAVA_NAME, "vision") is True
        moma_model = MomaLoader.execute("other_adapter.th", LLAVA_NAME, "vision", "fp32", "none", False).result[0]
        assert moma_model.adapter_path == extra / "moma" / "other_adapter.th"
        assert moma_model.clip_vision_path == extra / "clip_vision" / "vision"
        message = comfy_exec.validation_message(MomaLoader.validate_inputs, "absent.th", LLAVA_NAME, CLIP_NAME)
        assert str(extra / "moma") in message and str(placed / "moma") in message  # every folder searched
    finally:
        for name, (paths, exts) in saved.items():
            folder_paths.folder_names_and_paths[name] = (paths, exts)
            folder_paths.filename_list_cache.pop(name, None)


def _context() -> MomaContext:
    g = torch.Generator().manual_seed(3)
    return MomaContext(
        torch.randn(1, 4, 768, generator=g),
        torch.randn(1, 4, 768, generator=g),
        torch.randn(1, 1024, generator=g),
        "vase",
        "on a table",
        "photo of a vase. on a table",
    )


def _load_graph(context_file: str, path: str) -> dict:
    return {
        "1": {"class_type": "MomaLoadContext", "inputs": {"context_file": context_file, "path": path}},
        "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["1", 0], "filename_prefix": "moma/paths"}},
    }


def test_load_context_path_and_file_stay_in_input_and_output(comfy_host, tmp_path: Path) -> None:
    import folder_paths

    input_dir, output_dir = Path(folder_paths.get_input_directory()), Path(folder_paths.get_output_directory())
    outside = save_context(_context(), tmp_path / "outside.safetensors")
    save_context(_context(), input_dir / "ctx" / "inside.safetensors")
    save_context(_context(), output_dir / "moma" / "saved.safetensors")

    for value in _escapes(outside, input_dir):
        messages = _refused(_load_graph("", value), "1")
        assert any(
            f"path: {value!r} is refused" in m and str(input_dir) in m and str(output_dir) in m for m in messages
        ), messages
        messages = _refused(_load_graph(f"{value} [output]", ""), "1")
        assert any(f"context_file: {value!r} is refused" in m and str(output_dir) in m for m in messages), messages
    messages = _refused(_load_graph("", "ctx/absent.safetensors"), "1")
    assert any("path: MoMA context file 'ctx/absent.safetensors' not found in" in m for m in messages), messages

    # inside: relative to input/ or output/, and the listed names
    for context_file, path in (
        ("", "ctx/inside.safetensors"),
        ("", "moma/saved.safetensors"),
        ("ctx/inside.safetensors [input]", ""),
        ("moma/saved.safetensors [output]", ""),
    ):
        outputs = comfy_exec.run_api_workflow(_load_graph(context_file, path))
        assert outputs["5"]["moma_context"][0]["type"] == "output"


@pytest.mark.parametrize("prefix", ["../escaped/ctx", "/tmp/moma-escaped/ctx", "moma/../../escaped", "\\tmp\\x"])
def test_save_prefix_cannot_leave_the_output_folder(comfy_host, prefix: str) -> None:
    import folder_paths

    save_context(_context(), Path(folder_paths.get_input_directory()) / "ctx" / "inside.safetensors")
    messages = _refused(
        {
            "1": {
                "class_type": "MomaLoadContext",
                "inputs": {"context_file": "ctx/inside.safetensors [input]", "path": ""},
            },
            "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["1", 0], "filename_prefix": prefix}},
        },
        "5",
    )
    assert any(
        f"filename_prefix: {prefix!r} is refused" in m and folder_paths.get_output_directory() in m for m in messages
    ), messages
    with pytest.raises(MomaError, match="^filename_prefix: "):
        MomaSaveContext.execute(_context(), prefix)
    assert not Path("/tmp/moma-escaped").exists()


def test_empty_and_odd_names(placed) -> None:
    for value in ("", " ", ".", "a\0b", "C:\\models\\x.th", "~/x.th"):
        message = comfy_exec.validation_message(MomaLoader.validate_inputs, value, LLAVA_NAME, CLIP_NAME)
        assert isinstance(message, str) and message.startswith("adapter_name: "), (value, message)
    message = comfy_exec.validation_message(MomaLoadContext.validate_inputs, "", "")
    assert message.startswith("context_file: no MoMA context file chosen")
