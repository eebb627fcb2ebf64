"""Convert MoMA's pickled downloads to safetensors, so nothing is unpickled again and weights can be memory-mapped.

- ``attn_adapters_projectors.th`` -> ``attn_adapters_projectors.safetensors`` (``weights.py``'s flat layout);
- a Hugging Face folder's ``pytorch_model-*.bin`` shards (the LLaVA folder, or a CLIP folder that has only
  ``pytorch_model.bin``) -> ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``, shard by
  shard (peak memory about one shard), each file checked tensor for tensor against its source after writing.

Files are written under a temporary name and renamed when verified; the index comes last, so an interrupted
conversion leaves the pickles in use. The pickles are kept (delete them yourself once the new files load); the
loaders prefer the safetensors files when both are present.

    cd ComfyUI/custom_nodes/<this pack> && python -m moma.convert ../../models/moma/attn_adapters_projectors.th \\
        ../../models/LLM/MoMA_llava_7b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import iter_weights, read_json
from .errors import MomaError
from .weights import load_adapter, save_adapter_safetensors

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"


def preferred_adapter_file(path: str | Path) -> Path:
    """``path``, or its ``.safetensors`` sibling (same stem) when one exists next to a pickled adapter."""
    path = Path(path)
    sibling = path.with_suffix(".safetensors")
    if path.suffix.lower() != ".safetensors" and sibling.is_file():
        log.info("MoMA: loading %s instead of the pickle %s.", sibling.name, path.name)
        return sibling
    return path


def convert_adapter(source: str | Path, destination: str | Path | None = None) -> Path:
    """``attn_adapters_projectors.th`` -> ``.safetensors`` next to it (or ``destination``), verified."""
    source = Path(source)
    destination = Path(destination) if destination is not None else source.with_suffix(".safetensors")
    weights = load_adapter(source)
    partial = destination.with_name(f".{destination.stem}.partial.safetensors")  # load_adapter reads by suffix
    save_adapter_safetensors(weights, partial)
    written = load_adapter(partial).flat_state_dict()
    expected = weights.flat_state_dict()
    _check_equal(partial, expected, written)
    os.replace(partial, destination)
    return destination


def _pickled_shards(folder: Path) -> list[Path]:
    index = folder / _BIN_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MomaError(f"{index} has no weight_map; cannot convert {folder}.")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        shards = [folder / "pytorch_model.bin"]
    else:
        raise MomaError(
            f"{folder} has no pytorch_model*.bin weights to convert (no {_BIN_INDEX}, no pytorch_model.bin)."
        )
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise MomaError(f"{folder} is incomplete: {missing} are missing; download them before converting.")
    return shards


def _without_shared_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: each one after the first gets its own copy."""
    seen: set[int] = set()
    tensors = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.contiguous() if pointer not in seen else tensor.clone().contiguous()
        seen.add(pointer)
    return tensors


def _check_equal(path: Path, expected: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
    problems = sorted(set(expected) ^ set(written))
    problems += [
        key
        for key in expected
        if key in written
        and not (
            expected[key].dtype == written[key].dtype
            and expected[key].shape == written[key].shape
            and torch.equal(expected[key], written[key])
        )
    ]
    if problems:
        raise MomaError(
            f"Conversion check failed: {path} differs from its source in {problems[:8]} "
            f"({len(problems)} tensors). Nothing was replaced; check the disk and convert again."
        )


def verify_shard(source: Path, converted: Path) -> None:
    """Raise a MomaError unless ``converted`` holds exactly ``source``'s tensors (names, dtypes, shapes, values)."""
    from safetensors import safe_open

    expected = dict(iter_weights(source))
    try:
        with safe_open(str(converted), framework="pt", device="cpu") as handle:
            written = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types on a damaged file
        raise MomaError(
            f"Conversion check failed: {converted} cannot be read back ({type(error).__name__}: "
            f"{error}). Convert again."
        ) from None
    _check_equal(converted, expected, written)


def convert_folder(folder: str | Path, progress: Callable[[int, int], None] | None = None, verify: bool = True) -> Path:
    """A Hugging Face folder's ``pytorch_model*.bin`` -> safetensors shards + index; returns the index file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    shards = _pickled_shards(folder)
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard in enumerate(shards, start=1):
        target = folder / f"model-{number:05d}-of-{total:05d}.safetensors"
        partial = target.with_name(target.name + ".partial")
        state = dict(iter_weights(shard))  # memory-mapped where the pickle is a zip (torch >= 1.6 files)
        tensors = _without_shared_storage(state)
        log.info("MoMA: converting %s (%d tensors) -> %s", shard.name, len(tensors), target.name)
        save_file(tensors, str(partial), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, target.name))
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        del state, tensors
        if verify:
            verify_shard(shard, partial)
        os.replace(partial, target)
        if progress is not None:
            progress(number, total)
    index = folder / SAFETENSORS_INDEX
    partial = index.with_name(index.name + ".partial")
    partial.write_text(
        json.dumps(
            {
                "metadata": {"total_size": total_size, "converted_from": [s.name for s in shards]},
                "weight_map": dict(sorted(weight_map.items())),
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(partial, index)
    return index


def convert_to_safetensors(*paths: str | Path, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Convert each of ``paths``: an adapter pickle (a file) or a folder with ``pytorch_model*.bin`` shards.

    Already converted ones are skipped. Returns the written adapter files and index files."""
    written = []
    for path in map(Path, paths):
        if path.is_file():
            if path.suffix.lower() == ".safetensors" or path.with_suffix(".safetensors").is_file():
                log.info("MoMA: %s is already safetensors; skipped.", path)
                continue
            written.append(convert_adapter(path))
        elif path.is_dir():
            if (path / SAFETENSORS_INDEX).is_file() or (path / "model.safetensors").is_file():
                log.info("MoMA: %s already has safetensors weights; skipped.", path)
                continue
            written.append(convert_folder(path, progress))
        else:
            raise MomaError(f"Nothing to convert at {path}: give the adapter file or a model folder.")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moma.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="attn_adapters_projectors.th and/or model folders (MoMA_llava_7b, a CLIP vision folder)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for path in convert_to_safetensors(*args.paths):
            log.info("written and verified: %s", path)
    except MomaError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
