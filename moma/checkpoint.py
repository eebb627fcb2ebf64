"""Reading Hugging Face weight folders safely and building big modules without allocating them twice.

- weight files: sharded or single, safetensors preferred, pickles only through ``torch.load(weights_only=True)``
  (memory-mapped for the zip container), one tensor at a time where the format allows;
- modules are built with their parameters on the meta device and the checkpoint tensors are assigned in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .errors import MomaError


def reference_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast like the reference: to bf16 via fp16 (it loaded fp16 and recast the model to bf16)."""
    if dtype == torch.bfloat16 and tensor.dtype == torch.float32:
        tensor = tensor.to(torch.float16)
    return tensor.to(dtype)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device (no memory) but real buffers (e.g. RoPE's inv_freq).

    Patches ``nn.Module.register_parameter`` for the duration (as accelerate's ``init_empty_weights`` does), so
    it must not overlap module construction in another thread; ComfyUI runs one prompt at a time.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def set_parameter(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def unpickling_refusal(error: BaseException) -> tuple[bool, str]:
    """(would the pickle have run code, the useful line) for a ``torch.load(weights_only=True)`` failure.

    torch wraps every failure of its weights-only unpickler in the same boilerplate; only a blocked GLOBAL means
    the file asks to import something (which is how a pickle runs code), anything else is a corrupt or foreign file.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line), None)
    if detail is not None:
        return True, detail
    detail = next(
        (
            line
            for line in lines
            if line.startswith(("Unsupported", "WeightsUnpickler", "invalid load key")) and not line.endswith("error:")
        ),
        lines[-1] if lines else type(error).__name__,
    )
    return False, detail


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
        raise MomaError(f"Could not read {path} as JSON ({error}).") from None
    if not isinstance(data, dict):
        raise MomaError(f"{path} is not a JSON object.")
    return data


def weight_files(folder: Path, where_to_get: str) -> list[Path]:
    """The weight files of a Hugging Face folder: safetensors (sharded or single) preferred, then .bin."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_file = folder / index_name
        if index_file.is_file():
            weight_map = read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise MomaError(f"{index_file} has no weight_map. {where_to_get}")
            names = set(weight_map.values())
            odd = sorted(
                repr(name)
                for name in names
                if not isinstance(name, str)
                or not name
                or Path(name).is_absolute()
                or "\\" in name
                or ".." in Path(name).parts
            )
            if odd:
                raise MomaError(
                    f"{index_file} names weight files {odd[:4]} that are not plain file names inside "
                    f"{folder}; the index is broken or was edited. {where_to_get}"
                )
            files = [folder / name for name in sorted(names)]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise MomaError(
                    f"{folder} is incomplete: {index_name} lists {missing}, which are missing. {where_to_get}"
                )
            return files
        if (folder / single_name).is_file():
            return [folder / single_name]
    raise MomaError(f"No model weights (model*.safetensors or pytorch_model*.bin) in {folder}. {where_to_get}")


def check_complete(folder: Path, files: list[Path], required: tuple[str, ...], where_to_get: str) -> None:
    """Before anything is loaded: every weight file and every ``required`` file of ``folder`` exists and is not empty."""
    absent = [name for name in required if not (folder / name).is_file()]
    empty = [
        file.name
        for file in [*files, *(folder / name for name in required)]
        if file.is_file() and file.stat().st_size == 0
    ]
    if absent or empty:
        parts = ([f"missing {absent}"] if absent else []) + ([f"empty {empty}"] if empty else [])
        raise MomaError(f"{folder} is incomplete: {', '.join(parts)}. {where_to_get}")


def safetensors_header(path: Path, where_to_get: str = "", max_bytes: int = 100 << 20) -> dict:
    """The JSON header of a .safetensors file (read without loading any tensor; at most ``max_bytes`` of it, as
    safetensors itself allows 100 MB); MomaError if it is not one. Only a regular file is opened (a FIFO would
    block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError("not a regular file")
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = os.fstat(handle.fileno()).st_size
            if not 2 <= length <= min(size - 8, max_bytes):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested too deep
        raise MomaError(
            f"{path} is not a readable .safetensors file ({error}); it is probably truncated or another "
            f"format. {where_to_get}".rstrip()
        ) from None
    if not isinstance(header, dict):
        raise MomaError(f"{path} is not a readable .safetensors file (its header is not a JSON object). {where_to_get}")
    return header


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one weight file, read without running code; one tensor at a time for safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
            return
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except MomaError:
        raise
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) and unpickling_refusal(error)[0]:
            raise MomaError(
                f"Refused to load {path}: the pickle holds more than tensors, so loading it could run code "
                f"({unpickling_refusal(error)[1]}). Use the original file or a safetensors conversion."
            ) from None
        if isinstance(error, pickle.UnpicklingError):
            error = unpickling_refusal(error)[1]
            raise MomaError(
                f"Could not read {path} (not a PyTorch weights file: {error}); the file is probably "
                f"truncated or another format. Download it again."
            ) from None
        raise MomaError(
            f"Could not read {path} ({type(error).__name__}: {error}); the file is probably truncated."
        ) from None
    if not isinstance(state, dict):
        raise MomaError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    for key in list(state):
        yield key, state.pop(key)
    del state
