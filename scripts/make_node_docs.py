#!/usr/bin/env python3
"""Regenerate the pack's help inside ComfyUI from the node schemas: locales/en, locales/zh (node names, input and
output names, tooltips) and web/docs (the help pages of the node library, English and Chinese).

    .host/comfyui-0.30/venv/bin/python scripts/make_node_docs.py           # write the files
    .host/comfyui-0.30/venv/bin/python scripts/make_node_docs.py --check   # write nothing; exit 1 if stale

Boots the ComfyUI that scripts/setup_host.sh installed (MOMA_HOST_DIR, else .host/comfyui-0.30) in this process,
on the CPU with an empty base folder, loads the pack through ComfyUI's own custom-node loader and reads each MoMA
node's definition as /object_info serves it. Prose comes from tools/node_docs/src/ (see tools/node_docs). Prints
the Chinese strings that need (re-)translating in tools/node_docs/src/zh/strings.json; --check also fails on them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tools"))  # last: nothing there may shadow ComfyUI's modules

import node_docs  # noqa: E402
from moma_runner import boot  # noqa: E402
from moma_runner.common import host_dir  # noqa: E402


def live_node_infos() -> dict[str, dict]:
    """Each MoMA node's definition (node id -> /object_info entry) from a ComfyUI booted in this process."""
    with tempfile.TemporaryDirectory(prefix="moma-node-docs-") as base:
        logging.basicConfig(level=logging.ERROR)
        boot.boot(host_dir() / "ComfyUI", Path(base), cpu=True)
        from comfyui_moma.nodes import NODES

        import nodes

        return {
            cls.GET_SCHEMA().node_id: nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id].GET_NODE_INFO_V1()
            for cls in NODES
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file or translation is stale")
    opts = parser.parse_args()
    infos = live_node_infos()
    files = node_docs.generated_files(infos)
    english = {"nodeDefs": node_docs.en_node_defs(infos), "main": node_docs.en_main(infos)}
    strings = node_docs.load_strings("zh")
    stale = [
        f"{name}.{line}"
        for name, content in english.items()
        for line in node_docs.stale_translations(content, strings.get(name, {}))
    ]
    known = set(files)
    leftovers = [path for path in node_docs.HELP_DIR.rglob("*.md") if path not in known]
    changed = [path for path, text in files.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if not opts.check:
        for path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path], encoding="utf-8")
        for path in leftovers:
            path.unlink()
    verb = "differs" if opts.check else "written"
    for path in changed:
        print(f"{verb}: {path.relative_to(REPO)}")
    for path in leftovers:
        print(f"{'not generated' if opts.check else 'removed'}: {path.relative_to(REPO)}")
    print(f"{len(files)} files, {len(changed)} {verb}; {len(infos)} nodes")
    if stale:
        print(
            f"\n{len(stale)} Chinese string(s) to (re-)translate in tools/node_docs/src/zh/strings.json "
            "(until then the Chinese UI shows the English):"
        )
        print("\n".join(f"  {line}" for line in stale))
    return 1 if opts.check and (changed or leftovers or stale) else 0


if __name__ == "__main__":
    sys.exit(main())
