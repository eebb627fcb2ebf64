"""Paths (the checkout's, the host's, the base directory's), exit codes and the user-facing error of the runner."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the pack's checkout (tools/moma_runner -> repo root)
# Example workflows: UI format (listed by ComfyUI's template browser) in workflows/, API format in its api/.
EXAMPLES_DIR = REPO / "workflows"
API_DIR = EXAMPLES_DIR / "api"
DEFAULT_WORKFLOW = API_DIR / "moma_context.json"
SAMPLE_DIR = EXAMPLES_DIR / "input"  # the pictures the examples load, and their masks (tools/moma_demo/sample.py)
MODELS_TABLE = REPO / "models.json"
# The pack's folder under custom_nodes/ in the bases the runner and the tests make: the name a ComfyUI-Manager or
# registry install gives it (pyproject.toml's name), under which ComfyUI lists its example workflows.
PACK_LINK_NAME = "comfyui-moma"
LEGACY_LINK_NAMES = ("comfyui_moma",)  # earlier runner and setup_host.sh versions linked it under this name
DEFAULT_COMFYUI = "0.30"  # the host version scripts/setup_host.sh installs by default

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3


class RunnerError(Exception):
    """A user-facing failure: printed without a traceback, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def host_dir() -> Path:
    """The host scripts/setup_host.sh installs (MOMA_HOST_DIR, default <repo>/.host/comfyui-<MOMA_COMFYUI|0.30>)."""
    version = os.environ.get("MOMA_COMFYUI", DEFAULT_COMFYUI)
    return Path(os.environ.get("MOMA_HOST_DIR", REPO / ".host" / f"comfyui-{version}"))


def default_base_dir(args: argparse.Namespace) -> Path | None:
    """The base directory the in-process runner and --gui use."""
    if args.base_dir is not None:
        return args.base_dir.resolve()
    if args.demo:
        return host_dir() / "demo-base"
    if args.comfyui is not None:
        return None  # a user's own install: its own models/, input/, output/
    return host_dir() / "base"


def place_samples(input_dir: Path) -> list[Path]:
    """Copy the sample reference picture and mask into ``input_dir`` where no file of that name exists."""
    placed = []
    input_dir.mkdir(parents=True, exist_ok=True)
    for sample in sorted(SAMPLE_DIR.iterdir()):
        target = input_dir / sample.name
        if sample.is_file() and not target.exists():
            shutil.copyfile(sample, target)
            placed.append(target)
    return placed


def rel(path: Path) -> str:
    """``path`` relative to the checkout when inside it (for messages), else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
