"""Boot ComfyUI (``MOMA_HOST_DIR``/ComfyUI) in this process with the pack, as the tests and benchmarks do, and
report what resolved from where: the ComfyUI extras that fail to import and why (a missing module ComfyUI's
requirements name and the pack leaves out on purpose is expected; any other is not), whether every node id the
run's graphs use is registered, and where each imported module came from (stdlib, the machine's packages, the
carried wheels, the ComfyUI tree, this checkout).
"""

from __future__ import annotations

import logging
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

from . import machine, pack, plan

REPO = Path(__file__).resolve().parents[2]
CANNOT_IMPORT = re.compile(
    r"(?:Cannot import (?P<path>\S+) module for custom nodes|Error while calling comfy_entrypoint "
    r"in (?P<entry>\S+)): No module named '(?P<module>[^']+)'"
)
MODULE_TO_DISTRIBUTION = {"opengl": "pyopengl", "pil": "pillow", "yaml": "pyyaml"}
CLASS_TYPE = re.compile(r'"class_type":\s*"(?P<id>\w+)"')


def run_node_ids(repo: Path = REPO) -> list[str]:
    """Node ids named as ``"class_type"`` in the files whose graphs the run executes (plan.GRAPH_SOURCES)."""
    ids: set[str] = set()
    for pattern in plan.GRAPH_SOURCES:
        for file in sorted(repo.glob(pattern)):
            ids.update(match["id"] for match in CLASS_TYPE.finditer(file.read_text(encoding="utf-8")))
    return sorted(node for node in ids if not plan.TEST_ONLY_NODE.match(node))


def classify(origin: str | None, roots: dict[str, list[str]]) -> str:
    """Which of ``roots`` (kind -> path prefixes) holds ``origin`` (the longest matching prefix wins: the carried
    tree and a venv may sit inside the checkout); 'builtin' without a file, 'other' outside every root."""
    if not origin or not origin.startswith("/"):  # built in, or a namespace object naming a bare file (torch.ops)
        return "builtin"
    best, best_length = "other", -1
    for kind, prefixes in roots.items():
        for prefix in filter(None, prefixes):
            prefix = prefix.rstrip("/") + "/"
            if origin.startswith(prefix) and len(prefix) > best_length:
                best, best_length = kind, len(prefix)
    return best


def module_origins(comfy_root: Path, site: str | None, pack_link: Path | None = None) -> dict[str, dict]:
    """kind -> {modules: count, top: sorted top-level names} for every module imported so far; 'other' lists files.
    ``pack_link``: the pack's folder under the base directory's custom_nodes (a link to this checkout)."""
    paths = sysconfig.get_paths()
    roots = {
        "carried": [site] if site else [],
        "comfyui": [str(comfy_root)],
        "checkout": [str(REPO), str(pack_link) if pack_link else ""],
        "machine": sorted({paths["purelib"], paths["platlib"], *[p for p in sys.path if p.endswith("-packages")]}),
        "stdlib": [paths["stdlib"], paths["platstdlib"]],
    }
    kinds: dict[str, dict] = {}
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        kind = classify(origin, roots)
        entry = kinds.setdefault(kind, {"modules": 0, "top": set()})
        entry["modules"] += 1
        entry["top"].add(origin if kind == "other" else name.split(".")[0])
    return {kind: {"modules": entry["modules"], "top": sorted(entry["top"])} for kind, entry in sorted(kinds.items())}


def check(cuda: bool = False) -> dict:
    """Boot ComfyUI with the pack (``--cpu`` unless ``cuda``) and report (see the module doc); ``ok`` says whether
    the run can use it: the pack loaded, every run node registered, no unexpected import failure."""
    import os

    messages: list[str] = []

    class Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    root = logging.getLogger()
    root.addHandler(Records(logging.WARNING))
    root.setLevel(logging.WARNING)

    from moma_runner import boot
    from moma_runner.common import host_dir

    comfy_root = host_dir() / "ComfyUI"
    base_dir = Path(tempfile.mkdtemp(prefix="moma-imports-base-"))
    host = boot.boot(comfy_root, base_dir, cpu=not cuda)
    import nodes

    failed = sorted(
        {message.split("IMPORT FAILED:", 1)[1].strip() for message in messages if "IMPORT FAILED:" in message}
    )
    missing: dict[str, str] = {}
    for message in messages:
        match = CANNOT_IMPORT.search(message)
        if match:
            missing[Path(match["path"] or match["entry"]).name] = match["module"]
    left_out = {machine.normalize(name) for name in pack.LEFT_OUT_REQUIREMENTS}
    unexpected = {}
    for extra, module in missing.items():
        top = module.split(".")[0].lower()
        if machine.normalize(MODULE_TO_DISTRIBUTION.get(top, top)) not in left_out:
            unexpected[extra] = module
    unexplained = [extra for extra in failed if extra not in missing]  # failed for another reason than a module
    wanted = run_node_ids()
    absent = [node for node in wanted if node not in nodes.NODE_CLASS_MAPPINGS]
    coverage = pack.requirement_coverage(comfy_root / "requirements.txt")
    unaccounted = [name for name, where in coverage.items() if where == "UNACCOUNTED"]
    site = os.environ.get("MOMA_CARRIED_SITE") or None
    report = {
        "comfy_root": str(comfy_root),
        "device": "cuda" if cuda else "cpu",
        "pack_loaded": host.pack_module_name is not None,
        "import_failed": failed,
        "missing_modules": missing,
        "unexpected_failures": unexpected,
        "failed_for_other_reasons": unexplained,
        "run_node_ids": wanted,
        "absent_node_ids": absent,
        "requirements": coverage,
        "unaccounted_requirements": unaccounted,
        "origins": module_origins(comfy_root, site, base_dir / "custom_nodes" / boot.PACK_LINK_NAME),
    }
    report["ok"] = (
        report["pack_loaded"]
        and not absent
        and not unexpected
        and not unexplained
        and not unaccounted
        and "other" not in report["origins"]
    )
    return report


def format_report(report: dict) -> str:
    origins = report["origins"]
    lines = [
        f"ComfyUI at {report['comfy_root']} on {report['device']}: pack "
        f"{'loaded' if report['pack_loaded'] else 'NOT LOADED'}",
        "modules imported: " + ", ".join(f"{kind} {entry['modules']}" for kind, entry in origins.items()),
    ]
    for kind in ("carried", "machine"):
        if kind in origins:
            lines.append(f"  from {kind}: {', '.join(origins[kind]['top'])}")
    if "other" in origins:
        lines.append(f"  FROM ELSEWHERE: {', '.join(origins['other']['top'][:20])}")
    lines.append(
        f"ComfyUI extras that fail to import: {len(report['import_failed'])} "
        + ", ".join(f"{extra} ({report['missing_modules'].get(extra, '?')})" for extra in report["import_failed"])
    )
    if report["unexpected_failures"] or report["failed_for_other_reasons"]:
        lines.append(f"UNEXPECTED: {report['unexpected_failures']} {report['failed_for_other_reasons']}")
    lines.append(
        f"node ids the run's graphs use: {len(report['run_node_ids'])}, missing: {report['absent_node_ids'] or 'none'}"
    )
    lines.append(
        "ComfyUI requirements: "
        + ", ".join(f"{name} {where.split(':')[0]}" for name, where in report["requirements"].items())
    )
    if report["unaccounted_requirements"]:
        lines.append(
            f"UNACCOUNTED requirements (carry a wheel or say why not in pack.py): {report['unaccounted_requirements']}"
        )
    lines.append(f"imports: {'ok' if report['ok'] else 'NOT OK'}")
    return "\n".join(lines)
