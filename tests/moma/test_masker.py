"""moma.masker: rembg's own session code on a tiny u2net-shaped ONNX file, alpha and input-mask paths,
threshold / grow / invert, the white background, model files (lookup, download, offline error)."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from comfyui_moma.moma import masker
from comfyui_moma.moma.errors import MomaError
from moma_demo.rembg import write_u2net_onnx
from PIL import Image

CPU = ["CPUExecutionProvider"]


@pytest.fixture()
def rembg_dir(tmp_path: Path) -> Path:
    """A models/rembg folder with two stand-ins: u2net (corner rule, exact on plain backgrounds) and
    u2netp (warm rule, for the textured fixture pictures)."""
    folder = tmp_path / "models" / "rembg"
    write_u2net_onnx(folder / "u2net.onnx", rule="corner")
    write_u2net_onnx(folder / "u2netp.onnx", rule="warm")
    return folder


@pytest.fixture()
def session(rembg_dir: Path):
    """rembg's U2netSession on the corner-rule stand-in."""
    path = masker.find_model_file("u2net", [rembg_dir])
    return masker.load_rembg_session("u2net", path, providers=CPU)


@pytest.fixture()
def warm_session(rembg_dir: Path):
    """rembg's U2netpSession on the warm-rule stand-in."""
    path = masker.find_model_file("u2netp", [rembg_dir])
    return masker.load_rembg_session("u2netp", path, providers=CPU)


def load_image(path: Path) -> torch.Tensor:
    """A picture file as [H, W, C] float 0..1, keeping its mode's channels (L -> 1, RGB -> 3, RGBA -> 4)."""
    array = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    return torch.from_numpy(array if array.ndim == 3 else array[..., None])


def load_mask(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0) > 0.5


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def box_image(height: int, width: int, box: tuple[int, int, int, int], channels: int = 3) -> torch.Tensor:
    """A plain grey background with a coloured box (top, left, bottom, right)."""
    image = torch.full((height, width, channels), 0.5)
    top, left, bottom, right = box
    colour = torch.tensor([0.9, 0.2, 0.1, 1.0][:channels]) if channels >= 3 else torch.tensor([0.95, 1.0][:channels])
    image[top:bottom, left:right] = colour
    return image


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros(height, width)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 1.0
    return mask


# --- rembg's table and its session classes -----------------------------------------------------------


def test_model_table_matches_installed_rembg() -> None:
    from rembg.sessions import sessions_class

    classes = {cls.name(): cls for cls in sessions_class}
    for name, model in masker.REMBG_MODELS.items():
        assert name in classes, f"installed rembg has no session {name}"
        source = inspect.getsource(classes[name].download_models)
        assert model.release_file in source and model.checksum in source, name
        assert model.url().startswith(masker.REMBG_RELEASE_URL)


def test_session_is_rembgs_own_class_reading_our_file(rembg_dir: Path, session) -> None:
    from rembg.sessions.u2net import U2netSession

    assert isinstance(session, U2netSession)
    assert Path(session.inner_session._model_path) == rembg_dir / "u2net.onnx"
    again = masker.load_rembg_session("u2net", rembg_dir / "u2net.onnx", providers=CPU)
    assert again is session  # cached while the file is unchanged


# --- rembg path on RGB, greyscale, non-square ----------------------------------------------------------


@pytest.mark.parametrize("name", ["rgb", "grey", "wide"])
def test_rembg_mask_on_fixture_images(test_images: dict, warm_session, name: str) -> None:
    image_path, mask_path = test_images[name]
    image = load_image(image_path)
    assert image.shape[-1] == (1 if name == "grey" else 3)
    expected = load_mask(mask_path)
    calls = []
    masks, whites = masker.object_masks(image, lambda: calls.append(1) or warm_session, threshold=0.5)
    height, width = image.shape[:2]
    assert masks.shape == (1, height, width) and whites.shape == (1, height, width, 3)
    assert calls == [1]
    assert iou(masks[0] > 0.5, expected) > 0.9
    assert set(masks.unique().tolist()) <= {0.0, 1.0}


def test_rembg_mask_exact_on_box_images(session) -> None:
    for height, width, channels in [(64, 96, 3), (96, 40, 1), (50, 50, 4)]:
        box = (10, 12, 40, 30)
        image = box_image(height, width, box, channels)
        if channels == 4:
            image[..., 3] = 1.0  # all opaque: no cut-out, so rembg runs on the RGB
        masks, _ = masker.object_masks(image, lambda: session)
        assert torch.equal(masks[0], box_mask(height, width, box)), (height, width, channels)


# --- RGBA alpha path -----------------------------------------------------------------------------------


def test_rgba_cutout_uses_alpha_not_rembg(test_images: dict, warm_session) -> None:
    image_path, mask_path = test_images["rgba"]
    image = load_image(image_path)
    assert image.shape[-1] == 4
    alpha = image[..., 3]
    masks, _ = masker.object_masks(image, lambda: pytest.fail("rembg ran on an RGBA cut-out"), threshold=0.5)
    assert torch.equal(masks[0], (alpha > 0.5).float())
    assert iou(masks[0] > 0.5, load_mask(mask_path)) > 0.99
    # The same picture without its alpha goes through rembg, which finds about the same object.
    from_rgb, _ = masker.object_masks(image[..., :3], lambda: warm_session)
    assert iou(from_rgb[0] > 0.5, load_mask(mask_path)) > 0.9
    assert not torch.equal(from_rgb, masks)


def test_rgba_alpha_wins_over_a_model_that_sees_another_object(session) -> None:
    # The RGB shows a box at the top left; the alpha cuts out a box at the bottom right.
    image = box_image(64, 80, (4, 4, 20, 30), channels=4)
    image[..., 3] = box_mask(64, 80, (40, 50, 60, 76))
    from_rgb, _ = masker.object_masks(image[..., :3], lambda: session)
    from_rgba, _ = masker.object_masks(image, lambda: session)
    assert torch.equal(from_rgb[0], box_mask(64, 80, (4, 4, 20, 30)))
    assert torch.equal(from_rgba[0], box_mask(64, 80, (40, 50, 60, 76)))


@pytest.mark.parametrize("alpha_value", [0.0, 1.0])
def test_rgba_without_cutout_runs_rembg(session, alpha_value: float) -> None:
    image = box_image(48, 48, (8, 8, 24, 40), channels=4)
    image[..., 3] = alpha_value
    masks, _ = masker.object_masks(image, lambda: session)
    assert torch.equal(masks[0], box_mask(48, 48, (8, 8, 24, 40)))


def test_grey_alpha_two_channels() -> None:
    image = torch.zeros(30, 40, 2)
    image[..., 1] = box_mask(30, 40, (5, 5, 25, 20))
    masks, whites = masker.object_masks(image, lambda: pytest.fail("rembg ran"))
    assert torch.equal(masks[0], image[..., 1])
    assert torch.equal(whites[0, 10, 10], torch.zeros(3)) and torch.equal(whites[0, 0, 39], torch.ones(3))


# --- threshold, grow, invert ---------------------------------------------------------------------------


def test_threshold_binarises_or_keeps_soft() -> None:
    soft = torch.linspace(0, 1, 11).reshape(1, 11)
    assert torch.equal(masker.refine_mask(soft, threshold=0.0), soft)
    assert torch.equal(masker.refine_mask(soft, threshold=0.5), (soft > 0.5).float())
    assert masker.refine_mask(soft, threshold=0.5).sum().item() == 5  # 0.6 .. 1.0
    with pytest.raises(MomaError, match="threshold"):
        masker.refine_mask(soft, threshold=1.5)


@pytest.mark.parametrize("grow", [1, 2, 5, -1, -2, -5])
def test_grow_and_shrink_by_a_ring(grow: int) -> None:
    box = (20, 30, 40, 70)  # 20 x 40
    grown = masker.refine_mask(box_mask(64, 100, box), grow=grow)
    top, left, bottom, right = box
    assert torch.equal(grown, box_mask(64, 100, (top - grow, left - grow, bottom + grow, right + grow)))
    assert grown.sum().item() == (20 + 2 * grow) * (40 + 2 * grow)


def test_grow_at_borders_and_beyond_image() -> None:
    touching = box_mask(32, 32, (0, 0, 10, 32))  # touches three borders
    assert torch.equal(masker.refine_mask(touching, grow=-2), box_mask(32, 32, (0, 0, 8, 32)))
    dot = box_mask(16, 24, (5, 5, 6, 6))
    assert torch.equal(masker.refine_mask(dot, grow=100), torch.ones(16, 24))
    assert masker.refine_mask(dot, grow=-100).sum().item() == 0


def test_soft_grow_is_grey_dilation() -> None:
    soft = torch.zeros(1, 9, 9)
    soft[0, 4, 4] = 0.7
    grown = masker.refine_mask(soft, threshold=0.0, grow=1)
    assert torch.equal(grown[0, 3:6, 3:6], torch.full((3, 3), 0.7)) and grown.sum().item() == pytest.approx(6.3)


def test_invert_applies_after_grow() -> None:
    mask = box_mask(20, 20, (5, 5, 15, 15))
    out = masker.refine_mask(mask, grow=2, invert=True)
    assert torch.equal(out, 1.0 - box_mask(20, 20, (3, 3, 17, 17)))


# --- optional input mask -------------------------------------------------------------------------------


def test_input_mask_is_refined_without_rembg() -> None:
    images = box_image(40, 60, (0, 0, 40, 60)).expand(2, -1, -1, -1)  # uniform: rembg would find nothing
    given = torch.stack([box_mask(40, 60, (10, 10, 20, 20)), box_mask(40, 60, (5, 30, 35, 50))]) * 0.8
    masks, whites = masker.object_masks(
        images, lambda: pytest.fail("rembg ran with a mask given"), input_mask=given, grow=1, invert=False
    )
    assert torch.equal(masks[0], box_mask(40, 60, (9, 9, 21, 21)))
    assert torch.equal(masks[1], box_mask(40, 60, (4, 29, 36, 51)))
    assert torch.equal(whites[0][masks[0] == 0], torch.ones(int((masks[0] == 0).sum()), 3))


def test_input_mask_broadcast_resize_and_mismatch() -> None:
    images = torch.rand(3, 32, 48, 3)
    small = box_mask(16, 24, (4, 6, 12, 18))  # half size, one mask for three images
    masks, _ = masker.object_masks(images, lambda: pytest.fail("rembg ran"), input_mask=small)
    assert masks.shape == (3, 32, 48)
    assert iou(masks[2], box_mask(32, 48, (8, 12, 24, 36))) > 0.9
    one_image = torch.rand(32, 48, 3)
    masks, whites = masker.object_masks(one_image, lambda: None, input_mask=torch.ones(2, 32, 48))
    assert masks.shape == (2, 32, 48) and whites.shape == (2, 32, 48, 3)
    with pytest.raises(MomaError, match="mask batch"):
        masker.object_masks(images, lambda: None, input_mask=torch.ones(2, 32, 48))


def test_bad_image_shapes() -> None:
    with pytest.raises(MomaError, match="channels"):
        masker.object_masks(torch.rand(1, 8, 8, 5), lambda: None)
    with pytest.raises(MomaError, match="shape"):
        masker.object_masks(torch.rand(8, 8), lambda: None)


# --- white background ----------------------------------------------------------------------------------


def test_white_background_formula() -> None:
    image = torch.rand(2, 12, 16, 3)
    mask = torch.rand(2, 12, 16)
    white = masker.white_background(image, mask)
    assert torch.allclose(white, image * mask[..., None] + (1 - mask[..., None]))
    grey = torch.rand(12, 16, 1)
    assert masker.white_background(grey, torch.ones(12, 16)).shape == (12, 16, 3)
    assert torch.equal(masker.white_background(grey, torch.zeros(12, 16)), torch.ones(12, 16, 3))


# --- model files -----------------------------------------------------------------------------------------


def test_find_model_file_accepts_rembg_release_name(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_u2net_onnx(second / "BiRefNet-general-epoch_244.onnx", rule="corner")
    assert masker.find_model_file("birefnet-general", [first, second]) == second / "BiRefNet-general-epoch_244.onnx"
    assert masker.find_model_file("u2net", [first, second]) is None
    with pytest.raises(MomaError, match="Unknown rembg model 'u3net'.*isnet-general-use"):
        masker.find_model_file("u3net", [first])


def test_missing_model_offline_names_file_folder_and_source(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(masker.BASE_URL_ENV, "http://127.0.0.1:9/v0.0.0")  # closed port: refused at once
    home = tmp_path / "home"
    home.mkdir()
    for variable in ("U2NET_HOME", "REMBG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(home))
    folder = tmp_path / "models" / "rembg"
    started = time.perf_counter()
    with pytest.raises(MomaError) as caught:
        masker.resolve_model_file("isnet-general-use", [str(folder)])
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "isnet-general-use.onnx" in message
    assert str(folder) in message
    assert "http://127.0.0.1:9/v0.0.0/isnet-general-use.onnx" in message
    assert not any(folder.iterdir())  # no partial file left behind
    assert not any(home.iterdir())  # rembg's own download (~/.u2net, ~/.rembg) never ran


def test_default_source_is_rembgs_release() -> None:
    assert (
        masker.REMBG_MODELS["u2net"].url() == "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx"
    )


@pytest.fixture()
def local_server(tmp_path: Path):
    """Serves tmp_path/served over http://127.0.0.1:<port>/."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_checksum_and_reports_progress(local_server, tmp_path: Path, monkeypatch) -> None:
    served, base = local_server
    source = write_u2net_onnx(served / "u2net.onnx", rule="corner")
    monkeypatch.setenv(masker.BASE_URL_ENV, base)
    folder = tmp_path / "models" / "rembg"

    # The stand-in is not the real u2net: rembg's md5 rejects it and nothing is kept.
    with pytest.raises(MomaError, match="md5.*60024c5c889badc19c04ad937298a77b"):
        masker.download_model("u2net", folder)
    assert not any(folder.iterdir())

    # With the stand-in's own md5 in the table the download lands, reporting progress.
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    monkeypatch.setitem(masker.REMBG_MODELS, "u2net", masker.RembgModel("u2net", "u2net.onnx", f"md5:{md5}"))
    progress: list[tuple[int, int | None]] = []
    path = masker.resolve_model_file("u2net", [folder], progress=lambda done, total: progress.append((done, total)))
    assert path == folder / "u2net.onnx" and path.read_bytes() == source.read_bytes()
    assert progress[-1] == (source.stat().st_size, source.stat().st_size)
    session = masker.load_rembg_session("u2net", path, providers=CPU)
    masks, _ = masker.object_masks(box_image(40, 40, (10, 10, 30, 30)), lambda: session)
    assert torch.equal(masks[0], box_mask(40, 40, (10, 10, 30, 30)))


# --- bad model files -------------------------------------------------------------------------------------


def test_corrupt_model_file_is_a_moma_error(tmp_path: Path) -> None:
    path = tmp_path / "u2net.onnx"
    path.write_bytes(b"<html>not a model</html>")
    with pytest.raises(MomaError, match=r"onnxruntime could not load the rembg model .*u2net\.onnx"):
        masker.load_rembg_session("u2net", path, providers=CPU)


def test_wrong_output_shape_is_a_moma_error(tmp_path: Path) -> None:
    path = write_u2net_onnx(tmp_path / "u2net.onnx", rule="corner", output_rank=3)
    session = masker.load_rembg_session("u2net", path, providers=CPU)
    with pytest.raises(MomaError, match="rembg model u2net failed on a 20x10 image"):
        masker.object_masks(torch.rand(10, 20, 3), lambda: session)
