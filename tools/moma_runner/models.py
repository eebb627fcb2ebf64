"""Which model files a graph needs (models.json's ``loader_inputs``), and the missing-file message."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import MODELS_TABLE
from .workflow import ids_of, is_link


def load_models_table(path: Path = MODELS_TABLE) -> dict[str, Any]:
    """Read models.json: ``models`` (list of entries) and ``loader_inputs``."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    table["loader_inputs"] = {k: v for k, v in table["loader_inputs"].items() if not k.startswith("_")}
    return table


@dataclass
class ModelUse:
    folder: str
    name: str
    users: list[str] = field(default_factory=list)  # "node 1 CheckpointLoaderSimple.ckpt_name"
    class_type: str = ""
    input_name: str = ""
    value: str = ""  # the workflow's value (the file name, or its stem where the node appends a suffix)
    auto_download: bool = False  # the node fetches a missing file itself


@dataclass
class MissingModel:
    use: ModelUse
    entry: dict | None
    target: str | None  # absolute path where it should go
    folder_label: str  # "models/checkpoints/" (or the absolute folder when not under a models/ dir)
    missing_parts: list[str] = field(default_factory=list)  # files missing inside a present folder


def _input_spec(spec: str | dict) -> dict:
    return {"folder": spec} if isinstance(spec, str) else spec


def model_uses(prompt: dict, loader_inputs: dict[str, dict[str, str | dict]]) -> list[ModelUse]:
    """Every (folder, file name) the graph's loader inputs name, deduplicated, in node order."""
    uses: dict[tuple[str, str], ModelUse] = {}
    for nid in ids_of(prompt, *loader_inputs):
        node = prompt[nid]
        for input_name, raw_spec in loader_inputs[node["class_type"]].items():
            spec = _input_spec(raw_spec)
            value = node["inputs"].get(input_name)
            if not isinstance(value, str) or not value or value in spec.get("no_file", ()):
                continue  # e.g. MoMA Loader's llava_name 'none': no file to find
            if spec.get("unused_if_linked") and is_link(node["inputs"].get(spec["unused_if_linked"])):
                continue
            name = value.rstrip("/\\")
            suffix = spec.get("suffix", "")
            if suffix and not name.endswith(suffix):
                name += suffix
            key = (spec["folder"], name)
            use = uses.setdefault(
                key,
                ModelUse(
                    spec["folder"],
                    name,
                    class_type=node["class_type"],
                    input_name=input_name,
                    value=value.rstrip("/\\"),
                    auto_download=bool(spec.get("auto_download")),
                ),
            )
            use.users.append(f"node {nid} {node['class_type']}.{input_name}")
    return list(uses.values())


def table_entry(table: dict, folder: str, name: str) -> dict | None:
    for entry in table["models"]:
        if entry["folder"] == folder and entry["name"] == name:
            return entry
    return None


def folder_label(folder_path: str, folder: str) -> str:
    p = Path(folder_path)
    if p.parent.name == "models":
        return f"models/{p.name}/"
    return f"{folder_path}{os.sep}"


def format_missing(missing: list[MissingModel]) -> str:
    """The message listing each missing model: name, folder under models/ (and absolute path), source."""
    lines = [
        f"The workflow needs {len(missing)} model file(s) that are not installed. "
        "Put each one where shown and run again (table: README 'Models', models.json).",
        "",
    ]
    for i, m in enumerate(missing, 1):
        entry = m.entry
        kind = "folder" if (entry and entry["type"] == "folder") else "file"
        head = f"{i}. {m.use.name}" + ("/" if kind == "folder" else "")
        if entry:
            head += f"  ({entry['size']}) {entry['what']}"
        lines.append(head)
        lines.append(f"   used by:  {'; '.join(m.use.users)}")
        lines.append(f"   goes in:  {m.folder_label}  ->  {m.target or '(unknown folder)'}")
        if entry:
            download = entry["download"].replace("{dest}", m.target or m.use.name)
            lines.append(f"   get it:   bash scripts/run.sh --download {entry['name']}   (into the runner's own host)")
            lines.append(f"   or:       {download}")
            lines.append(f"   source:   {entry['source']}")
            if kind == "folder":
                lines.append(f"   contents: {', '.join(entry['files'])}")
        else:
            lines.append(
                f"   get it:   not in the pack's model table; any {m.use.folder} model works: put yours there "
                f"or change {m.use.input_name} in the workflow (pass a different file name)"
            )
        if m.use.auto_download:
            lines.append(f"   or:       {m.use.class_type} downloads it on first use when it can reach the internet")
        if m.missing_parts:
            lines.append(f"   the folder exists but lacks: {', '.join(m.missing_parts)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
