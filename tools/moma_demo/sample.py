"""The sample reference pictures the example workflows load and their masks: ``moma_reference.jpg`` (a red
toy car) and, for the two-subject example, ``moma_reference_teddy.jpg`` (a brown teddy bear).

Drawn with PIL on a plain light background: made by this script, free of any licence, deterministic (same
bytes on every run with the same Pillow). Written to workflows/input/ by

    python tools/moma_demo/sample.py [FOLDER]

and copied from there into ComfyUI's input folder by ``run.sh --gui`` and the runner.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 512
SCALE = 4  # drawn at 4x and reduced: smooth edges without any randomness
REFERENCE_NAME, MASK_NAME = "moma_reference.jpg", "moma_reference_mask.png"
TEDDY_NAME, TEDDY_MASK_NAME = "moma_reference_teddy.jpg", "moma_reference_teddy_mask.png"
FUR, MUZZLE, EYE = (150, 98, 52), (214, 176, 128), (28, 22, 20)
BACKGROUND = (236, 233, 226)
BODY, CABIN, GLASS, TYRE, HUB, LIGHT = (
    (196, 30, 36),
    (176, 24, 30),
    (150, 196, 222),
    (34, 34, 38),
    (190, 190, 196),
    (250, 226, 120),
)


def _shapes(draw: ImageDraw.ImageDraw, colour: bool) -> None:
    """The car; ``colour=False`` draws every part white (the mask)."""
    s = SCALE

    def c(value: tuple[int, int, int]) -> tuple[int, int, int] | int:
        return value if colour else 255

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    draw.rounded_rectangle(box(56, 236, 456, 338), radius=34 * s, fill=c(BODY))  # body
    draw.polygon([(150 * s, 240 * s), (196 * s, 160 * s), (330 * s, 160 * s), (386 * s, 240 * s)], fill=c(CABIN))
    if colour:
        draw.polygon([(172 * s, 236 * s), (206 * s, 176 * s), (258 * s, 176 * s), (258 * s, 236 * s)], fill=GLASS)
        draw.polygon([(272 * s, 236 * s), (272 * s, 176 * s), (322 * s, 176 * s), (362 * s, 236 * s)], fill=GLASS)
        draw.rounded_rectangle(box(430, 258, 452, 282), radius=6 * s, fill=LIGHT)  # headlight
        draw.line([(262 * s, 250 * s), (262 * s, 330 * s)], fill=(150, 20, 26), width=3 * s)  # door
    for cx in (148, 368):  # wheels
        draw.ellipse(box(cx - 50, 288, cx + 50, 388), fill=c(TYRE))
        if colour:
            draw.ellipse(box(cx - 24, 314, cx + 24, 362), fill=HUB)


def _teddy(draw: ImageDraw.ImageDraw, colour: bool) -> None:
    """A sitting teddy bear; ``colour=False`` draws every part white (the mask)."""
    s = SCALE

    def circle(cx: float, cy: float, rx: float, ry: float, fill: tuple[int, int, int]) -> None:
        draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], fill=fill if colour else 255)

    for cx in (186, 326):  # ears, legs, arms (behind the body and head)
        circle(cx, 110, 36, 36, FUR)
        circle(cx, 382, 56, 44, FUR)
    circle(136, 268, 38, 64, FUR)
    circle(376, 268, 38, 64, FUR)
    circle(256, 300, 104, 112, FUR)  # body
    circle(256, 170, 92, 84, FUR)  # head
    if colour:
        for cx in (186, 326):
            circle(cx, 110, 18, 18, MUZZLE)  # inner ears
            circle(cx, 394, 30, 24, MUZZLE)  # paws
        circle(256, 310, 60, 66, MUZZLE)  # belly
        circle(256, 200, 38, 30, MUZZLE)  # muzzle
        circle(256, 188, 13, 10, EYE)  # nose
        circle(222, 150, 9, 9, EYE)
        circle(290, 150, 9, 9, EYE)


def _render(shapes, shadow: list[int]) -> tuple[Image.Image, Image.Image]:
    big = SIZE * SCALE
    picture = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    draw.ellipse([value * SCALE for value in shadow], fill=(214, 210, 202))  # soft shadow
    shapes(draw, colour=True)
    mask = Image.new("L", (big, big), 0)
    shapes(ImageDraw.Draw(mask), colour=False)
    picture = picture.filter(ImageFilter.GaussianBlur(SCALE / 2)).resize((SIZE, SIZE), Image.LANCZOS)
    mask = mask.resize((SIZE, SIZE), Image.LANCZOS).point(lambda v: 255 if v >= 128 else 0)
    return picture, mask


def render() -> tuple[Image.Image, Image.Image]:
    """(RGB reference, mode-L mask: 255 = car) at SIZE x SIZE."""
    return _render(_shapes, [60, 368, 452, 404])


def render_teddy() -> tuple[Image.Image, Image.Image]:
    """(RGB reference, mode-L mask: 255 = teddy bear) at SIZE x SIZE."""
    return _render(_teddy, [110, 404, 402, 440])


def write_sample(folder: Path) -> list[Path]:
    """Write each reference (JPEG, quality 92) and its mask (PNG) into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for draw, name, mask_name in ((render, REFERENCE_NAME, MASK_NAME), (render_teddy, TEDDY_NAME, TEDDY_MASK_NAME)):
        picture, mask = draw()
        reference, mask_path = folder / name, folder / mask_name
        picture.save(reference, quality=92, optimize=True)
        mask.save(mask_path, optimize=True)
        paths += [reference, mask_path]
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "workflows" / "input"
    for path in write_sample(target):
        print(path)
