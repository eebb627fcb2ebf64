"""pytest plugin (loaded with ``-p`` from pyproject.toml): the repository root is a ComfyUI pack, i.e. a
Python package whose ``__init__.py`` only works when ComfyUI imports it (relative imports, ComfyUI on
sys.path). pytest would import that ``__init__.py`` as the parent package of ``tests/`` under the
checkout's folder name; collect the root as a plain directory instead. The tests reach the pack the way
ComfyUI loads it (tests/host.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]


def pytest_collect_directory(path: Path, parent: pytest.Collector):
    if path == PACK_ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
