"""attn_adapters_projectors.th: strict, safe loading (spec 4.4) and the projector / mapping maths (spec 2)."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.projection import build_mapping, build_projector, context_tokens
from comfyui_moma.moma.weights import (
    convert_adapter_to_safetensors,
    load_adapter,
    save_adapter_safetensors,
)

# Spec 4.1 / 4.4, written out here independently of moma/sd15.py.
SELF_CHANNELS = {
    0: 320,
    2: 320,
    4: 640,
    6: 640,
    8: 1280,
    10: 1280,
    12: 1280,
    14: 1280,
    16: 1280,
    18: 640,
    20: 640,
    22: 640,
    24: 320,
    26: 320,
    28: 320,
    30: 1280,
}


@pytest.fixture(scope="module")
def upstream(adapter_file: Path) -> dict:
    """The fixture file as plain torch.load sees it (the three groups)."""
    return torch.load(adapter_file, map_location="cpu", weights_only=True)


def _save(tmp_path: Path, groups: dict, name: str = "adapter.th") -> Path:
    path = tmp_path / name
    torch.save(groups, path)
    return path


def _copy(groups: dict) -> dict:
    return {group: OrderedDict(inner) for group, inner in groups.items()}


def test_fixture_file_is_a_plain_weights_only_pickle_with_the_upstream_layout(upstream: dict) -> None:
    assert set(upstream) == {"projectors", "self_cross_attentions", "llm_mapping"}
    assert sum(len(inner) for inner in upstream.values()) == 4 + 80 + 3
    params = {group: sum(t.numel() for t in inner.values()) for group, inner in upstream.items()}
    assert params == {"projectors": 3_150_336, "self_cross_attentions": 43_950_096, "llm_mapping": 9_437_184}
    assert {t.dtype for inner in upstream.values() for t in inner.values()} == {torch.float16}


def test_load_adapter_returns_every_tensor_by_index(adapter_file: Path, upstream: dict) -> None:
    weights = load_adapter(adapter_file)
    attentions = upstream["self_cross_attentions"]
    assert sorted(weights.to_k_ip) == list(range(32)) and sorted(weights.to_v_ip) == list(range(32))
    assert sorted(weights.scale_learnable) == sorted(SELF_CHANNELS)
    for index in range(32):
        channels = SELF_CHANNELS[index - index % 2]
        expected_shape = (channels, channels if index % 2 == 0 else 768)
        assert tuple(weights.to_k_ip[index].shape) == expected_shape
        assert torch.equal(weights.to_k_ip[index], attentions[f"{index}.to_k_ip.weight"])
        assert torch.equal(weights.to_v_ip[index], attentions[f"{index}.to_v_ip.weight"])
    for index, scale in weights.scale_learnable.items():
        assert scale.shape == (1,) and float(scale) != 0.0
        assert torch.equal(scale, attentions[f"{index}.scale_learnable"])
    assert set(weights.projector) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert set(weights.mapping) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert torch.equal(weights.mapping["gate_proj.weight"], upstream["llm_mapping"]["mapping.gate_proj.weight"])


def test_safetensors_conversion_round_trips(adapter_file: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    converted = convert_adapter_to_safetensors(adapter_file, tmp_path / "attn_adapters_projectors.safetensors")
    with safe_open(str(converted), framework="pt") as handle:
        keys = set(handle.keys())
    assert {
        "projectors.proj.weight",
        "self_cross_attentions.0.to_k_ip.weight",
        "self_cross_attentions.30.scale_learnable",
        "llm_mapping.mapping.gate_proj.weight",
    } <= keys and len(keys) == 87
    original, again = load_adapter(adapter_file), load_adapter(converted)
    assert original.flat_state_dict().keys() == again.flat_state_dict().keys()
    for key, value in original.flat_state_dict().items():
        assert torch.equal(value, again.flat_state_dict()[key]), key


def test_ip_adapter_file_is_named_as_such(tmp_path: Path) -> None:
    ip_adapter = {
        "image_proj": {"proj.weight": torch.zeros(3072, 1024)},
        "ip_adapter": {"1.to_k_ip.weight": torch.zeros(320, 768)},
    }
    with pytest.raises(MomaError, match="IP-Adapter file") as error:
        load_adapter(_save(tmp_path, ip_adapter, "ip-adapter_sd15.bin"))
    assert "ip-adapter_sd15.bin" in str(error.value) and "KunpengSong/MoMA_llava_7b" in str(error.value)


def test_renamed_mapping_key_is_reported_missing_and_unexpected(tmp_path: Path, upstream: dict) -> None:
    groups = _copy(upstream)
    groups["llm_mapping"]["gate_proj.weight"] = groups["llm_mapping"].pop("mapping.gate_proj.weight")
    with pytest.raises(MomaError) as error:
        load_adapter(_save(tmp_path, groups))
    message = str(error.value)
    assert "'llm_mapping' missing keys: [mapping.gate_proj.weight]" in message
    assert "'llm_mapping' unexpected keys: [gate_proj.weight]" in message
    assert "adapter.th" in message


def test_missing_scale_learnable_is_an_error_not_a_silent_zero(tmp_path: Path, upstream: dict) -> None:
    groups = _copy(upstream)
    del groups["self_cross_attentions"]["12.scale_learnable"]
    with pytest.raises(MomaError, match=r"missing keys: \[12\.scale_learnable\]"):
        load_adapter(_save(tmp_path, groups))


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path, upstream: dict) -> None:
    groups = _copy(upstream)
    groups["self_cross_attentions"]["5.to_v_ip.weight"] = torch.zeros(320, 768, dtype=torch.float16)
    with pytest.raises(MomaError, match=r"5\.to_v_ip\.weight \(320, 768\) \(expected \(640, 768\)\)"):
        load_adapter(_save(tmp_path, groups))


def test_missing_and_extra_groups(tmp_path: Path, upstream: dict) -> None:
    groups = _copy(upstream)
    groups["unet"] = groups.pop("llm_mapping")
    with pytest.raises(MomaError, match=r"missing groups \['llm_mapping'\], unexpected groups \[unet\]"):
        load_adapter(_save(tmp_path, groups))


def test_truncated_pickle_and_truncated_safetensors(adapter_file: Path, tmp_path: Path) -> None:
    data = adapter_file.read_bytes()
    truncated = tmp_path / "attn_adapters_projectors.th"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MomaError, match="truncated"):
        load_adapter(truncated)
    converted = save_adapter_safetensors(load_adapter(adapter_file), tmp_path / "full.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes(converted.read_bytes()[:1_000_000])
    with pytest.raises(MomaError, match="truncated"):
        load_adapter(short)


def test_missing_file_says_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(MomaError, match="not found.*KunpengSong/MoMA_llava_7b"):
        load_adapter(tmp_path / "nope.th")


class _RunsCode:
    """Unpickling this calls os.system: exactly what a malicious model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"projectors": _RunsCode(marker), "self_cross_attentions": {}, "llm_mapping": {}}
    path = tmp_path / "attn_adapters_projectors.th"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    with pytest.raises(MomaError, match="Refused to load"):
        load_adapter(path)
    assert not marker.exists()


# --- projection maths, re-derived from spec 2 with plain functional ops


def test_mapping_and_projector_match_the_spec_formulas(adapter_file: Path, upstream: dict) -> None:
    weights = load_adapter(adapter_file)
    mapping, projector = build_mapping(weights), build_projector(weights)
    hidden = torch.randn(2, 3, 4096, generator=torch.Generator().manual_seed(1))
    m = {k: v.float() for k, v in upstream["llm_mapping"].items()}
    expected = F.linear(
        F.silu(F.linear(hidden, m["mapping.gate_proj.weight"])) * F.linear(hidden, m["mapping.up_proj.weight"]),
        m["mapping.down_proj.weight"],
    )
    torch.testing.assert_close(mapping(hidden), expected, rtol=1e-5, atol=1e-5)

    p = {k: v.float() for k, v in upstream["projectors"].items()}
    llava_emb = torch.randn(2, 1024, generator=torch.Generator().manual_seed(2))
    cond, uncond = context_tokens(projector, llava_emb)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        projected = (x @ p["proj.weight"].T + p["proj.bias"]).reshape(x.shape[0], 4, 768)
        mean = projected.mean(-1, keepdim=True)
        var = projected.var(-1, unbiased=False, keepdim=True)
        return (projected - mean) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]

    assert cond.shape == uncond.shape == (2, 4, 768)
    torch.testing.assert_close(cond, tokens(llava_emb), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(uncond, tokens(torch.zeros(2, 1024)), rtol=1e-4, atol=1e-4)
    assert uncond.abs().sum() > 0  # bias -> LayerNorm, not zeros
