"""Install the pack's Python dependencies into the Python that runs ComfyUI.

ComfyUI-Manager runs this file after cloning the pack; by hand: ``python install.py`` with ComfyUI's
Python (the embedded one on Windows portable builds).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main() -> int:
    requirements = Path(__file__).resolve().parent / "requirements.txt"
    command = [sys.executable, "-m", "pip", "install", "-r", str(requirements)]
    print("[comfyui-moma]", " ".join(command))
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
