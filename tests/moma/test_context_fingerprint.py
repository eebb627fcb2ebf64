"""A saved context carries a fingerprint of the adapter that made its tokens; Apply warns when MoMA Loader's
adapter differs. A single-colour reference picture (a 16-bit PNG through Load Image) gets a warning."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from comfyui_moma.moma.context import load_context, save_context
from comfyui_moma.moma.weights import adapter_fingerprint, load_adapter, save_adapter_safetensors
from comfyui_moma.nodes.common import warn_if_constant_picture, warn_if_other_adapter
from PIL import Image


def test_fingerprint_follows_the_tensors_not_the_file_format(adapter_file: Path, tmp_path: Path) -> None:
    weights = load_adapter(adapter_file)
    converted = load_adapter(save_adapter_safetensors(weights, tmp_path / "a.safetensors"))
    assert adapter_fingerprint(weights) == adapter_fingerprint(converted)
    assert len(adapter_fingerprint(weights)) == 64 and int(adapter_fingerprint(weights), 16) >= 0
    changed = load_adapter(adapter_file)
    changed.to_k_ip[5] = changed.to_k_ip[5].clone()
    changed.to_k_ip[5].view(-1)[123] += 1e-3  # one value of one of 87 tensors
    assert adapter_fingerprint(changed) != adapter_fingerprint(weights)
    # an independent digest of the same tensors differs from the file's own sha256 (it is not a file hash)
    assert adapter_fingerprint(weights) != hashlib.sha256(adapter_file.read_bytes()).hexdigest()


def test_encoded_context_carries_its_adapter_and_survives_save_load(moma_context, moma_model, tmp_path: Path) -> None:
    assert moma_context.adapter_sha256 == adapter_fingerprint(moma_model.adapter)
    loaded = load_context(save_context(moma_context, tmp_path / "ctx.safetensors"))
    assert loaded.adapter_sha256 == moma_context.adapter_sha256


def test_apply_warns_for_another_adapter_only(moma_context, moma_model, caplog, tmp_path: Path) -> None:
    import copy

    with caplog.at_level(logging.WARNING):
        assert warn_if_other_adapter(moma_context, moma_model) is None
        old = copy.copy(moma_context)
        old.adapter_sha256 = ""  # saved before fingerprints: nothing to compare
        assert warn_if_other_adapter(old, moma_model) is None
        assert not caplog.records
        other = copy.copy(moma_context)
        other.adapter_sha256 = "ab" * 32
        reason = warn_if_other_adapter(load_context(save_context(other, tmp_path / "o.safetensors")), moma_model)
    assert reason and "another MoMA adapter" in reason and "abababababab" in reason
    assert any(
        "Apply MoMA Attention: " in record.getMessage() and "another MoMA adapter" in record.getMessage()
        for record in caplog.records
    )


def test_16_bit_png_through_load_image_is_all_white_and_warned(comfy_host, caplog) -> None:
    import folder_paths

    import nodes

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 65535, (32, 48)).astype(np.uint16)).save(
        Path(folder_paths.get_input_directory()) / "moma_16bit.png"
    )
    image, _mask = nodes.LoadImage().load_image("moma_16bit.png")
    # ComfyUI 0.3.x's Load Image scales 16-bit values by 1/255 (all white); 0.30 reads them correctly
    white = float((image == 1.0).all(dim=-1).float().mean()) > 0.98
    assert white or float(image.std()) > 0.1
    with caplog.at_level(logging.WARNING):
        message = warn_if_constant_picture(image[0], "LLaVA Context Encoder")
        assert (message is not None) == white
        message = warn_if_constant_picture(torch.ones(32, 48, 3), "LLaVA Context Encoder")
    assert message and "16-bit PNG" in message and "single colour" in message
    assert any(message == record.getMessage() for record in caplog.records)
    flat = torch.tensor([0.1, 0.5, 0.9]).expand(16, 16, 3)  # one colour, different channels
    assert "single colour (0.100, 0.500, 0.900" in warn_if_constant_picture(flat, "Feature Grab")
    speckled = torch.ones(40, 40, 3)
    speckled[::10, ::10] = 0.2  # 1% other pixels: still a white picture
    assert "16-bit PNG" in warn_if_constant_picture(speckled, "Feature Grab")
    speckled[::3] = 0.2  # a third: a picture
    assert warn_if_constant_picture(speckled, "Feature Grab") is None
    assert warn_if_constant_picture(torch.zeros(8, 8, 3), "Feature Grab") and "16-bit" not in (
        warn_if_constant_picture(torch.zeros(8, 8, 3), "Feature Grab") or ""
    )
    picture = torch.full((8, 8, 3), 0.5)
    picture[:3, :, 0] = 0.6  # 3 of 8 rows tinted
    assert warn_if_constant_picture(picture, "Feature Grab") is None
