"""Model folders the pack registers with ComfyUI (honouring extra_model_paths.yaml and --base-directory), and the
one rule for every name or path a workflow supplies: it resolves inside a folder registered for it.

The rule is lexical: a name must be relative, and after normalising ``.`` / ``..`` it must still be below the
folder it is looked up in. Symlinks a user placed inside those folders are followed (that is how models on other
disks are shared), but a workflow cannot name a path that climbs out of them.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Literal

import folder_paths

from ..moma.errors import MomaError
from ..moma.limits import NAME_CHARS, shown

# name -> (default folder under models/, file extensions listed in dropdowns; empty set = any)
MOMA_FOLDER = "moma"  # attn_adapters_projectors.th / .safetensors
LLM_FOLDER = "LLM"  # MoMA_llava_7b folder(s)
CLIP_VISION_FOLDER = "clip_vision"  # core folder; the CLIP ViT-L/14-336 folder or file goes here
REMBG_FOLDER = "rembg"  # u2net.onnx, isnet-general-use.onnx, ...

_EXTENSIONS = {
    MOMA_FOLDER: {".th", ".pt", ".pth", ".bin", ".safetensors"},
    LLM_FOLDER: set(),
    REMBG_FOLDER: {".onnx"},
}

Kind = Literal["file", "dir"]
log = logging.getLogger(__name__)
DEFAULT_NAME_MAX, DEFAULT_PATH_MAX = 255, 4096  # where the OS cannot say (Windows: 255 per name)
SAVE_SUFFIX_BYTES = len("_0000000000_.safetensors")  # what a save appends to its prefix (a counter of up to 10 digits)


def _register(name: str, extensions: set[str]) -> None:
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        exts.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


for _name, _exts in _EXTENSIONS.items():
    _register(_name, _exts)


def model_folders(folder_name: str) -> list[str]:
    """Every folder ComfyUI has registered for ``folder_name`` (models/<name> and extra_model_paths.yaml)."""
    return (
        list(folder_paths.get_folder_paths(folder_name)) if folder_name in folder_paths.folder_names_and_paths else []
    )


def describe_folders(roots: Sequence[str | Path]) -> str:
    return ", ".join(str(root) for root in roots) or "(no folder registered)"


def fs_limits(folder: str | Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes on the file system holding ``folder`` (or its nearest existing
    parent): POSIX NAME_MAX and PATH_MAX, else 255 and 4096."""
    probe = os.path.abspath(folder)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return _fs_limits(probe)


@functools.lru_cache(maxsize=64)
def _fs_limits(folder: str) -> tuple[int, int]:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX")), int(os.pathconf(folder, "PC_PATH_MAX"))
    except (AttributeError, OSError, ValueError):  # Windows has no pathconf
        return DEFAULT_NAME_MAX, DEFAULT_PATH_MAX


def _name_problem(value: str, roots: Sequence[str | Path], suffix_bytes: int = 0) -> str | None:
    """Why the file system cannot take ``value`` (a relative name) inside ``roots``: not encodable, a part longer
    than NAME_MAX bytes (the last part with ``suffix_bytes`` appended, for a save prefix), or no room in any root
    within PATH_MAX. None when it fits."""
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        return "has characters the file system cannot encode (e.g. a lone surrogate)"
    limits = [(root, *fs_limits(root)) for root in roots] or [("", DEFAULT_NAME_MAX, DEFAULT_PATH_MAX)]
    name_max = min(name for _, name, _ in limits)
    parts = encoded.split(b"/")
    for index, part in enumerate(parts):
        extra = suffix_bytes if index == len(parts) - 1 else 0
        if len(part) + extra > name_max:
            added = f" plus {extra} for the counter and extension" if extra else ""
            return (
                f"has a part of {len(part)} bytes{added}, more than the {name_max} bytes the file system allows "
                f"in a file or folder name"
            )
    room = max(path_max - len(os.fsencode(os.path.abspath(root))) - 1 for root, _, path_max in limits)
    if len(encoded) + suffix_bytes >= room:
        return f"is {len(encoded)} bytes long, more than the file system's path limit leaves inside the folder"
    return None


def relative_name(
    input_name: str, value: str, roots: Sequence[str | Path], what: str, advice: str = "", suffix_bytes: int = 0
) -> str:
    """``value`` normalised to a relative POSIX path that stays inside any folder it is joined to.

    Raises a MomaError naming ``input_name``, the value and ``roots`` for an empty name, a name longer than
    ``NAME_CHARS``, an absolute path (POSIX, Windows drive or UNC, ``~``), a NUL character, ``..`` that climbs out,
    or a name the file system cannot take (``_name_problem``; ``suffix_bytes``: what a writer appends to the last
    part). Nothing here touches the file system but its limits.
    """
    if not isinstance(value, str) or not value.strip():
        raise MomaError(f"{input_name}: no {what} given. Choose one found in {describe_folders(roots)}.")
    if len(value) > NAME_CHARS:
        raise MomaError(f"{input_name}: {shown(value)} is refused: a {what} takes at most {NAME_CHARS:,} characters.")
    unified = value.strip().replace("\\", "/")
    windows = PureWindowsPath(value.strip())
    refused = None
    if "\0" in unified:
        refused = "contains a NUL character"
    elif unified.startswith(("/", "~")) or os.path.isabs(value) or windows.drive or windows.root:
        refused = "is an absolute path"
    elif any(part.rstrip(". ") == "" and part not in ("", ".", "..") for part in unified.split("/")):
        refused = "has a part made only of dots and spaces (Windows reads such a part as '..' or '.')"
    else:
        normal = posixpath.normpath(unified)
        if normal == ".." or normal.startswith("../"):
            refused = "climbs out with '..'"
        elif normal == ".":
            refused = "names the folder itself"
        else:
            refused = _name_problem(normal, roots, suffix_bytes)
            if refused:
                raise MomaError(f"{input_name}: {shown(value)} is refused: it {refused}. Choose another name.")
    if refused:
        advice = advice or "place the file there (a symlink is fine) and choose it from the list."
        raise MomaError(
            f"{input_name}: {shown(value)} is refused: it {refused}. A workflow may only name a {what} inside "
            f"{describe_folders(roots)} (a relative name such as 'sub/name'); {advice}"
        )
    return posixpath.normpath(unified)


def resolve_inside(
    input_name: str, value: str, roots: Sequence[str | Path], kind: Kind, what: str, hint: str = ""
) -> Path:
    """The first ``root / value`` that is a ``kind`` (file or folder), for ``value`` confined by ``relative_name``.

    The error when none matches names the input, the value and every folder searched, then ``hint``.
    """
    found = find_inside(input_name, value, roots, kind, what)
    if found is not None:
        return found
    raise MomaError(f"{input_name}: {what} {shown(value)} not found in {describe_folders(roots)}. {hint}".rstrip())


def find_inside(input_name: str, value: str, roots: Sequence[str | Path], kind: Kind, what: str) -> Path | None:
    """Like ``resolve_inside`` but None when nothing matches (escapes are still refused)."""
    relative = relative_name(input_name, value, roots, what)
    for root in roots:
        candidate = Path(root) / relative
        # the OS's own normalisation (abspath: Windows trims trailing dots/spaces) must stay inside the root too;
        # symlinks placed inside are not resolved here, so they keep working
        if os.path.commonpath([os.path.abspath(root), os.path.abspath(candidate)]) != os.path.abspath(root):
            continue
        if len(os.fsencode(os.path.abspath(candidate))) >= fs_limits(root)[1]:
            continue  # longer than this folder's file system takes (relative_name made sure another one fits)
        try:
            if candidate.is_dir() if kind == "dir" else candidate.is_file():
                return candidate
        except OSError as error:  # e.g. a folder without read permission on the way
            raise MomaError(
                f"{input_name}: {what} {shown(value)} cannot be checked in {root}: {error.strerror or error}."
            ) from None
    return None


def output_prefix(input_name: str, prefix: str) -> str:
    """A save ``filename_prefix`` checked to stay inside ComfyUI's output folder (normalised, relative) and to leave
    room, within the file system's limits, for the ``_00001_.safetensors`` ComfyUI's counter appends."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise MomaError(
            f"{input_name} is empty: give a prefix such as 'moma/context' (a path under the output folder)."
        )
    return relative_name(
        input_name,
        prefix,
        [folder_paths.get_output_directory()],
        "file name prefix",
        "give a prefix such as 'moma/context'.",
        suffix_bytes=SAVE_SUFFIX_BYTES,
    )


def walk_folders(top: str | Path) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) for ``top`` and every folder below it, symlinks followed (models on other disks).
    A symlink back to a folder above it (a loop, which would otherwise be walked until the path is too long) is not
    entered; folders that cannot be listed are skipped, with one log line each."""
    if not os.path.isdir(top):
        return

    def skipped(error: OSError) -> None:
        log_listing_problem(f"cannot list {error.filename}: {error.strerror or error}; skipped")

    def identity(path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return info.st_dev, info.st_ino

    above: dict[str, frozenset] = {os.fspath(top): frozenset({identity(top)})}  # each folder's own and parents'
    for folder, dirs, files in os.walk(top, followlinks=True, onerror=skipped):
        chain = above.pop(folder, frozenset())
        entered = []
        for name in sorted(dirs):
            child = os.path.join(folder, name)
            key = identity(child)
            if key is None or key in chain:
                continue  # gone, or a loop back to a folder being walked
            above[child] = chain | {key}
            entered.append(name)
        dirs[:] = entered
        yield folder, files


_LOGGED: set[str] = set()


def log_listing_problem(message: str) -> None:
    """Log a folder-listing problem once per process (the lists are rebuilt on every /object_info call)."""
    if message not in _LOGGED and len(_LOGGED) < 10_000:
        _LOGGED.add(message)
        log.warning("MoMA: %s", message)


@contextmanager
def for_input(input_name: str) -> Iterator[None]:
    """Prefix a MomaError raised inside with ``input_name`` (unless it already starts with it)."""
    try:
        yield
    except MomaError as error:
        message = str(error)
        if message.startswith(f"{input_name}:"):
            raise
        raise MomaError(f"{input_name}: {message}") from None
