"""MoMA Loader's llava_placement in the real ComfyUI: the auto choice follows the free memory the host reports,
the memory asked of ComfyUI is sized to the chosen mode, and a streamed (kept) encoder gives the resident one's
context through the real executor."""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from pathlib import Path

import comfy_exec
import pytest
import torch
from comfyui_moma.moma.context import load_context
from comfyui_moma.moma.llava import LlavaContextEncoder
from comfyui_moma.moma.model import MomaModel
from comfyui_moma.nodes import context as context_node
from comfyui_moma.nodes.loader import MomaLoader
from test_context_nodes import _graph, _saved, placed  # noqa: F401  (the fixture files in the host's folders)

CUDA = torch.device("cuda", 0)  # only named: nothing here touches a GPU


@pytest.fixture
def fp16_model(adapter_file: Path, llava_dir: Path, clip_vision_dir: Path) -> MomaModel:
    return MomaModel.load(adapter_file, llava_dir, clip_vision_dir, precision="fp16", placement="auto")


def test_auto_follows_the_free_memory_comfy_reports(fp16_model: MomaModel, monkeypatch) -> None:
    import comfy.model_management as mm

    needed = context_node._estimated_bytes(fp16_model, CUDA) + mm.minimum_inference_memory()
    reported: list = []

    def free_memory_of(amount: int):
        def get_free_memory(dev=None, torch_free_too=False):
            reported.append(dev)
            return (amount, amount) if torch_free_too else amount

        return get_free_memory

    monkeypatch.setattr(mm, "current_loaded_models", [])
    for free, expected in [
        (needed, "gpu"),
        (100 << 30, "gpu"),
        (needed - 1, "stream"),
        (2 << 30, "stream" if needed > 2 << 30 else "gpu"),
        (256 << 20, "stream"),
    ]:
        monkeypatch.setattr(mm, "get_free_memory", free_memory_of(free))
        assert context_node.choose_placement(fp16_model, CUDA) == expected, (free, needed)
    assert reported and all(dev == CUDA for dev in reported)
    # Chosen modes are taken as they are; on a CPU-only host everything but 'stream' is the CPU.
    for placement, on_cuda, on_cpu in [
        ("gpu", "gpu", "cpu"),
        ("stream", "stream", "stream"),
        ("cpu", "cpu", "cpu"),
        ("auto", None, "cpu"),
    ]:
        fp16_model.placement = placement
        if on_cuda is not None:
            assert context_node.choose_placement(fp16_model, CUDA) == on_cuda
        assert context_node.choose_placement(fp16_model, torch.device("cpu")) == on_cpu


def test_memory_asked_of_comfy_is_sized_to_the_mode(fp16_model: MomaModel, monkeypatch) -> None:
    import comfy.model_management as mm

    asked: list[tuple[int, torch.device]] = []
    monkeypatch.setattr(mm, "free_memory", lambda amount, device, *a, **k: asked.append((amount, device)) or [])
    margin = mm.minimum_inference_memory()
    for placement in ("gpu", "stream", "cpu"):
        context_node._make_room(fp16_model, CUDA, placement)
    resident, streamed = context_node._estimated_bytes(fp16_model, CUDA), context_node._stream_bytes(fp16_model, CUDA)
    assert asked == [(resident + margin, CUDA), (streamed + margin, CUDA)]  # nothing for 'cpu'
    # The fixture has 2 decoder layers, so streaming saves little here; the real 7B shape is the point:
    config = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    }
    from comfyui_moma.moma.streaming import stream_device_bytes

    assert 1.0 * 2**30 < stream_device_bytes(config, 2) < 1.3 * 2**30  # fp16: embeddings + 2 layers + CLIP parts


def test_loader_keeps_its_inputs_and_appends_llava_placement() -> None:
    schema = MomaLoader.INPUT_TYPES()
    assert list(schema["required"]) == [
        "adapter_name",
        "llava_name",
        "clip_vision_name",
        "precision",
        "quantization",
        "keep_llava_loaded",
    ]
    options = schema["optional"]["llava_placement"]
    assert options[0] == ["auto", "gpu", "stream", "cpu"] or options[1]["options"] == ["auto", "gpu", "stream", "cpu"]
    assert options[1]["default"] == "auto" and options[1]["tooltip"]


def _run(executor, graph: dict) -> dict:
    import execution

    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
    assert valid, (error, node_errors)
    executor.execute(graph, prompt_id, extra_data={}, execute_outputs=outputs)
    assert executor.success, [m for m in executor.status_messages if m[0] == "execution_error"]
    return executor.history_result["outputs"]


def test_streamed_graph_equals_resident_graph_and_a_kept_one_lives_in_ram(placed) -> None:  # noqa: F811
    import comfy.model_management
    import execution

    executor = execution.PromptExecutor(
        comfy_exec.NullServer(),
        cache_type=execution.CacheType.CLASSIC,
        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0},
    )
    try:
        resident = load_context(_saved(_run(executor, _graph(prefix="moma/resident"))))  # no placement: auto
        graph = _graph(keep=True, prefix="moma/streamed")
        graph["1"]["inputs"]["llava_placement"] = "stream"
        streamed = load_context(_saved(_run(executor, graph)))
        for name in ("cond_tokens", "uncond_tokens", "llava_emb"):
            assert torch.equal(getattr(streamed, name), getattr(resident, name)), name
        # The kept streamed encoder is held by the MOMA_MODEL in RAM, not handed to ComfyUI's GPU management.
        held = [
            loaded
            for loaded in comfy.model_management.current_loaded_models
            if isinstance(getattr(loaded.model, "model", None), LlavaContextEncoder)
        ]
        assert held == []
        with warnings.catch_warnings():  # isinstance on every live object touches deprecated torch aliases
            warnings.simplefilter("ignore")
            kept = [
                obj.resident_encoder
                for obj in gc.get_objects()
                if isinstance(obj, MomaModel) and obj.resident_encoder is not None
            ]
        assert len(kept) == 1
        encoder = kept[0]
        assert isinstance(encoder, LlavaContextEncoder) and encoder.streamer is not None
        assert encoder.streamer.layers_fetched == 3 + 2
        assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    finally:
        comfy.model_management.unload_all_models()
        del executor
        gc.collect()
