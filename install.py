"""Install the pack's Python dependencies into the Python that runs ComfyUI.

ComfyUI-Manager runs this file after cloning the pack; by hand: ``python install.py`` with ComfyUI's
Python (the embedded one on Windows portable builds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    """pip-install requirements.txt, then compile rembg's kernels once; pip's exit status."""
    requirements = Path(__file__).resolve().parent / "requirements.txt"
    command = [sys.executable, "-m", "pip", "install", "-r", str(requirements)]
    print("[comfyui-moma]", " ".join(command))
    status = subprocess.call(command)
    if status == 0:
        # rembg imports pymatting, whose numba kernels compile at the first import (about a minute) and are
        # cached: done here, the Object Masker's first run in ComfyUI does not stall on it.
        print("[comfyui-moma] compiling rembg's matting kernels once (about a minute)")
        if subprocess.call([sys.executable, "-c", "import rembg.bg"]) != 0:
            print("[comfyui-moma] rembg did not import: the Object Masker will report why when it runs")
    return status


if __name__ == "__main__":
    sys.exit(main())
