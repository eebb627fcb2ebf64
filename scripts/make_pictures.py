#!/usr/bin/env python3
"""Make the README's pictures (docs/*.png) with the project's own tools, on the demo's random-weight models.

    .host/comfyui-0.30/venv/bin/python scripts/make_pictures.py [--out docs]

1. the demo through the runner (scripts/run_workflow.py --demo) on the sample reference picture and its
   mask (the demo's stand-in rembg is random too), with the Object Masker's mask and white-background
   picture saved too: docs/demo_outputs.png, labelled;
2. ComfyUI's web app from `run_workflow.py --gui --demo`, in headless Chromium, with the MoMA context
   example loaded: docs/graph_moma_context.png (what the real frontend draws);
3. the help pages' small pictures (web/docs/images/), cut from those two: the Object Masker's input and outputs,
   and the example graph (`--help-pictures-only` makes just these, from the docs/*.png already there).
Prints the demo's peak RSS (the figure in README's Requirements).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tools"))

from moma_demo import browser  # noqa: E402
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

RUNNER = REPO / "scripts" / "run_workflow.py"
WORKFLOW = REPO / "workflows" / "api" / "moma_context.json"
SAMPLE = REPO / "workflows" / "input"
TILE = 256


def demo_graph(path: Path) -> None:
    """The MoMA context example with the Object Masker's two outputs saved as images too."""
    prompt = json.loads(WORKFLOW.read_text())
    (masker,) = [nid for nid, node in prompt.items() if node["class_type"] == "MomaObjectMasker"]
    prompt["101"] = {"class_type": "MaskToImage", "inputs": {"mask": [masker, 0]}, "_meta": {"title": "mask"}}
    prompt["102"] = {"class_type": "SaveImage", "inputs": {"images": ["101", 0], "filename_prefix": "doc_mask"}}
    prompt["103"] = {"class_type": "SaveImage", "inputs": {"images": [masker, 1], "filename_prefix": "doc_white"}}
    path.write_text(json.dumps(prompt))


def run_demo(work: Path) -> dict[str, Path]:
    graph = work / "graph.json"
    demo_graph(graph)
    out = work / "out"
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            str(graph),
            "--demo",
            "--cpu",
            "--base-dir",
            str(work / "base"),
            "--output",
            str(out),
            "--image",
            str(SAMPLE / "moma_reference.jpg"),
            "--mask",
            str(SAMPLE / "moma_reference_mask.png"),
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "4",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    print(result.stdout)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 / 1024
    print(f"demo: {time.perf_counter() - started:.0f}s, peak RSS {peak:.1f} GB")
    images = [Path(line.strip()) for line in result.stdout.split("images:\n", 1)[1].splitlines() if line.strip()]
    found = {
        "mask": next(p for p in images if p.name.startswith("doc_mask")),
        "white": next(p for p in images if p.name.startswith("doc_white")),
        "result": next(p for p in images if not p.name.startswith("doc_")),
    }
    found["reference"] = SAMPLE / "moma_reference.jpg"
    return found


def labelled_strip(files: dict[str, Path], target: Path) -> None:
    labels = [
        ("reference", "reference (sample picture)"),
        ("mask", "object mask (its mask, Object Masker)"),
        ("white", "what LLaVA sees"),
        ("result", "result: noise (random test weights)"),
    ]
    strip = Image.new("RGB", (TILE * len(labels), TILE + 44), "white")
    draw = ImageDraw.Draw(strip)
    for i, (key, text) in enumerate(labels):
        with Image.open(files[key]) as picture:
            tile = ImageOps.contain(picture.convert("RGB"), (TILE, TILE))
        strip.paste(tile, (i * TILE + (TILE - tile.width) // 2, 0))
        draw.text((i * TILE + 8, TILE + 6), text, fill="black")
    draw.text(
        (8, TILE + 24),
        "Made by scripts/make_pictures.py on the demo's tiny random-weight models: they show the "
        "graph executing, not MoMA's quality.",
        fill=(90, 90, 90),
    )
    strip.save(target, optimize=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graph_screenshot(work: Path, target: Path) -> None:
    port, debug_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}/"
    log = open(work / "gui.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            str(RUNNER),
            "--gui",
            "--demo",
            "--cpu",
            "--port",
            str(port),
            "--base-dir",
            str(work / "base"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "system_stats", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "gui.log").read_text()) from None
                time.sleep(0.5)
        # a first visit opens the template browser over the graph; a returning user's setting does not
        for setting, value in (("Comfy.TutorialCompleted", b"true"), ("Comfy.Minimap.Visible", b"false")):
            request = urllib.request.Request(
                url + f"settings/{setting}", data=value, method="POST", headers={"Content-Type": "application/json"}
            )
            urllib.request.urlopen(request, timeout=10).close()
        ui = json.loads((REPO / "workflows" / "moma_context.json").read_text())
        raw = work / "graph_raw.png"
        with browser.headless_chromium(url, debug_port, work / "profile", size=(2700, 1350)):
            asyncio.run(browser.frontend_round_trip(url, debug_port, {"moma_context": ui}, {"moma_context": raw}))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    with Image.open(raw) as picture:
        picture = picture.convert("RGB")
    # the graph without the empty canvas around it: the bounding box of what differs from the canvas colour
    margin = 90  # the sidebar, the tab bar and the canvas controls stay out
    inner = picture.crop((margin, margin, picture.width - margin, picture.height - margin)).convert("L")
    histogram = inner.histogram()
    background = max(range(256), key=histogram.__getitem__)  # the canvas: the commonest grey
    box = inner.point(lambda v: 255 if abs(v - background) > 12 else 0).getbbox()
    if box:
        pad = 24
        picture = picture.crop(
            (
                max(box[0] + margin - pad, 0),
                max(box[1] + margin - pad, 0),
                min(box[2] + margin + pad, picture.width),
                min(box[3] + margin + pad, picture.height),
            )
        )
    if picture.width > 1600:
        picture = picture.resize((1600, round(picture.height * 1600 / picture.width)), Image.LANCZOS)
    picture.save(target, optimize=True)


def help_pictures(docs: Path, target: Path) -> None:
    """The help pages' pictures, small enough for the node library's side panel."""
    target.mkdir(parents=True, exist_ok=True)
    with Image.open(docs / "demo_outputs.png") as strip:
        masker = strip.convert("RGB").crop((0, 0, 3 * TILE, TILE))  # reference, object mask, what LLaVA sees
    masker.resize((3 * 160, 160), Image.LANCZOS).save(target / "object_masker.png", optimize=True)
    with Image.open(docs / "graph_moma_context.png") as graph:
        graph = graph.convert("RGB")
        graph = graph.resize((960, round(graph.height * 960 / graph.width)), Image.LANCZOS)
    graph.quantize(colors=128).save(target / "moma_context_graph.png", optimize=True)
    for name in ("object_masker.png", "moma_context_graph.png"):
        print(target / name, (target / name).stat().st_size // 1024, "KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument(
        "--help-pictures-only",
        action="store_true",
        help="only cut the help pages' pictures (web/docs/images) from the docs/*.png already there",
    )
    opts = parser.parse_args()
    if opts.help_pictures_only:
        help_pictures(opts.out, REPO / "web" / "docs" / "images")
        return
    opts.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moma-pictures-") as tmp:
        work = Path(tmp)
        labelled_strip(run_demo(work), opts.out / "demo_outputs.png")
        graph_screenshot(work, opts.out / "graph_moma_context.png")
    for name in ("demo_outputs.png", "graph_moma_context.png"):
        print(opts.out / name, (opts.out / name).stat().st_size // 1024, "KB")
    help_pictures(opts.out, REPO / "web" / "docs" / "images")


if __name__ == "__main__":
    main()
