"""Boot a real ComfyUI (the one scripts/setup_host.sh installs) in this process, with the pack loaded
through ComfyUI's own custom-node loader. Imported by tests/conftest.py before any test module.

After ``boot()``:
- ComfyUI's root is on sys.path (never the pack's root), args are ``--cpu`` (``MOMA_TEST_DEVICE=cuda`` keeps
  ComfyUI's GPU instead, and ``MOMA_TEST_FP32=1`` adds ``--force-fp32``: the GPU checks), base directory is a fresh
  temporary folder whose ``custom_nodes/comfyui_moma`` links to this checkout;
- the pack module ComfyUI loaded is also importable as ``comfyui_moma`` (same module objects), so tests
  write ``from comfyui_moma.moma.attention import ...``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_ALIAS = "comfyui_moma"


@dataclass
class Host:
    comfy_root: Path
    base_dir: Path
    pack_module_name: str

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"


_HOST: Host | None = None


DEFAULT_COMFYUI = "0.30"  # the host version scripts/setup_host.sh installs by default


def host_dir() -> Path:
    """The installed host (MOMA_HOST_DIR, default <repo>/.host/comfyui-<MOMA_COMFYUI|0.30>)."""
    version = os.environ.get("MOMA_COMFYUI", DEFAULT_COMFYUI)
    return Path(os.environ.get("MOMA_HOST_DIR", REPO / ".host" / f"comfyui-{version}"))


def device_under_test() -> str:
    """The device the tests run ComfyUI on: ``cpu`` (default, CI) or ``cuda`` (``MOMA_TEST_DEVICE=cuda``)."""
    return os.environ.get("MOMA_TEST_DEVICE", "cpu")


def boot() -> Host:
    """Start ComfyUI in-process once per test session and load the pack as a user's install would."""
    global _HOST
    if _HOST is not None:
        return _HOST
    comfy_root = host_dir() / "ComfyUI"
    if not (comfy_root / "comfy").is_dir():
        raise RuntimeError(f"No ComfyUI host at {comfy_root}: run `bash scripts/setup_host.sh` first.")
    sys.path.insert(0, str(comfy_root))

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    base_dir = Path(tempfile.mkdtemp(prefix="moma-comfy-base-"))
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base_dir / sub).mkdir()
    (base_dir / "custom_nodes" / PACK_ALIAS).symlink_to(REPO, target_is_directory=True)
    args = comfy.cli_args.args
    args.cpu = device_under_test() == "cpu"
    args.force_fp32 = os.environ.get("MOMA_TEST_FP32", "") == "1"
    # On CPU the UNet keeps the fixture's fp16 weights (ComfyUI's --fp16-unet) and ComfyUI's manual cast computes
    # in fp32: the same numbers as an fp32 copy (fp16 -> fp32 is exact), at half the RAM (1.6 GB, not 3.2).
    # MOMA_TEST_UNET_FP32=1 loads the fp32 copy ComfyUI makes by default on CPU instead.
    args.fp16_unet = args.cpu and not args.force_fp32 and os.environ.get("MOMA_TEST_UNET_FP32", "") != "1"
    if args.force_fp32:
        import torch

        # exact fp32 on a GPU: no TF32 in matmuls or cuDNN convolutions (PyTorch allows it in convolutions)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.base_directory = str(base_dir)
    args.disable_api_nodes = True
    args.output_directory = str(base_dir / "output")

    import utils.extra_config  # noqa: F401  (binds the top-level `utils` package before comfy/utils.py)
    import folder_paths
    import nodes

    folder_paths.set_output_directory(str(base_dir / "output"))
    folder_paths.set_input_directory(str(base_dir / "input"))
    folder_paths.set_temp_directory(str(base_dir / "temp"))
    logging.getLogger().setLevel(logging.WARNING)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

    pack_init = (REPO / "__init__.py").resolve()
    loaded = [
        name
        for name, mod in list(sys.modules.items())
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == pack_init
    ]
    if not loaded:
        raise RuntimeError("ComfyUI did not import the pack from custom_nodes/ (see the log above for IMPORT FAILED).")
    module_name = loaded[0]
    for name, mod in list(sys.modules.items()):
        if name == module_name or name.startswith(module_name + "."):
            sys.modules[PACK_ALIAS + name[len(module_name):]] = mod
    _HOST = Host(comfy_root=comfy_root, base_dir=base_dir, pack_module_name=module_name)
    return _HOST
