"""Boot a real ComfyUI (the one scripts/setup_host.sh installs) in this process, with the pack loaded
through ComfyUI's own custom-node loader, through the pack's one boot (tools/moma_runner/boot.py).
Imported by tests/conftest.py before any test module.

After ``boot()``:
- ComfyUI's root is on sys.path (never the pack's root), args are ``--cpu`` (``MOMA_TEST_DEVICE=cuda`` keeps
  ComfyUI's GPU instead, and ``MOMA_TEST_FP32=1`` adds ``--force-fp32``: the GPU checks), base directory is a fresh
  temporary folder whose ``custom_nodes/comfyui-moma`` links to this checkout (moma_runner.common.PACK_LINK_NAME);
- the pack module ComfyUI loaded is also importable as ``comfyui_moma`` (same module objects), so tests
  write ``from comfyui_moma.moma.attention import ...``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tools") not in sys.path:
    sys.path.append(str(REPO / "tools"))  # last: nothing there may shadow ComfyUI's modules

from moma_runner import boot as _boot  # noqa: E402
from moma_runner.common import DEFAULT_COMFYUI, host_dir  # noqa: E402  (re-exported for the tests)

PACK_ALIAS = _boot.PACK_ALIAS
Host = _boot.ComfyHost

_HOST: Host | None = None


def device_under_test() -> str:
    """The device the tests run ComfyUI on: ``cpu`` (default, CI) or ``cuda`` (``MOMA_TEST_DEVICE=cuda``)."""
    return os.environ.get("MOMA_TEST_DEVICE", "cpu")


def boot(cpu: bool | None = None, comfy_args: dict[str, Any] | None = None) -> Host:
    """Start ComfyUI in-process once per session and load the pack as a user's install would.

    ``cpu`` defaults to the device under test; ``comfy_args`` sets further ComfyUI options (the benchmarks'
    ``use_pytorch_cross_attention``)."""
    global _HOST
    if _HOST is not None:
        return _HOST
    comfy_root = host_dir() / "ComfyUI"
    if not (comfy_root / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI host at {comfy_root}: run `bash scripts/setup_host.sh` first.")
    base_dir = Path(tempfile.mkdtemp(prefix="moma-comfy-base-"))
    cpu = device_under_test() == "cpu" if cpu is None else cpu
    force_fp32 = os.environ.get("MOMA_TEST_FP32", "") == "1"
    options = dict(comfy_args or {})
    # On CPU the tests keep the fixture's fp16 UNet weights (ComfyUI's --fp16-unet) and ComfyUI's manual cast
    # computes in fp32: the same numbers as an fp32 copy (fp16 -> fp32 is exact), at half the RAM (1.6 GB, not
    # 3.2). MOMA_TEST_UNET_FP32=1 (and the benchmarks, which measure what users run) keep ComfyUI's CPU default.
    options.setdefault("fp16_unet", cpu and not force_fp32 and os.environ.get("MOMA_TEST_UNET_FP32", "") != "1")
    host = _boot.configure(comfy_root, base_dir, cpu=cpu, force_fp32=force_fp32, comfy_args=options)
    logging.getLogger().setLevel(logging.WARNING)
    _boot.load_nodes(host)
    if host.pack_module_name is None:
        raise RuntimeError("ComfyUI did not import the pack from custom_nodes/ (see the log above for IMPORT FAILED).")
    _HOST = host
    return _HOST


def on_default_host() -> bool:
    """Whether this run's ComfyUI is the default version (CI's second host is the oldest supported one)."""
    return os.environ.get("MOMA_COMFYUI", DEFAULT_COMFYUI) == DEFAULT_COMFYUI


def cases_for_hosts(values: list, older_host: set) -> list:
    """Parametrize values; on an older host only those in ``older_host`` run (they cover what differs between
    ComfyUI versions), the rest are marked ``default_host_only``."""
    import pytest

    def name(value: Any) -> Any:
        return value[0] if isinstance(value, tuple) else value

    return [
        pytest.param(
            *(value if isinstance(value, tuple) else (value,)),
            id=str(name(value)),
            marks=() if name(value) in older_host else pytest.mark.default_host_only,
        )
        for value in values
    ]
