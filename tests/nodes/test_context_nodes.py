"""MoMA Loader, LLaVA Context Encoder and Save/Load MoMA Context in API-format graphs through ComfyUI's
real validator and executor, with the fixture files placed in the host's model folders."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import re
import shutil
import time
import uuid
from pathlib import Path

import comfy_exec
import numpy as np
import psutil
import pytest
import torch
from comfyui_moma.moma.context import load_context
from comfyui_moma.moma.model import MomaModel
from comfyui_moma.nodes.context import reference_views
from comfyui_moma.nodes.loader import MomaLoader
from llava_reference import expected_context
from PIL import Image

LLAVA_NAME = "MoMA_llava_7b"
CLIP_NAME = "clip-vit-large-patch14-336"
ADAPTER_NAME = "attn_adapters_projectors.th"
SUBJECT, PROMPT = "car", "A car in autumn with falling leaves."


@pytest.fixture(scope="module")
def placed(comfy_host, llava_dir: Path, clip_vision_dir: Path, adapter_file: Path) -> dict[str, Path]:
    """The fixtures linked into models/moma, models/LLM and models/clip_vision; a reference in input/."""
    import folder_paths

    models = comfy_host.models_dir
    comfy_exec.link(models / "moma" / ADAPTER_NAME, adapter_file)
    comfy_exec.link(models / "LLM" / LLAVA_NAME, llava_dir)
    comfy_exec.link(models / "clip_vision" / CLIP_NAME, clip_vision_dir)
    input_dir = Path(folder_paths.get_input_directory())
    rng = np.random.default_rng(5)
    picture = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300)))
    mask = np.zeros((300, 400), np.uint8)
    mask[60:240, 90:330] = 255
    Image.fromarray(picture).save(input_dir / "moma_ref.png")
    Image.fromarray(mask).save(input_dir / "moma_ref_mask.png")
    # a second view of the same size (ImageBatch would resize another size), with its own mask
    side = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300)))
    side_mask = np.zeros((300, 400), np.uint8)
    side_mask[30:270, 40:220] = 255
    Image.fromarray(side).save(input_dir / "moma_ref_side.png")
    Image.fromarray(side_mask).save(input_dir / "moma_ref_side_mask.png")
    return {
        "picture": input_dir / "moma_ref.png",
        "mask": input_dir / "moma_ref_mask.png",
        "side": input_dir / "moma_ref_side.png",
        "side_mask": input_dir / "moma_ref_side_mask.png",
    }


def _graph(prompt: str = PROMPT, keep: bool = False, prefix: str = "moma/test", adapter: str = ADAPTER_NAME) -> dict:
    return {
        "1": {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": adapter,
                "llava_name": LLAVA_NAME,
                "clip_vision_name": CLIP_NAME,
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": keep,
            },
        },
        "2": {"class_type": "LoadImage", "inputs": {"image": "moma_ref.png"}},
        "3": {"class_type": "LoadImageMask", "inputs": {"image": "moma_ref_mask.png", "channel": "red"}},
        "4": {
            "class_type": "MomaContextEncoder",
            "inputs": {
                "moma_model": ["1", 0],
                "image": ["2", 0],
                "mask": ["3", 0],
                "subject": SUBJECT,
                "prompt": prompt,
            },
        },
        "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["4", 0], "filename_prefix": prefix}},
    }


def _run(executor, graph: dict) -> tuple[dict, list]:
    """One prompt through a persistent executor (as ComfyUI's queue does); returns (ui outputs, status messages)."""
    import execution

    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
    assert valid, (error, node_errors)
    executor.execute(graph, prompt_id, extra_data={}, execute_outputs=outputs)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    return executor.history_result["outputs"], list(executor.status_messages)


def _saved(outputs: dict) -> Path:
    import folder_paths

    entry = outputs["5"]["moma_context"][0]
    return Path(folder_paths.get_output_directory()) / entry["subfolder"] / entry["filename"]


def _rss() -> int:
    """Resident memory after a collection, with glibc's free heap pages handed back (memory freed to the
    allocator is reusable by sampling; only memory still referenced counts)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def test_loader_lists_the_placed_files(placed) -> None:
    inputs = MomaLoader.INPUT_TYPES()["required"]
    assert ADAPTER_NAME in inputs["adapter_name"][1]["options"]
    assert inputs["llava_name"][1]["options"] == [LLAVA_NAME, "none"]  # the real folder first: the default
    assert CLIP_NAME in inputs["clip_vision_name"][1]["options"]
    assert inputs["clip_vision_name"][1]["options"][-1] == "none"
    assert not any(name.startswith(CLIP_NAME + "/") for name in inputs["clip_vision_name"][1]["options"])


def test_missing_file_fails_validation_with_where_to_get_it(placed) -> None:
    with pytest.raises(comfy_exec.WorkflowError) as error:
        comfy_exec.run_api_workflow(_graph(adapter="absent.th"))
    message = str(error.value)
    assert "absent.th" in message and "models/moma" in message and "KunpengSong/MoMA_llava_7b" in message


def test_graph_context_equals_direct_encode_is_cached_and_frees_llava(
    placed, adapter_file: Path, llava_dir: Path, clip_vision_dir: Path
) -> None:
    import execution
    import transformers.models.clip.modeling_clip
    import transformers.models.llama.modeling_llama  # noqa: F401

    executor = execution.PromptExecutor(
        comfy_exec.NullServer(),
        cache_type=execution.CacheType.CLASSIC,
        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0},
    )
    rss_before = _rss()
    outputs, _ = _run(executor, _graph())
    rss_after = _rss()
    from_graph = load_context(_saved(outputs))

    # The independent re-derivation (tests/llava_reference.py) on the same 8-bit files LoadImage read.
    encoder_bytes = sum(
        tensor.numel() * 4
        for file in llava_dir.glob("pytorch_model-*.bin")  # fp32 LLaVA
        for tensor in torch.load(file, map_location="cpu", weights_only=True, mmap=True).values()
    )
    expected = expected_context(
        llava_dir,
        clip_vision_dir,
        adapter_file,
        np.asarray(Image.open(placed["picture"]).convert("RGB")),
        np.asarray(Image.open(placed["mask"]).convert("L")),
        SUBJECT,
        PROMPT,
    )
    for name, key in (("cond_tokens", "cond"), ("uncond_tokens", "uncond"), ("llava_emb", "llava_emb")):
        torch.testing.assert_close(getattr(from_graph, name), expected[key], rtol=1e-4, atol=1e-4)
    assert from_graph.sd_prompt == "photo of a car. A car in autumn with falling leaves."
    assert (from_graph.subject, from_graph.prompt) == (SUBJECT, PROMPT)

    # LLaVA is not kept: the process holds far less than the encoder's weights after the run.
    assert rss_after - rss_before < encoder_bytes // 2, (rss_after - rss_before, encoder_bytes)

    # Same inputs again, only the save prefix changed: ComfyUI's cache answers, LLaVA does not run again.
    outputs, messages = _run(executor, _graph(prefix="moma/again"))
    cached = next(data["nodes"] for event, data in messages if event == "execution_cached")
    assert {"1", "2", "3", "4"} <= set(cached)
    again = load_context(_saved(outputs))
    assert torch.equal(again.cond_tokens, from_graph.cond_tokens)
    del executor
    gc.collect()


def test_keep_llava_loaded_hands_it_to_comfy_model_management(placed) -> None:
    import comfy.model_management
    import execution
    from comfyui_moma.moma.llava import LlavaContextEncoder

    def resident() -> list:
        return [
            loaded.model
            for loaded in comfy.model_management.current_loaded_models
            if isinstance(loaded.model.model, LlavaContextEncoder)
        ]

    executor = execution.PromptExecutor(
        comfy_exec.NullServer(),
        cache_type=execution.CacheType.CLASSIC,
        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0},
    )
    try:
        first, _ = _run(executor, _graph(keep=True, prefix="moma/keep"))
        held = resident()
        assert len(held) == 1
        second, messages = _run(
            executor, _graph(prompt="A car on a snowy street at night.", keep=True, prefix="moma/keep")
        )
        assert "4" not in next(data["nodes"] for event, data in messages if event == "execution_cached")
        assert resident() == held  # the same patcher: LLaVA was not loaded a second time
        a, b = load_context(_saved(first)), load_context(_saved(second))
        assert not torch.equal(a.cond_tokens, b.cond_tokens) and torch.equal(a.uncond_tokens, b.uncond_tokens)
        # Back to the first prompt: ComfyUI's cache now holds the second one, so the node runs, but the
        # MOMA_MODEL remembers the first context and LLaVA (seconds per encode here) is not run.
        start = time.perf_counter()
        third, messages = _run(executor, _graph(keep=True, prefix="moma/keep"))
        assert "4" not in next(data["nodes"] for event, data in messages if event == "execution_cached")
        assert time.perf_counter() - start < 2.0
        assert torch.equal(load_context(_saved(third)).cond_tokens, a.cond_tokens)
    finally:
        comfy.model_management.unload_all_models()
        del executor
        gc.collect()
    assert resident() == []


def test_save_and_load_context_nodes_round_trip(placed, tmp_path: Path) -> None:
    import folder_paths
    from comfyui_moma.moma.context import MomaContext, save_context
    from comfyui_moma.nodes.context import MomaLoadContext

    g = torch.Generator().manual_seed(9)
    original = MomaContext(
        torch.randn(1, 4, 768, generator=g),
        torch.randn(1, 4, 768, generator=g),
        torch.randn(1, 1024, generator=g),
        "vase",
        "on a table",
        "photo of a vase. on a table",
    )
    save_context(original, Path(folder_paths.get_input_directory()) / "contexts" / "vase.safetensors")
    assert (
        "contexts/vase.safetensors [input]" in MomaLoadContext.INPUT_TYPES()["required"]["context_file"][1]["options"]
    )
    graph = {
        "1": {
            "class_type": "MomaLoadContext",
            "inputs": {"context_file": "contexts/vase.safetensors [input]", "path": ""},
        },
        "5": {"class_type": "MomaSaveContext", "inputs": {"context": ["1", 0], "filename_prefix": "moma/roundtrip"}},
    }
    copy = load_context(_saved(comfy_exec.run_api_workflow(graph)))
    for name in ("cond_tokens", "uncond_tokens", "llava_emb", "subject", "prompt", "sd_prompt"):
        value, expected = getattr(copy, name), getattr(original, name)
        assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected

    save_context(original, Path(folder_paths.get_output_directory()) / "elsewhere" / "ctx.safetensors")
    graph["1"]["inputs"] = {"context_file": "", "path": "elsewhere/ctx.safetensors"}  # relative to output/
    assert load_context(_saved(comfy_exec.run_api_workflow(graph))).subject == "vase"
    graph["1"]["inputs"] = {"context_file": "", "path": "elsewhere/absent.safetensors"}
    with pytest.raises(comfy_exec.WorkflowError, match="MoMA context file 'elsewhere/absent.safetensors' not found"):
        comfy_exec.run_api_workflow(graph)
    # paths out of input/ and output/ are refused (tests/nodes/test_paths.py covers every form)
    outside = save_context(original, tmp_path / "elsewhere.safetensors")
    graph["1"]["inputs"] = {"context_file": "", "path": str(outside)}
    with pytest.raises(comfy_exec.WorkflowError, match="is an absolute path"):
        comfy_exec.run_api_workflow(graph)


def test_reference_views_pair_one_mask_with_each_picture(caplog) -> None:
    images = torch.rand(3, 20, 30, 4)
    masks = torch.rand(3, 10, 10)
    pictures, view_masks = reference_views(images, masks)
    assert torch.equal(pictures, images) and torch.equal(view_masks, masks)
    pictures, view_masks = reference_views(images, masks[0])  # one mask ([H, W] or [1, H, W]) for every view
    assert view_masks.shape == (3, 10, 10) and all(torch.equal(m, masks[0]) for m in view_masks)
    assert torch.equal(reference_views(images, masks[:1])[1], view_masks)
    from comfyui_moma.moma.errors import MomaError

    for mask_count, image_count in ((2, 3), (3, 1)):
        with pytest.raises(
            MomaError,
            match=rf"image is a batch of {image_count} picture\(s\) but mask a batch of "
            rf"{mask_count}; give one mask per picture \({image_count}\) or a single",
        ):
            reference_views(images[:image_count], masks[:mask_count])
    with pytest.raises(MomaError, match="expected an IMAGE"):
        reference_views(torch.rand(20, 30, 3), masks)
    with pytest.raises(MomaError, match="expected a MASK"):
        reference_views(images, torch.rand(3, 1, 10, 10))
    # the warnings name the view: a single-colour second picture, an empty third mask
    images[1] = 0.5
    masks[2] = 0.0
    caplog.clear()
    with caplog.at_level("WARNING"):
        reference_views(images, masks)
    text = caplog.text
    assert "(view 2 of 3): the reference picture is a single colour" in text
    assert "(view 3 of 3): the object mask is empty" in text
    assert "view 1 of 3" not in text


def _views_graph(masks: str, prefix: str) -> dict:
    """Two views (LoadImage x2 -> ImageBatch) into the encoder; ``masks``: 'each' (two masks batched with core
    nodes), 'one' (one mask for both) or 'three' (a count that fits neither)."""
    graph = _graph(prefix=prefix)
    graph["2b"] = {"class_type": "LoadImage", "inputs": {"image": "moma_ref_side.png"}}
    graph["views"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["2b", 0]}}
    graph["4"]["inputs"]["image"] = ["views", 0]
    if masks in ("each", "three"):
        graph["m1"] = {"class_type": "LoadImage", "inputs": {"image": "moma_ref_mask.png"}}
        graph["m2"] = {"class_type": "LoadImage", "inputs": {"image": "moma_ref_side_mask.png"}}
        graph["mb"] = {"class_type": "ImageBatch", "inputs": {"image1": ["m1", 0], "image2": ["m2", 0]}}
        if masks == "three":
            graph["mb3"] = {"class_type": "ImageBatch", "inputs": {"image1": ["mb", 0], "image2": ["m1", 0]}}
        graph["mask_batch"] = {
            "class_type": "ImageToMask",
            "inputs": {"image": ["mb3" if masks == "three" else "mb", 0], "channel": "red"},
        }
        graph["4"]["inputs"]["mask"] = ["mask_batch", 0]
    return graph


@pytest.mark.default_host_only
def test_a_batch_of_views_through_the_executor_is_their_mean(
    placed, adapter_file: Path, llava_dir: Path, clip_vision_dir: Path
) -> None:
    """Two views of the object through the real executor: the context equals the independent re-derivation
    (tests/llava_reference.py) of each view, llava_emb averaged and the projector applied by hand."""
    import torch.nn.functional as F

    def grey(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("L"))

    expected = {
        name: expected_context(
            llava_dir,
            clip_vision_dir,
            adapter_file,
            np.asarray(Image.open(placed[picture]).convert("RGB")),
            grey(placed[mask]),
            SUBJECT,
            PROMPT,
        )
        for name, picture, mask in (
            ("front", "picture", "mask"),
            ("side", "side", "side_mask"),
            ("side_front_mask", "side", "mask"),
        )
    }
    projector = {
        key: value.float()
        for key, value in torch.load(adapter_file, map_location="cpu", weights_only=True)["projectors"].items()
    }

    def tokens(llava_emb: torch.Tensor) -> torch.Tensor:
        y = F.linear(llava_emb, projector["proj.weight"], projector["proj.bias"]).reshape(1, 4, 768)
        return F.layer_norm(y, (768,), projector["norm.weight"], projector["norm.bias"], eps=1e-5)

    for masks, second in (("each", "side"), ("one", "side_front_mask")):
        context = load_context(_saved(comfy_exec.run_api_workflow(_views_graph(masks, f"moma/views_{masks}"))))
        mean = (expected["front"]["llava_emb"] + expected[second]["llava_emb"]) / 2
        assert float((expected["front"]["llava_emb"] - mean).abs().max()) > 1e-3 * float(mean.abs().max())
        torch.testing.assert_close(context.llava_emb, mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(context.cond_tokens, tokens(mean), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(context.uncond_tokens, expected["front"]["uncond"], rtol=1e-5, atol=1e-5)
        assert context.sd_prompt == f"photo of a {SUBJECT}. {PROMPT}"

    with pytest.raises(comfy_exec.WorkflowError) as error:
        comfy_exec.run_api_workflow(_views_graph("three", "moma/views_three"))
    failure = error.value.execution_error
    assert failure["node_type"] == "MomaContextEncoder" and failure["exception_type"].endswith("MomaError")
    assert "image is a batch of 2 picture(s) but mask a batch of 3" in failure["exception_message"]


# ------------------------------------------------------------------- MoMA Loader set to 'none'

NONE_MESSAGE = (
    "MoMA Loader has llava_name 'none' and clip_vision_name 'none': choose the MoMA_llava_7b folder "
    "(models/LLM) and the clip-vit-large-patch14-336 vision tower (models/clip_vision) to encode a new "
    "context, or use Load MoMA Context"
)


def test_none_is_the_only_choice_and_passes_validation_without_llava_or_clip(placed, tmp_path, monkeypatch) -> None:
    """An install without the LLaVA and CLIP vision folders: 'none' is all the lists offer (so the default),
    the loader validates with it, and a real name gets a message that also points to 'none'."""
    import folder_paths

    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in ("LLM", "clip_vision"):
        monkeypatch.setitem(
            folder_paths.folder_names_and_paths, folder, ([str(empty)], folder_paths.folder_names_and_paths[folder][1])
        )
        monkeypatch.delitem(folder_paths.filename_list_cache, folder, raising=False)
    inputs = MomaLoader.INPUT_TYPES()["required"]
    assert inputs["llava_name"][1]["options"] == ["none"]
    assert inputs["clip_vision_name"][1]["options"] == ["none"]
    assert MomaLoader.validate_inputs(ADAPTER_NAME, "none", "none") is True
    message = comfy_exec.validation_message(MomaLoader.validate_inputs, ADAPTER_NAME, LLAVA_NAME, "none")
    assert f"LLaVA folder {LLAVA_NAME!r} not found in {empty}" in message and "Choose 'none'" in message
    message = comfy_exec.validation_message(MomaLoader.validate_inputs, ADAPTER_NAME, "none", CLIP_NAME)
    assert f"CLIP vision model {CLIP_NAME!r} not found in {empty}" in message and "Choose 'none'" in message
    moma_model = MomaLoader.execute(ADAPTER_NAME, "none", "none", "fp32", "none", False).result[0]
    assert moma_model.llava_dir is None and moma_model.clip_vision_path is None
    assert set(moma_model.adapter.to_k_ip) and set(moma_model.adapter.to_k_ip) == set(moma_model.adapter.to_v_ip)


def test_none_loader_reads_the_same_adapter(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> None:
    without = MomaModel.load(adapter_file, None, None, precision="fp32")
    full = MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp32")
    for group in ("projector", "to_k_ip", "to_v_ip", "scale_learnable", "mapping"):
        ours, theirs = getattr(without.adapter, group), getattr(full.adapter, group)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_encoding_with_none_names_what_to_choose(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> None:
    from comfyui_moma.moma.errors import MomaError

    both = MomaModel.load(adapter_file, None, None, precision="fp32")
    for attempt in (lambda: both.load_encoder("cpu"), lambda: both.tokenizer, lambda: both.image_processor):
        with pytest.raises(MomaError) as error:
            attempt()
        message = str(error.value)
        assert message.startswith("MoMA Loader has ") and "Load MoMA Context" in message
    with pytest.raises(MomaError, match=re.escape(NONE_MESSAGE)):
        both.load_encoder("cpu")

    # Independent choices; the encoder needs both, and the message names only what is missing.
    no_llava = MomaModel.load(adapter_file, None, clip_vision_dir, precision="fp32")
    no_clip = MomaModel.load(adapter_file, llava_dir, None, precision="fp32")
    llava_only = (
        "MoMA Loader has llava_name 'none': choose the MoMA_llava_7b folder (models/LLM) to encode a new "
        "context, or use Load MoMA Context"
    )
    clip_only = (
        "MoMA Loader has clip_vision_name 'none': choose the clip-vit-large-patch14-336 vision tower "
        "(models/clip_vision) to encode a new context, or use Load MoMA Context"
    )
    for attempt, expected in (
        (lambda: no_llava.load_encoder("cpu"), llava_only),
        (lambda: no_llava.tokenizer, llava_only),
        (lambda: no_clip.load_encoder("cpu"), clip_only),
        (lambda: no_clip.image_processor, clip_only),
    ):
        with pytest.raises(MomaError) as error:
            attempt()
        assert str(error.value).startswith(expected), str(error.value)
    # What each half does need still works: LLaVA's tokenizer without CLIP, CLIP's preprocessing without LLaVA.
    assert no_clip.tokenizer.prompt_ids(SUBJECT, PROMPT)
    assert no_llava.image_processor is not None


def test_context_encoder_node_with_none_fails_with_the_message(placed) -> None:
    graph = _graph()
    graph["1"]["inputs"].update(llava_name="none", clip_vision_name="none")
    with pytest.raises(comfy_exec.WorkflowError) as error:
        comfy_exec.run_api_workflow(graph)
    failure = error.value.execution_error
    assert failure["node_type"] == "MomaContextEncoder" and failure["exception_type"].endswith("MomaError")
    assert failure["exception_message"].startswith(NONE_MESSAGE)


@pytest.mark.default_host_only
@pytest.mark.slow
def test_saved_context_applies_the_same_with_a_none_loader(
    placed, comfy_host, sd15_checkpoint, moma_context, test_images
) -> None:
    """One graph, two MoMA chains from the same saved context (Load MoMA Context -> Feature Grab -> Apply ->
    KSampler): one from a loader set to none/none, one from a loader with LLaVA and CLIP vision. Same pictures,
    and not the picture of the plain model."""
    import folder_paths
    from comfyui_moma.moma.context import save_context

    checkpoint = comfy_exec.place_model("checkpoints", sd15_checkpoint, comfy_host.models_dir)
    save_context(moma_context, Path(folder_paths.get_input_directory()) / "contexts" / "for_none_loader.safetensors")
    reference, reference_mask = test_images["rgb"]
    shutil.copy(reference, Path(folder_paths.get_input_directory()) / "none_loader_ref.png")
    shutil.copy(reference_mask, Path(folder_paths.get_input_directory()) / "none_loader_ref_mask.png")

    graph: dict[str, dict] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "ctx": {
            "class_type": "MomaLoadContext",
            "inputs": {"context_file": "contexts/for_none_loader.safetensors [input]", "path": ""},
        },
        "img": {"class_type": "LoadImage", "inputs": {"image": "none_loader_ref.png"}},
        "mask": {"class_type": "LoadImageMask", "inputs": {"image": "none_loader_ref_mask.png", "channel": "red"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": ["ctx", 1], "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }

    def sample(tag: str, model: list) -> None:
        graph[f"sample_{tag}"] = {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": 3,
                "steps": 2,
                "cfg": 7.5,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        }
        graph[f"decode_{tag}"] = {
            "class_type": "VAEDecode",
            "inputs": {"samples": [f"sample_{tag}", 0], "vae": ["ckpt", 2]},
        }
        graph[f"save_{tag}"] = {
            "class_type": "SaveImage",
            "inputs": {"images": [f"decode_{tag}", 0], "filename_prefix": f"moma_none_{tag}"},
        }

    for tag, llava_name, clip_name in (("none", "none", "none"), ("full", LLAVA_NAME, CLIP_NAME)):
        graph[f"loader_{tag}"] = {
            "class_type": "MomaLoader",
            "inputs": {
                "adapter_name": ADAPTER_NAME,
                "llava_name": llava_name,
                "clip_vision_name": clip_name,
                "precision": "fp32",
                "quantization": "none",
                "keep_llava_loaded": False,
            },
        }
        graph[f"grab_{tag}"] = {
            "class_type": "MomaFeatureGrab",
            "inputs": {
                "model": ["ckpt", 0],
                "moma_model": [f"loader_{tag}", 0],
                "vae": ["ckpt", 2],
                "clip": ["ckpt", 1],
                "image": ["img", 0],
                "mask": ["mask", 0],
                "subject": moma_context.subject,
                "seed": 2,
                "resolution": 128,
            },
        }
        graph[f"apply_{tag}"] = {
            "class_type": "MomaApply",
            "inputs": {
                "model": ["ckpt", 0],
                "moma_model": [f"loader_{tag}", 0],
                "context": ["ctx", 0],
                "reference": [f"grab_{tag}", 0],
                "preset": "context",
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        }
        sample(tag, [f"apply_{tag}", 0])
    sample("plain", ["ckpt", 0])

    outputs = comfy_exec.run_api_workflow(graph)

    def picture(tag: str) -> np.ndarray:
        (entry,) = outputs[f"save_{tag}"]["images"]
        path = Path(folder_paths.get_directory_by_type(entry["type"])) / entry["subfolder"] / entry["filename"]
        return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)

    with_none, with_full, plain = picture("none"), picture("full"), picture("plain")
    assert with_none.shape == (64, 64, 3)
    assert np.array_equal(with_none, with_full)
    assert np.abs(with_none - plain).max() > 0, "MoMA changed nothing: the comparison would prove nothing"
