#!/usr/bin/env python3
"""Run a ComfyUI API-format workflow headlessly through ComfyUI's real executor (``--help`` for options).

The entry point of the pack's runner, tools/moma_runner (one module per job); scripts/run.sh calls it
with the host's Python.
"""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if TOOLS not in sys.path:
    sys.path.append(TOOLS)  # last: ComfyUI's root goes first, and the pack's root never goes on sys.path

from moma_runner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
