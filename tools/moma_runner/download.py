"""``--download NAME|all``: fetch files of the models table (models.json) into a base directory's models/.

Hugging Face entries go through huggingface_hub (its progress bars; a folder gets exactly the files the
table lists, so the adapter in the MoMA_llava_7b repository is not fetched a second time); the others
(rembg's release, civitai) through urllib with a progress line. When a download cannot be made (offline,
HTTP error, login needed) the exact file, folder, URL and a command to run by hand are printed.
"""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, RunnerError
from .models import load_models_table

CHUNK = 1 << 20


def _complete(entry: dict, target: Path) -> bool:
    if entry["type"] == "folder":
        return all((target / name).is_file() for name in entry["files"])
    return target.is_file()


def _url_download(url: str, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    request = urllib.request.Request(url, headers={"User-Agent": "comfyui-moma"})
    with urllib.request.urlopen(request, timeout=60) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, shown = 0, -1
        while chunk := response.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            percent = 100 * done // total if total else -1
            if percent != shown and (percent % 5 == 0 or not total):
                shown = percent
                size = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB ({percent}%)" if total else f"{done / 1e6:.0f} MB"
                print(f"\r  {target.name}: {size}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    partial.replace(target)


def _hf_download(entry: dict, folder: Path, target: Path) -> None:
    import huggingface_hub

    if entry["type"] == "folder":
        huggingface_hub.snapshot_download(entry["hf_repo"], allow_patterns=entry["files"], local_dir=str(target))
    else:
        huggingface_hub.hf_hub_download(entry["hf_repo"], entry["name"], local_dir=str(folder))


def download(entry: dict, models_dir: Path) -> bool:
    """Fetch one table entry into ``models_dir/<folder>``; False (with the manual instructions) on failure."""
    folder = models_dir / entry["folder"]
    target = folder / entry["name"]
    if _complete(entry, target):
        print(f"{entry['name']}: already in {folder}")
        return True
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{entry['name']} ({entry['size']}) -> {target}", flush=True)
    try:
        if entry.get("hf_repo"):
            _hf_download(entry, folder, target)
        else:
            _url_download(entry["url"], target)
    except Exception as e:
        print(f"\ncould not download {entry['name']}: {type(e).__name__}: {e}", file=sys.stderr)
        print(
            f"  file:   {entry['name']}{'/ (' + ', '.join(entry['files']) + ')' if entry['type'] == 'folder' else ''}\n"
            f"  folder: {folder}\n"
            f"  from:   {entry.get('url') or entry['source']}\n"
            f"  or run: {entry['download'].replace('{dest}', str(target))}",
            file=sys.stderr,
        )
        return False
    if not _complete(entry, target):
        print(f"{entry['name']}: the download finished but {target} is incomplete", file=sys.stderr)
        return False
    cache = target / ".cache"
    if entry["type"] == "folder" and cache.is_dir():
        shutil.rmtree(cache, ignore_errors=True)  # huggingface_hub's bookkeeping, not part of the model
    return True


def download_command(names: list[str], base_dir: Path) -> int:
    """``--download``: each NAME (a file or folder name of the table, or ``all``) into ``base_dir/models``."""
    table = load_models_table()
    by_name = {entry["name"]: entry for entry in table["models"]}
    wanted: list[dict] = []
    for name in names:
        if name == "all":
            wanted += table["models"]
        elif name.rstrip("/") in by_name:
            wanted.append(by_name[name.rstrip("/")])
        else:
            raise RunnerError(
                f"--download {name}: not in the models table; one of: all, {', '.join(by_name)}", EXIT_USAGE
            )
    unique = list({entry["name"]: entry for entry in wanted}.values())
    failed = [entry["name"] for entry in unique if not download(entry, base_dir / "models")]
    if failed:
        print(f"\nnot downloaded: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
