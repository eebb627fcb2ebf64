"""Tiny random-weight models in the exact real file formats, written deterministically and cached.

Used by the runner's ``--demo`` (no download needed to see the graph execute) and, through tests/fixtures,
by the tests. Each artefact has a writer module here (sd15.py, llava.py, clip_vision.py, adapter.py, lora.py,
rembg.py, images.py); sd15.py imports ComfyUI (``comfy``), so ComfyUI's root must be importable for it.
``cached(name, writer)`` builds an artefact once into the cache folder and reuses it while the writer's
source is unchanged (the cache key hashes the writer's module and this file), so a test session pays the
~30 s full-layout SD1.5 write once, and parallel sessions don't write the same file twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import shutil
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cache_root() -> Path:
    """Folder holding built fixtures (MOMA_FIXTURE_CACHE, default <repo>/.host/fixture-cache)."""
    root = Path(os.environ.get("MOMA_FIXTURE_CACHE", REPO / ".host" / "fixture-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _source_hash(writer: Callable) -> str:
    digest = hashlib.sha256()
    for path in (Path(inspect.getsourcefile(writer)), Path(__file__)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cached(name: str, writer: Callable[[Path], None]) -> Path:
    """Return ``<cache>/<writer hash>/<name>``, calling ``writer(tmp_path)`` first if it does not exist yet.

    ``writer`` receives a path that does not exist and creates a file or folder there; it is renamed
    into place only when complete, under a lock, so a crashed or concurrent build never leaves half a file.
    """
    folder = cache_root() / _source_hash(writer)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        return target
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        tmp = folder / f".{name}.partial"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        writer(tmp)
        os.replace(tmp, target)
    _drop_stale_versions(name, keep=folder)
    return target


def _drop_stale_versions(name: str, keep: Path) -> None:
    """Delete copies of ``name`` built by older writer versions (a full-layout checkpoint is 2 GB)."""
    for other in cache_root().glob(f"*/{name}"):
        if other.parent == keep:
            continue
        if other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
        else:
            other.unlink(missing_ok=True)
