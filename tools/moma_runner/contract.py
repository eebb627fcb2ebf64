"""The host contract against a ComfyUI tree: ``python -m moma_runner.contract COMFY_ROOT``.

Boots that ComfyUI in this process (CPU, a temporary base directory with the pack linked into custom_nodes, ComfyUI's
own custom-node loader), then runs every check of the pack's ``nodes/host_contract.py`` (the pack's hooks and the
runner's) and prints one line per hook. Exit status 0 when all hold, 1 when one is broken, 2 when ComfyUI or the
pack did not load. ``scripts/check_host.sh`` runs it first.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from . import boot


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
