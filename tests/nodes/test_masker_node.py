"""MoMA Object Masker node: schema, and API-format graphs run through ComfyUI's real executor
(LoadImage -> MomaObjectMasker -> core nodes -> SaveImage) on the tiny u2net-shaped ONNX model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from comfy_exec import WorkflowError, run_api_workflow
from comfyui_moma.moma import masker
from moma_demo.rembg import write_u2net_onnx
from PIL import Image

BOX = (12, 20, 44, 70)  # top, left, bottom, right of the object in the test pictures


def box_picture(height: int, width: int, mode: str) -> Image.Image:
    """A plain background with one coloured box; RGBA pictures carry an alpha cut-out elsewhere."""
    array = np.full((height, width, 3), 128, dtype=np.uint8)
    top, left, bottom, right = BOX
    array[top:bottom, left:right] = (230, 50, 20)
    picture = Image.fromarray(array)
    if mode == "L":
        return picture.convert("L")
    if mode == "RGBA":
        alpha = np.zeros((height, width), dtype=np.uint8)
        alpha[height // 2 :, width // 2 :] = 255  # bottom-right quarter: not where the box is
        picture.putalpha(Image.fromarray(alpha))
    return picture


def expected_box(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    top, left, bottom, right = BOX
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture()
def rembg_models(comfy_host) -> Path:
    """models/rembg of the running host with two stand-ins: u2net.onnx (corner rule, exact on the plain
    box pictures) and u2netp.onnx (warm rule, for the textured fixture pictures). Whatever was there
    before (another test's file or link) is put back afterwards."""
    folder = comfy_host.models_dir / "rembg"
    folder.mkdir(parents=True, exist_ok=True)
    placed = {"u2net.onnx": "corner", "u2netp.onnx": "warm"}
    for file_name, rule in placed.items():
        path = folder / file_name
        if path.exists() or path.is_symlink():
            os.replace(path, folder / (file_name + ".before-masker-test"))
        write_u2net_onnx(path, rule=rule)
    yield folder
    for file_name in placed:
        (folder / file_name).unlink()
        backup = folder / (file_name + ".before-masker-test")
        if backup.exists() or backup.is_symlink():
            os.replace(backup, folder / file_name)


def put_input(comfy_host, picture: Image.Image, name: str) -> str:
    picture.save(comfy_host.base_dir / "input" / name)
    return name


def saved(comfy_host, outputs: dict, node_id: str) -> list[np.ndarray]:
    files = outputs[node_id]["images"]
    return [np.asarray(Image.open(comfy_host.base_dir / "output" / f["subfolder"] / f["filename"])) for f in files]


def masker_graph(image_name: str, model: str = "u2net", grow: int = 0, invert: bool = False) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {
            "class_type": "MomaObjectMasker",
            "inputs": {"image": ["1", 0], "rembg_model": model, "threshold": 0.5, "grow": grow, "invert": invert},
        },
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "moma_mask"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["2", 1], "filename_prefix": "moma_white"}},
    }


# --- schema ------------------------------------------------------------------------------------------------


def test_node_registered_with_tooltips(rembg_models) -> None:
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS["MomaObjectMasker"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["MomaObjectMasker"] == "MoMA Object Masker"
    schema = node.GET_SCHEMA()
    assert schema.category == "MoMA"
    assert [i.id for i in schema.inputs] == ["image", "rembg_model", "threshold", "grow", "invert", "mask"]
    assert all(i.tooltip for i in schema.inputs)
    assert [o.display_name or o.id for o in schema.outputs] == ["mask", "white_background"]
    info = node.INPUT_TYPES()
    assert set(info["optional"]) == {"mask"}
    options = info["required"]["rembg_model"][1]["options"]
    assert sorted(options) == sorted(masker.REMBG_MODELS)
    assert options[:2] == ["u2net", "u2netp"]  # present files come first


def test_combo_lists_present_files_first(rembg_models) -> None:
    from comfyui_moma.nodes.masker import rembg_model_choices

    def absent(choices: list[str]) -> list[str]:
        return [name for name in choices if masker.find_model_file(name, [rembg_models]) is None]

    before = rembg_model_choices()
    assert "birefnet-general" in absent(before)
    extra = write_u2net_onnx(rembg_models / "BiRefNet-general-epoch_244.onnx", rule="corner")  # rembg's release name
    try:
        choices = rembg_model_choices()
        assert sorted(choices) == sorted(before)
        assert choices.index("birefnet-general") < min(choices.index(name) for name in absent(choices))
        assert choices.index("u2netp") < choices.index("birefnet-general")  # table order among present files
    finally:
        extra.unlink()
    assert rembg_model_choices() == before


# --- through the real executor -------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "height", "width"), [("RGB", 64, 96), ("L", 96, 80), ("RGB", 48, 160)])
def test_graph_masks_object_and_whitens_background(comfy_host, rembg_models, mode, height, width) -> None:
    name = put_input(comfy_host, box_picture(height, width, mode), f"masker_{mode}_{width}x{height}.png")
    outputs = run_api_workflow(masker_graph(name))
    (mask_png,) = saved(comfy_host, outputs, "4")
    (white_png,) = saved(comfy_host, outputs, "5")
    assert mask_png.shape[:2] == (height, width) and white_png.shape == (height, width, 3)
    assert np.array_equal(mask_png[..., 0] > 127, expected_box(height, width))
    background = ~expected_box(height, width)
    assert (white_png[background] == 255).all()
    source = np.asarray(box_picture(height, width, mode).convert("RGB"))
    # the object keeps its pixels; LoadImage decodes through PyAV on ComfyUI 0.30 (an L-mode 100 arrives as 99)
    assert np.abs(white_png[~background].astype(int) - source[~background]).max() <= 1


@pytest.mark.parametrize("name", ["rgb", "grey", "wide"])
def test_graph_on_fixture_pictures(comfy_host, rembg_models, test_images, name) -> None:
    image_path, mask_path = test_images[name]
    input_name = f"masker_fixture_{image_path.name}"
    shutil.copyfile(image_path, comfy_host.base_dir / "input" / input_name)
    outputs = run_api_workflow(masker_graph(input_name, model="u2netp"))
    (mask_png,) = saved(comfy_host, outputs, "4")
    expected = np.asarray(Image.open(mask_path)) > 127
    assert mask_png.shape[:2] == expected.shape
    found = mask_png[..., 0] > 127
    assert (found & expected).sum() / (found | expected).sum() > 0.9


def test_graph_grow_and_invert(comfy_host, rembg_models) -> None:
    name = put_input(comfy_host, box_picture(64, 96, "RGB"), "masker_grow.png")
    outputs = run_api_workflow(masker_graph(name, grow=3, invert=True))
    (mask_png,) = saved(comfy_host, outputs, "4")
    top, left, bottom, right = BOX
    grown = np.zeros((64, 96), dtype=bool)
    grown[top - 3 : bottom + 3, left - 3 : right + 3] = True
    assert np.array_equal(mask_png[..., 0] > 127, ~grown)


def test_graph_rgba_alpha_cutout_needs_no_model(comfy_host) -> None:
    # LoadImage splits the PNG into RGB + transparency MASK; JoinImageWithAlpha rebuilds an RGBA IMAGE.
    assert not (comfy_host.models_dir / "rembg" / "silueta.onnx").exists()
    name = put_input(comfy_host, box_picture(64, 96, "RGBA"), "masker_rgba.png")
    prompt = masker_graph(name, model="silueta")  # no silueta file: rembg must not be needed
    prompt["6"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["1", 0], "alpha": ["1", 1]}}
    prompt["2"]["inputs"]["image"] = ["6", 0]
    outputs = run_api_workflow(prompt)
    (mask_png,) = saved(comfy_host, outputs, "4")
    expected = np.zeros((64, 96), dtype=bool)
    expected[32:, 48:] = True
    assert np.array_equal(mask_png[..., 0] > 127, expected)


def test_graph_optional_mask_batch(comfy_host) -> None:
    # A MASK input (here from a mask PNG) is refined instead of running rembg (no model file needed),
    # one mask for a batch of 2 images.
    name = put_input(comfy_host, box_picture(64, 96, "RGB"), "masker_batch.png")
    mask_picture = Image.fromarray(np.where(expected_box(64, 96), 255, 0).astype(np.uint8))
    mask_name = put_input(comfy_host, mask_picture, "masker_batch_mask.png")
    prompt = masker_graph(name, model="silueta", grow=-2)
    prompt["7"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["1", 0], "amount": 2}}
    prompt["8"] = {"class_type": "LoadImageMask", "inputs": {"image": mask_name, "channel": "red"}}
    prompt["2"]["inputs"]["image"] = ["7", 0]
    prompt["2"]["inputs"]["mask"] = ["8", 0]
    outputs = run_api_workflow(prompt)
    masks = saved(comfy_host, outputs, "4")
    assert len(masks) == 2 and len(saved(comfy_host, outputs, "5")) == 2
    top, left, bottom, right = BOX
    shrunk = np.zeros((64, 96), dtype=bool)
    shrunk[top + 2 : bottom - 2, left + 2 : right - 2] = True
    for mask_png in masks:
        assert np.array_equal(mask_png[..., 0] > 127, shrunk)


def test_graph_missing_model_offline_error(comfy_host, monkeypatch) -> None:
    monkeypatch.setenv(masker.BASE_URL_ENV, "http://127.0.0.1:9/v0.0.0")
    folder = comfy_host.models_dir / "rembg"
    assert not (folder / "silueta.onnx").exists()
    name = put_input(comfy_host, box_picture(64, 96, "RGB"), "masker_missing.png")
    with pytest.raises(WorkflowError) as caught:
        run_api_workflow(masker_graph(name, model="silueta"))
    error = caught.value.execution_error
    assert error["node_type"] == "MomaObjectMasker" and error["exception_type"].endswith("MomaError")
    message = error["exception_message"]
    assert "silueta.onnx" in message and str(folder) in message
    assert "http://127.0.0.1:9/v0.0.0/silueta.onnx" in message
    assert not (folder / "silueta.onnx.partial").exists()


def test_graph_downloads_missing_model(comfy_host, tmp_path, monkeypatch) -> None:
    # A local HTTP server stands in for rembg's release page; the table entry carries the stand-in's md5.
    import hashlib
    import http.server
    import threading
    from functools import partial

    served = tmp_path / "served"
    source = write_u2net_onnx(served / "u2net_human_seg.onnx", rule="corner")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    model = masker.RembgModel("u2net_human_seg", "u2net_human_seg.onnx", f"md5:{md5}")
    monkeypatch.setitem(masker.REMBG_MODELS, "u2net_human_seg", model)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv(masker.BASE_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    target = comfy_host.models_dir / "rembg" / "u2net_human_seg.onnx"
    assert not target.exists()
    try:
        name = put_input(comfy_host, box_picture(64, 96, "RGB"), "masker_download.png")
        outputs = run_api_workflow(masker_graph(name, model="u2net_human_seg"))
        assert target.read_bytes() == source.read_bytes()
        (mask_png,) = saved(comfy_host, outputs, "4")
        assert np.array_equal(mask_png[..., 0] > 127, expected_box(64, 96))
    finally:
        server.shutdown()
        server.server_close()
        target.unlink(missing_ok=True)
