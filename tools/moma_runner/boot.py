"""The one in-process ComfyUI boot, shared by the runner, the tests (tests/host.py) and the benchmarks.

Two stages, because the demo models are written with ComfyUI's own classes between them:
``configure`` puts ComfyUI's root on sys.path (first; never the pack's root), sets its command-line args
(device, base directory) before any model folder is read, and points its input/output/temp folders into the
base directory; ``load_nodes`` runs ComfyUI's built-in and custom-node loader, which imports the pack from
``custom_nodes/`` as a user's install does. ``boot`` does both.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import LEGACY_LINK_NAMES, PACK_LINK_NAME, REPO

# the loaded pack is also importable under this name (same module objects); not its folder's name (PACK_LINK_NAME)
PACK_ALIAS = "comfyui_moma"
BASE_SUBDIRS = ("custom_nodes", "models", "input", "output", "temp", "user")


class ComfyBootError(RuntimeError):
    """ComfyUI could not be found or started."""


@dataclass
class ComfyHost:
    """A ComfyUI imported into this process."""

    comfy_root: Path
    base_dir: Path | None  # None: the ComfyUI folder's own models/, input/, output/
    device: str = "cpu"
    pack_module_name: str | None = None  # set by load_nodes when the pack was imported

    @property
    def models_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.models_dir)


def make_base_dir(base_dir: Path, link_name: str = PACK_LINK_NAME) -> Path | None:
    """Create a ComfyUI base directory with the pack linked under ``custom_nodes/``; return the new link.

    A link to this checkout under an earlier name (LEGACY_LINK_NAMES) is replaced by ``link_name``, so the pack is
    never loaded twice; a folder or a link to anything else is left alone."""
    for sub in BASE_SUBDIRS:
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    for legacy in LEGACY_LINK_NAMES:
        old = base_dir / "custom_nodes" / legacy
        if legacy != link_name and old.is_symlink() and old.resolve() == REPO:
            old.unlink()
    link = base_dir / "custom_nodes" / link_name
    if link.exists() or link.is_symlink():
        return None
    if any(entry.resolve() == REPO for entry in (base_dir / "custom_nodes").iterdir()):
        return None  # the pack is installed there already (e.g. a clone in the user's own ComfyUI)
    link.symlink_to(REPO, target_is_directory=True)
    return link


def configure(
    comfy_root: Path,
    base_dir: Path | None,
    *,
    cpu: bool,
    force_fp32: bool = False,
    comfy_args: dict[str, Any] | None = None,
) -> ComfyHost:
    """Import ComfyUI from ``comfy_root`` with the given args (stage 1; nothing is loaded yet).

    ``comfy_args`` sets further attributes of ``comfy.cli_args.args`` by name (e.g.
    ``use_pytorch_cross_attention``); an unknown name is an error.
    """
    if not (comfy_root / "comfy").is_dir() or not (comfy_root / "folder_paths.py").is_file():
        raise ComfyBootError(
            f"No ComfyUI found at {comfy_root}. Run `bash scripts/setup_host.sh` (or pass "
            "--comfyui with your ComfyUI folder)."
        )
    if str(comfy_root) not in sys.path:
        sys.path.insert(0, str(comfy_root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = cpu
    args.force_fp32 = force_fp32
    args.disable_api_nodes = True
    for name, value in (comfy_args or {}).items():
        if not hasattr(args, name):
            raise ComfyBootError(f"ComfyUI has no command-line option {name!r}.")
        setattr(args, name, value)
    if force_fp32:
        import torch

        # exact fp32 on a GPU: no TF32 in matmuls or cuDNN convolutions (PyTorch allows it in convolutions)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if base_dir is not None:
        make_base_dir(base_dir)
        args.base_directory = str(base_dir)
        args.output_directory = str(base_dir / "output")

    import folder_paths
    import utils.extra_config  # noqa: F401  (binds the top-level `utils` package before comfy/utils.py)

    if base_dir is not None:
        folder_paths.set_output_directory(str(base_dir / "output"))
        folder_paths.set_input_directory(str(base_dir / "input"))
        folder_paths.set_temp_directory(str(base_dir / "temp"))
    return ComfyHost(comfy_root=comfy_root, base_dir=base_dir, device="cpu" if cpu else "gpu")


def has_accelerator() -> bool:
    """Whether torch sees a CUDA or MPS device."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or (mps is not None and mps.is_available())


def loaded_pack_module() -> str | None:
    """The module name under which ComfyUI's custom-node loader imported this checkout, if it did."""
    init = (REPO / "__init__.py").resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == init:
            return name
    return None


def load_nodes(host: ComfyHost) -> ComfyHost:
    """ComfyUI's built-in and custom nodes (stage 2); the pack, if loaded, is aliased as ``comfyui_moma``."""
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    module_name = loaded_pack_module()
    if module_name is not None:
        for name, module in list(sys.modules.items()):
            if name == module_name or name.startswith(module_name + "."):
                sys.modules.setdefault(PACK_ALIAS + name[len(module_name) :], module)
    host.pack_module_name = module_name
    return host


def boot(
    comfy_root: Path,
    base_dir: Path | None,
    *,
    cpu: bool,
    force_fp32: bool = False,
    comfy_args: dict[str, Any] | None = None,
) -> ComfyHost:
    """``configure`` then ``load_nodes``."""
    return load_nodes(configure(comfy_root, base_dir, cpu=cpu, force_fp32=force_fp32, comfy_args=comfy_args))
