"""Cut-out PNGs through ComfyUI's own Load Image into MoMA Object Masker, as the node's description says: Load Image
drops the alpha from its IMAGE (rembg then runs on the whole picture), its MASK is the transparency (1 = background);
Join Image with Alpha (IMAGE + MASK) gives the Masker an RGBA IMAGE whose alpha it uses, and a picture without
transparency still goes to rembg that way; Load Image's MASK into ``mask`` with ``invert`` on gives the cut-out too,
and a constant connected mask (Load Image's MASK of a picture without transparency) is warned about.
Graphs run through ComfyUI's real validator and executor, rembg on the tiny u2net-shaped stand-in ("corner" rule:
everything that differs from the top-left pixel)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from comfy_exec import run_api_workflow
from moma_demo.rembg import write_u2net_onnx
from PIL import Image

HEIGHT, WIDTH = 64, 96
OBJECT = (slice(12, 44), slice(20, 50))  # the cut-out: opaque in the alpha
OTHER = (slice(40, 60), slice(64, 90))  # another box, transparent in the alpha: rembg (corner rule) finds it too


def boxes(region: tuple[slice, slice] | None = None) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for box in (OBJECT, OTHER) if region is None else (region,):
        mask[box] = True
    return mask


def picture(alpha: bool) -> Image.Image:
    """Grey background and two red boxes; with ``alpha`` only the first (the object) is opaque."""
    rgb = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    rgb[OBJECT] = rgb[OTHER] = (230, 50, 20)
    image = Image.fromarray(rgb)
    if alpha:
        image.putalpha(Image.fromarray(np.where(boxes(OBJECT), 255, 0).astype(np.uint8)))
    return image


@pytest.fixture()
def corner_rembg(comfy_host):
    """models/rembg/u2net.onnx = the corner-rule stand-in (whatever was there is put back afterwards)."""
    folder = comfy_host.models_dir / "rembg"
    folder.mkdir(parents=True, exist_ok=True)
    path, backup = folder / "u2net.onnx", folder / "u2net.onnx.before-cutout-test"
    if path.exists() or path.is_symlink():
        os.replace(path, backup)
    write_u2net_onnx(path, rule="corner")
    yield path
    path.unlink()
    if backup.exists() or backup.is_symlink():
        os.replace(backup, path)


@pytest.fixture()
def pictures(comfy_host) -> dict[str, str]:
    names = {"cutout": "masker_cutout_rgba.png", "plain": "masker_cutout_rgb.png"}
    picture(alpha=True).save(comfy_host.base_dir / "input" / names["cutout"])
    picture(alpha=False).save(comfy_host.base_dir / "input" / names["plain"])
    return names


def mask_of(comfy_host, image_name: str, wiring: str, invert: bool = False) -> np.ndarray:
    """Load Image -> (``wiring``) -> MoMA Object Masker -> its mask, saved through MaskToImage + SaveImage.

    wiring: 'image' (Load Image's IMAGE only), 'join' (IMAGE + MASK through Join Image with Alpha), 'mask' (IMAGE
    into image, Load Image's MASK into mask)."""
    masker_inputs = {"image": ["load", 0], "rembg_model": "u2net", "threshold": 0.5, "grow": 0, "invert": invert}
    prompt = {
        "load": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "masker": {"class_type": "MomaObjectMasker", "inputs": masker_inputs},
        "as_image": {"class_type": "MaskToImage", "inputs": {"mask": ["masker", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["as_image", 0], "filename_prefix": "moma_cutout"}},
    }
    if wiring == "join":
        prompt["join"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["load", 0], "alpha": ["load", 1]}}
        masker_inputs["image"] = ["join", 0]
    elif wiring == "mask":
        masker_inputs["mask"] = ["load", 1]
    (entry,) = run_api_workflow(prompt)["save"]["images"]
    with Image.open(comfy_host.base_dir / "output" / entry["subfolder"] / entry["filename"]) as saved:
        return np.asarray(saved)[..., 0] > 127


def test_load_image_alone_gives_no_alpha_so_rembg_cuts_the_whole_picture(comfy_host, corner_rembg, pictures):
    """The limitation the description names: Load Image's IMAGE of a cut-out PNG is RGB, rembg sees both boxes."""
    assert np.array_equal(mask_of(comfy_host, pictures["cutout"], "image"), boxes())


def test_join_image_with_alpha_hands_the_cut_out_to_the_masker(comfy_host, corner_rembg, pictures):
    assert np.array_equal(mask_of(comfy_host, pictures["cutout"], "join"), boxes(OBJECT))
    # a picture without transparency the same way: an all-opaque alpha is no cut-out, rembg runs
    assert np.array_equal(mask_of(comfy_host, pictures["plain"], "join"), boxes())


def test_load_image_mask_with_invert_gives_the_cut_out(comfy_host, corner_rembg, pictures):
    assert np.array_equal(mask_of(comfy_host, pictures["cutout"], "mask", invert=True), boxes(OBJECT))
    assert np.array_equal(mask_of(comfy_host, pictures["cutout"], "mask"), ~boxes(OBJECT))  # the transparency


def test_a_constant_connected_mask_is_warned_about(comfy_host, corner_rembg, pictures, caplog):
    """Load Image's MASK of a picture without transparency is all 0: inverted, the whole picture. Said once."""
    with caplog.at_level(logging.WARNING):
        whole = mask_of(comfy_host, pictures["plain"], "mask", invert=True)
    assert whole.all()
    (warning,) = [r.getMessage() for r in caplog.records if "MoMA Object Masker: the connected mask" in r.getMessage()]
    assert "is 0 everywhere" in warning and "the object is the whole picture" in warning
    assert "Join Image with Alpha" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mask_of(comfy_host, pictures["cutout"], "mask", invert=True)
    assert not [r for r in caplog.records if "MoMA Object Masker: the connected mask" in r.getMessage()]


def test_the_node_says_what_works_for_cut_outs(comfy_host):
    import nodes

    schema = nodes.NODE_CLASS_MAPPINGS["MomaObjectMasker"].GET_SCHEMA()
    tooltips = {item.id: item.tooltip for item in schema.inputs}
    assert "Join Image with Alpha" in schema.description and "'invert' on" in schema.description
    assert "Load Image's IMAGE has no alpha" in tooltips["image"] and "Join Image with Alpha" in tooltips["image"]
    assert "with invert on" in tooltips["mask"] and "Join Image with Alpha" in tooltips["mask"]
