"""Model folders the pack registers with ComfyUI (honouring extra_model_paths.yaml and --base-directory), and the
one rule for every name or path a workflow supplies: it resolves inside a folder registered for it.

The rule is lexical: a name must be relative, and after normalising ``.`` / ``..`` it must still be below the
folder it is looked up in. Symlinks a user placed inside those folders are followed (that is how models on other
disks are shared), but a workflow cannot name a path that climbs out of them.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Literal

import folder_paths

from ..moma.errors import MomaError

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
    return list(folder_paths.get_folder_paths(folder_name)) if folder_name in folder_paths.folder_names_and_paths else []


def describe_folders(roots: Sequence[str | Path]) -> str:
    return ", ".join(str(root) for root in roots) or "(no folder registered)"


def relative_name(input_name: str, value: str, roots: Sequence[str | Path], what: str, advice: str = "") -> str:
    """``value`` normalised to a relative POSIX path that stays inside any folder it is joined to.

    Raises a MomaError naming ``input_name``, the value and ``roots`` for an empty name, an absolute path (POSIX,
    Windows drive or UNC, ``~``), a NUL character, or ``..`` that climbs out.
    """
    if not isinstance(value, str) or not value.strip():
        raise MomaError(f"{input_name}: no {what} given. Choose one found in {describe_folders(roots)}.")
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
    if refused:
        advice = advice or "place the file there (a symlink is fine) and choose it from the list."
        raise MomaError(
            f"{input_name}: {value!r} is refused: it {refused}. A workflow may only name a {what} inside "
            f"{describe_folders(roots)} (a relative name such as 'sub/name'); {advice}"
        )
    return posixpath.normpath(unified)


def resolve_inside(input_name: str, value: str, roots: Sequence[str | Path], kind: Kind, what: str,
                   hint: str = "") -> Path:
    """The first ``root / value`` that is a ``kind`` (file or folder), for ``value`` confined by ``relative_name``.

    The error when none matches names the input, the value and every folder searched, then ``hint``.
    """
    found = find_inside(input_name, value, roots, kind, what)
    if found is not None:
        return found
    raise MomaError(f"{input_name}: {what} {value!r} not found in {describe_folders(roots)}. {hint}".rstrip())


def find_inside(input_name: str, value: str, roots: Sequence[str | Path], kind: Kind, what: str) -> Path | None:
    """Like ``resolve_inside`` but None when nothing matches (escapes are still refused)."""
    relative = relative_name(input_name, value, roots, what)
    for root in roots:
        candidate = Path(root) / relative
        # the OS's own normalisation (abspath: Windows trims trailing dots/spaces) must stay inside the root too;
        # symlinks placed inside are not resolved here, so they keep working
        if os.path.commonpath([os.path.abspath(root), os.path.abspath(candidate)]) != os.path.abspath(root):
            continue
        if (candidate.is_dir() if kind == "dir" else candidate.is_file()):
            return candidate
    return None


def output_prefix(input_name: str, prefix: str) -> str:
    """A save ``filename_prefix`` checked to stay inside ComfyUI's output folder (normalised, relative)."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise MomaError(f"{input_name} is empty: give a prefix such as 'moma/context' (a path under the output folder).")
    return relative_name(input_name, prefix, [folder_paths.get_output_directory()], "file name prefix",
                         "give a prefix such as 'moma/context'.")


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
