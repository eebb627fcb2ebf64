"""``--gui``: ComfyUI's web UI with the pack, from the installed host, on 127.0.0.1.

The base directory is the host's ``base/`` (``demo-base/`` with --demo, or --base-dir): the pack is linked
into its custom_nodes/, the sample reference picture the example workflows load is copied into its input/
(unless a file of that name is there), the database is a file in its user/ folder, and with --demo the
tiny stand-in models are linked under every file name the example workflows use, and every queued graph is
shrunk to the demo's sizes (demo_gui_nodes/moma_demo_sizes.py, loaded by ComfyUI from a custom-node folder
named in an extra-paths file in user/). ComfyUI's own main.py then replaces this process (through
comfy_main.py, which keeps internals out of the log).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from . import boot
from .common import API_DIR, PACK_LINK_NAME, REPO, RunnerError, default_base_dir, host_dir, place_samples
from .demo import DEMO_SIZE, DEMO_STEPS, demo_model_builders, link_demo_models

LISTEN = "127.0.0.1"
DEMO_NODES_DIR = Path(__file__).resolve().parent / "demo_gui_nodes"  # custom-node folder of --gui --demo only
DEMO_PATHS_FILE = "moma-demo-paths.yaml"  # written into the base's user/: names DEMO_NODES_DIR for ComfyUI


def comfy_arguments(base_dir: Path, port: int, cpu: bool, demo: bool = False) -> list[str]:
    """ComfyUI's main.py arguments for the GUI."""
    arguments = [
        "--listen",
        LISTEN,
        "--port",
        str(port),
        "--base-directory",
        str(base_dir),
        "--database-url",
        f"sqlite:///{base_dir / 'user' / 'comfyui.db'}",
        "--disable-auto-launch",
    ]
    if cpu:
        arguments.append("--cpu")
        if demo:  # the demo's random UNet held in fp8 (ComfyUI computes in fp32): 0.8 GB (see inprocess.py)
            arguments.append("--fp8_e4m3fn-unet")
    if demo:
        arguments += ["--extra-model-paths-config", str(base_dir / "user" / DEMO_PATHS_FILE)]
    return arguments


def write_demo_paths(base_dir: Path) -> Path:
    """The extra-paths file that adds DEMO_NODES_DIR to ComfyUI's custom-node folders (absolute: every ComfyUI
    version reads it the same way)."""
    path = base_dir / "user" / DEMO_PATHS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"moma_demo_gui:\n  custom_nodes: {json.dumps(str(DEMO_NODES_DIR))}\n", encoding="utf-8")
    return path


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LISTEN, port))
        except OSError:
            return False
    return True


def link_demo_models_for_examples(comfy_root: Path, base_dir: Path) -> None:
    """--demo: the tiny stand-ins under every model name an example workflow uses."""
    from .models import load_models_table, model_uses
    from .workflow import load_workflow

    boot.configure(comfy_root, base_dir, cpu=True)  # the checkpoint writer builds ComfyUI's own modules
    table = load_models_table()
    uses = {}
    for path in sorted(API_DIR.glob("*.json")):
        for use in model_uses(load_workflow(path), table["loader_inputs"]):
            uses.setdefault((use.folder, use.name), use)
    link_demo_models(base_dir / "models", list(uses.values()), demo_model_builders())


def serve(args: argparse.Namespace) -> int:
    """Start the GUI (replaces this process with ComfyUI; returns only on an error)."""
    comfy_root = (args.comfyui or host_dir() / "ComfyUI").resolve()
    if not (comfy_root / "main.py").is_file():
        raise RunnerError(
            f"No ComfyUI found at {comfy_root}. Run `bash scripts/setup_host.sh` (or pass --comfyui "
            "with your ComfyUI folder)."
        )
    base_dir = default_base_dir(args) or comfy_root
    if not port_free(args.port):
        raise RunnerError(
            f"Port {args.port} on {LISTEN} is in use (another ComfyUI?). Open "
            f"http://{LISTEN}:{args.port} or pass --port N."
        )
    link = boot.make_base_dir(base_dir)
    if link is not None:
        print(f"linked the pack into {link}")
    for placed in place_samples(base_dir / "input"):
        print(f"sample picture: {placed}")
    if args.demo:
        print(f"demo: tiny random-weight models in {base_dir / 'models'} (images are noise)")
        link_demo_models_for_examples(comfy_root, base_dir)
        write_demo_paths(base_dir)
        print(
            f"demo: each queued run is shrunk to {DEMO_SIZE}x{DEMO_SIZE} pixels and {DEMO_STEPS} steps, under a "
            "minute on a CPU (the workflows keep their settings; real models run them as saved)"
        )
    cpu = args.cpu or not boot.has_accelerator()
    command = [
        sys.executable,
        "-m",
        "moma_runner.comfy_main",
        str(comfy_root),
        *comfy_arguments(base_dir, args.port, cpu, bool(args.demo)),
    ]
    print(f"ComfyUI {comfy_root} with the pack, base directory {base_dir}, on {'CPU' if cpu else 'GPU'}")
    print(
        f"open http://{LISTEN}:{args.port}  (the example workflows: Workflow > Browse Templates > {PACK_LINK_NAME}; "
        "Ctrl-C stops the server)",
        flush=True,
    )
    tools = str(REPO / "tools")
    env = {**os.environ, "PYTHONPATH": tools + os.pathsep + os.environ.get("PYTHONPATH", "")}
    os.chdir(tools)  # `-m` puts the working directory first on sys.path: tools/, never the pack's root
    os.execve(sys.executable, command, env)
    return 1  # not reached
