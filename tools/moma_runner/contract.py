"""The host contract against a ComfyUI tree: ``python -m moma_runner.contract COMFY_ROOT``.

Boots that ComfyUI in this process (CPU, a temporary base directory with the pack linked into custom_nodes, ComfyUI's
own custom-node loader), then runs every check of the pack's ``nodes/host_contract.py`` (the pack's hooks and the
runner's) and prints one line per hook. Exit status 0 when all hold, 1 when one is broken, 2 when ComfyUI or the
pack did not load. ``scripts/check_host.sh`` runs it first.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

from . import boot
from .common import REPO


def import_error() -> str:
    """The exception importing the pack raises on the booted ComfyUI, as one line (ComfyUI only logged it)."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_moma_import_probe", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any import failure is the answer
        return f"{type(error).__name__}: {error}".splitlines()[0]
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] == spec.name]:
            del sys.modules[name]
    return "it imports here, but ComfyUI's loader did not register it (see the log above)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    comfy_root = Path(argv[0]).resolve()
    try:
        host = boot.boot(comfy_root, Path(tempfile.mkdtemp(prefix="moma-contract-")), cpu=True)
    except boot.ComfyBootError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if host.pack_module_name is None:
        print(
            "error: ComfyUI did not import the pack from custom_nodes/ (see its log above: IMPORT FAILED)",
            file=sys.stderr,
        )
        # A hook the node modules import at load time (comfy_api.v0_0_2, optimized_attention, SDTokenizer, ...)
        # is gone: the contract cannot run, so name what the import lacks, in the line check_host.sh reports.
        print(f"host contract: the pack does not import on this ComfyUI: {import_error()}")
        return 2
    contract = sys.modules[f"{host.pack_module_name}.nodes.host_contract"]
    report = contract.run_checks(contract.HOOKS + contract.RUNNER_HOOKS)
    print(f"ComfyUI {report.comfyui_version} at {comfy_root}")
    for hook in report.hooks:
        reason = report.broken.get(hook.name)
        print(f"  {'FAIL' if reason else 'ok  '}  {hook.name}" + (f"\n        {reason}" if reason else ""))
    print(f"host contract: {len(report.hooks) - len(report.broken)}/{len(report.hooks)} hooks hold")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
