#!/usr/bin/env python3
"""Run a ComfyUI workflow (API format) headlessly through ComfyUI's real executor.

    python scripts/run_workflow.py [WORKFLOW.json] [--demo] [--image PATH] [--mask PATH] [--context PATH]
                                   [--subject TEXT] [--prompt TEXT] [--seed N] [--steps N] [--width N]
                                   [--height N] [--reference-resolution N] [--output DIR] [--base-dir DIR]
                                   [--comfyui ROOT] [--server URL] [--cpu] [--check] [--verbose]

The default workflow is workflows/api/moma_context.json (MoMA context editing); the other examples
are next to it (the UI-format twins, for the browser, are in workflows/).

Two ways to execute:
- in process (default): boots the ComfyUI that scripts/setup_host.sh installs (or the one at --comfyui),
  loads custom nodes through ComfyUI's own loader, validates and executes the graph with
  ``execution.PromptExecutor``; images go to ComfyUI's output folder (or --output);
- ``--server http://127.0.0.1:8188``: posts the graph to a running ComfyUI, follows its progress over the
  websocket and downloads the images into --output (default ./out).

Before anything runs, every model file the graph names (see ``loader_inputs`` in models.json; a value
such as MoMA Loader's ``none`` names no file) is looked up in ComfyUI's model folders; missing ones are
listed with their folder and download source, and the runner exits with status 3 (so does a missing
input image or saved MoMA context). ``--demo`` writes the tiny random-weight test models (tests/fixtures),
links them into a separate base directory under the real file names and runs the same graph at 64x64
with 2 steps (Feature Grab at 128) on a generated test picture, so the whole graph can be seen executing
without any download; a saved context the graph loads is encoded from that picture by the tiny LLaVA.

Overrides (each one touches the nodes named here; an override the graph has no node for is an error):
  --image    LoadImage.image (if there are several LoadImage nodes: the one titled "...reference...");
             the file is copied into ComfyUI's input folder (uploaded with --server)
  --mask     LoadImageMask.image; without a LoadImageMask node, one (channel red: white = subject) is added
             and wired to the free ``mask`` input of every MomaObjectMasker
  --context  MomaLoadContext.context_file (a .safetensors written by Save MoMA Context); the file is copied
             into ComfyUI's input folder (uploaded with --server) and the node's ``path`` is cleared
  --subject  every literal ``subject`` input (MomaContextEncoder, MomaFeatureGrab)
  --prompt   MomaContextEncoder.prompt; without that node, the literal ``text`` of the CLIPTextEncode wired
             to a sampler's ``positive`` input
  --seed     KSampler.seed, KSamplerAdvanced/SamplerCustom/RandomNoise.noise_seed, MomaFeatureGrab.seed
  --steps    KSampler/KSamplerAdvanced/BasicScheduler.steps
  --width / --height   EmptyLatentImage.width / .height (multiples of 8)
  --reference-resolution   MomaFeatureGrab.resolution (multiple of 64, 64..1024; 512 is MoMA's own)

Exit status: 0 images written, 1 execution failed, 2 bad arguments or workflow, 3 model or input files missing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parents[1]
# Example workflows: UI format (listed by ComfyUI's template browser) in workflows/, API format in its api/.
EXAMPLES_DIR = REPO / "workflows"
API_DIR = EXAMPLES_DIR / "api"
DEFAULT_WORKFLOW = API_DIR / "moma_context.json"
MODELS_TABLE = REPO / "models.json"
PACK_LINK_NAME = "comfyui_moma"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING = 0, 1, 2, 3

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
SEED_INPUTS = {
    "KSampler": "seed",
    "KSamplerAdvanced": "noise_seed",
    "SamplerCustom": "noise_seed",
    "RandomNoise": "noise_seed",
    "MomaFeatureGrab": "seed",
}
STEPS_INPUTS = {"KSampler": "steps", "KSamplerAdvanced": "steps", "BasicScheduler": "steps"}
LATENT_SIZE_CLASSES = ("EmptyLatentImage",)
DEMO_SIZE, DEMO_STEPS, DEMO_REFERENCE_RESOLUTION = 64, 2, 128
# The first file Save MoMA Context writes in the examples (filename_prefix moma/context), for messages.
SAVED_CONTEXT_HINT = "output/moma/context_00001_.safetensors"


class RunnerError(Exception):
    """A user-facing failure: printed without a traceback, exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


DEFAULT_COMFYUI = "0.30"  # the host version scripts/setup_host.sh installs by default


def host_dir() -> Path:
    """The host scripts/setup_host.sh installs (MOMA_HOST_DIR, default <repo>/.host/comfyui-<MOMA_COMFYUI|0.30>)."""
    version = os.environ.get("MOMA_COMFYUI", DEFAULT_COMFYUI)
    return Path(os.environ.get("MOMA_HOST_DIR", REPO / ".host" / f"comfyui-{version}"))


# --------------------------------------------------------------------------------------------------
# workflow and models table


def load_models_table(path: Path = MODELS_TABLE) -> dict[str, Any]:
    """Read models.json: ``models`` (list of entries) and ``loader_inputs``."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    table["loader_inputs"] = {k: v for k, v in table["loader_inputs"].items() if not k.startswith("_")}
    return table


def load_workflow(path: Path) -> dict[str, dict]:
    """Load an API-format workflow (``{id: {class_type, inputs}}``); reject the UI format with advice."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RunnerError(f"Workflow file not found: {path}")
    except json.JSONDecodeError as e:
        raise RunnerError(f"{path} is not valid JSON: {e}")
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):  # a saved /prompt request body
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        hint = ""
        api_twin = path.parent / "api" / path.name
        if api_twin.is_file():
            hint = f" Its API variant is {api_twin}."
        raise RunnerError(
            f"{path} is a UI-format workflow (the file the browser saves). The runner needs the API format: "
            f"in ComfyUI use Workflow > Export (API), or take the file from {API_DIR.relative_to(REPO)}/.{hint}"
        )
    if not isinstance(data, dict) or not data:
        raise RunnerError(f"{path} holds no workflow nodes.")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise RunnerError(f"{path}: node {node_id!r} has no class_type/inputs; is this an API-format workflow?")
    return data


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def node_title(node: dict) -> str:
    return str(node.get("_meta", {}).get("title", ""))


def ids_of(prompt: dict, *class_types: str) -> list[str]:
    """Node ids of the given class types, in numeric order where ids are numbers."""
    found = [nid for nid, node in prompt.items() if node["class_type"] in class_types]
    return sorted(found, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))


# --------------------------------------------------------------------------------------------------
# overrides


@dataclass
class Overrides:
    image: Path | None = None
    mask: Path | None = None
    subject: str | None = None
    prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    reference_resolution: int | None = None
    context: Path | None = None


@dataclass
class StagedInput:
    """A local file that must be placed in ComfyUI's input folder and its name written into a node."""

    node_id: str
    input_name: str
    source: Path
    annotate: bool = False  # write "name [input]" (combos listing input/ and output/ files)


def _pick_one(prompt: dict, ids: list[str], title_word: str, what: str) -> str:
    if len(ids) == 1:
        return ids[0]
    titled = [i for i in ids if title_word in node_title(prompt[i]).lower()]
    if len(titled) == 1:
        return titled[0]
    listing = ", ".join(f"{i} ({node_title(prompt[i]) or prompt[i]['class_type']})" for i in ids)
    raise RunnerError(f"{what}: the workflow has several candidate nodes ({listing}); title one '...{title_word}...'.")


def _set_literal(prompt: dict, targets: dict[str, str], value: Any, changes: list[str]) -> int:
    count = 0
    for class_type, input_name in targets.items():
        for nid in ids_of(prompt, class_type):
            inputs = prompt[nid]["inputs"]
            if input_name in inputs and not is_link(inputs[input_name]):
                inputs[input_name] = value
                changes.append(f"node {nid} {class_type}.{input_name} = {value!r}")
                count += 1
    return count


def _positive_text_nodes(prompt: dict) -> list[str]:
    found: list[str] = []
    for nid in ids_of(prompt, *SAMPLER_CLASSES):
        link = prompt[nid]["inputs"].get("positive")
        if is_link(link) and link[0] in prompt:
            src = prompt[link[0]]
            if src["class_type"] == "CLIPTextEncode" and not is_link(src["inputs"].get("text")):
                if link[0] not in found:
                    found.append(link[0])
    return found


def apply_overrides(prompt: dict, ov: Overrides) -> tuple[list[str], list[StagedInput]]:
    """Apply the command-line overrides to ``prompt`` in place.

    Returns the changes made (for printing) and the local files still to be staged into ComfyUI's input
    folder (their node input is set once the file has a name there).
    """
    changes: list[str] = []
    staged: list[StagedInput] = []
    if ov.image is not None:
        ids = ids_of(prompt, "LoadImage")
        if not ids:
            raise RunnerError("--image: this workflow has no LoadImage node.")
        nid = _pick_one(prompt, ids, "reference", "--image")
        staged.append(StagedInput(nid, "image", ov.image))
    if ov.mask is not None:
        ids = ids_of(prompt, "LoadImageMask")
        if ids:
            staged.append(StagedInput(_pick_one(prompt, ids, "mask", "--mask"), "image", ov.mask))
        else:
            maskers = [i for i in ids_of(prompt, "MomaObjectMasker") if "mask" not in prompt[i]["inputs"]]
            if not maskers:
                raise RunnerError("--mask: this workflow has no LoadImageMask node and no MomaObjectMasker to feed.")
            new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
            prompt[new_id] = {
                "class_type": "LoadImageMask",
                "inputs": {"image": "", "channel": "red"},
                "_meta": {"title": "Reference mask (added by run_workflow)"},
            }
            for masker in maskers:
                prompt[masker]["inputs"]["mask"] = [new_id, 0]
            changes.append(f"node {new_id} LoadImageMask added, wired to MomaObjectMasker {', '.join(maskers)}.mask")
            staged.append(StagedInput(new_id, "image", ov.mask))
    if ov.context is not None:
        ids = ids_of(prompt, "MomaLoadContext")
        if not ids:
            raise RunnerError("--context: this workflow has no MomaLoadContext node (Load MoMA Context).")
        for nid in ids:
            staged.append(StagedInput(nid, "context_file", ov.context, annotate=True))
            if prompt[nid]["inputs"].get("path"):
                prompt[nid]["inputs"]["path"] = ""
                changes.append(f"node {nid} MomaLoadContext.path = '' (context_file is used)")
    if ov.subject is not None:
        targets = {"MomaContextEncoder": "subject", "MomaFeatureGrab": "subject"}
        if not _set_literal(prompt, targets, ov.subject, changes):
            raise RunnerError("--subject: no node in this workflow takes a subject (MomaContextEncoder, MomaFeatureGrab).")
    if ov.prompt is not None:
        if not _set_literal(prompt, {"MomaContextEncoder": "prompt"}, ov.prompt, changes):
            text_nodes = _positive_text_nodes(prompt)
            if not text_nodes:
                raise RunnerError("--prompt: no MomaContextEncoder and no CLIPTextEncode wired to a sampler's positive input.")
            for nid in text_nodes:
                prompt[nid]["inputs"]["text"] = ov.prompt
                changes.append(f"node {nid} CLIPTextEncode.text = {ov.prompt!r}")
    if ov.seed is not None:
        if ov.seed < 0:
            raise RunnerError("--seed must be >= 0.")
        if not _set_literal(prompt, SEED_INPUTS, ov.seed, changes):
            raise RunnerError("--seed: no seed input in this workflow.")
    if ov.steps is not None:
        if ov.steps < 1:
            raise RunnerError("--steps must be >= 1.")
        if not _set_literal(prompt, STEPS_INPUTS, ov.steps, changes):
            raise RunnerError("--steps: no KSampler/KSamplerAdvanced/BasicScheduler in this workflow.")
    for name, value in (("width", ov.width), ("height", ov.height)):
        if value is None:
            continue
        if value < 16 or value % 8:
            raise RunnerError(f"--{name} must be a multiple of 8 and at least 16 (got {value}).")
        if not _set_literal(prompt, {c: name for c in LATENT_SIZE_CLASSES}, value, changes):
            raise RunnerError(f"--{name}: no EmptyLatentImage node in this workflow.")
    if ov.reference_resolution is not None:
        value = ov.reference_resolution
        if value % 64 or not 64 <= value <= 1024:
            raise RunnerError(f"--reference-resolution must be a multiple of 64 from 64 to 1024 (got {value}).")
        if not _set_literal(prompt, {"MomaFeatureGrab": "resolution"}, value, changes):
            raise RunnerError("--reference-resolution: no MomaFeatureGrab (Self-Attention Feature Grab) in this workflow.")
    return changes, staged


def context_file_inputs(prompt: dict) -> list[tuple[str, str]]:
    """(node id, context_file) of every MomaLoadContext that reads its file by name (no ``path`` given)."""
    found = []
    for nid in ids_of(prompt, "MomaLoadContext"):
        inputs = prompt[nid]["inputs"]
        name = inputs.get("context_file")
        if isinstance(name, str) and not (isinstance(inputs.get("path"), str) and inputs["path"].strip()):
            found.append((nid, name))
    return found


# --------------------------------------------------------------------------------------------------
# model check


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
            use = uses.setdefault(key, ModelUse(spec["folder"], name, class_type=node["class_type"],
                                                input_name=input_name, value=value.rstrip("/\\"),
                                                auto_download=bool(spec.get("auto_download"))))
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
            lines.append(f"   get it:   {download}")
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


# --------------------------------------------------------------------------------------------------
# progress


class Progress:
    """Compact progress: one line per executed node, step counts of samplers (in place on a terminal)."""

    def __init__(self, prompt: dict, stream=None):
        self.prompt = prompt
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self.node_started = self.started
        self.executed = 0
        self.cached: set[str] = set()
        self.current: str | None = None
        self.last_quarter = -1
        self._open_line = False

    def _print(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        print(text, file=self.stream, flush=True)

    def cached_nodes(self, node_ids: Iterable[str]) -> None:
        self.cached.update(node_ids)
        if self.cached:
            self._print(f"cached (not re-run): {', '.join(sorted(self.cached))}")

    def node(self, node_id: str | None) -> None:
        if node_id is None:
            return
        now = time.perf_counter()
        self.executed += 1
        self.current = node_id
        self.node_started = now
        self.last_quarter = -1
        class_type = self.prompt.get(node_id, {}).get("class_type", "?")
        total = len(self.prompt) - len(self.cached)
        self._print(f"[{self.executed}/{total}] {class_type} (node {node_id})  t={now - self.started:.1f}s")

    def step(self, value: int, total: int) -> None:
        total = max(int(total), 1)
        value = int(value)
        elapsed = time.perf_counter() - self.node_started
        bar_len = 20
        filled = int(bar_len * value / total)
        line = f"      step {value}/{total} [{'#' * filled}{'.' * (bar_len - filled)}] {elapsed:.1f}s"
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
            self._open_line = value < total
            if value >= total:
                self.stream.write("\n")
        else:
            quarter = (4 * value) // total
            if quarter != self.last_quarter:
                self.last_quarter = quarter
                print(line, file=self.stream, flush=True)

    def done(self) -> float:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        return time.perf_counter() - self.started


# --------------------------------------------------------------------------------------------------
# in-process backend


class _BufferHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_logs() -> Iterator[list[logging.LogRecord]]:
    """Keep ComfyUI's start-up log (device banner, optional-dependency warnings) off the console.

    The records are kept so that they can be shown when a node type turns out to be missing (or --verbose).
    """
    buffer = _BufferHandler()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = [buffer]
    root.setLevel(logging.INFO)
    try:
        yield buffer.records
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


class _RunnerServer:
    """Stands in for ComfyUI's PromptServer: receives the executor's messages and shows progress."""

    def __init__(self, progress: Progress):
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.progress = progress

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        if event == "executing" and isinstance(data, dict):
            self.progress.node(data.get("node"))
        elif event == "execution_cached" and isinstance(data, dict):
            self.progress.cached_nodes(data.get("nodes") or [])

    def queue_updated(self) -> None:
        pass


class InProcessBackend:
    """ComfyUI imported into this process: the real custom-node loader, validator and executor."""

    def __init__(self, comfy_root: Path, base_dir: Path | None, force_cpu: bool, verbose: bool):
        self.comfy_root = comfy_root
        self.base_dir = base_dir
        self.force_cpu = force_cpu
        self.verbose = verbose
        self.log_records: list[logging.LogRecord] = []
        self.device = "?"
        self.saved_files: list[str] = []  # non-image outputs (saved MoMA contexts), for the summary

    # stage 1: import ComfyUI with the right args (before any model folder is read)
    def prepare(self) -> None:
        if not (self.comfy_root / "comfy").is_dir() or not (self.comfy_root / "folder_paths.py").is_file():
            raise RunnerError(
                f"No ComfyUI found at {self.comfy_root}. Run `bash scripts/setup_host.sh` (or pass --comfyui "
                "with your ComfyUI folder)."
            )
        if self.base_dir is not None:
            for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
                (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
            link = self.base_dir / "custom_nodes" / PACK_LINK_NAME
            if not link.exists() and not link.is_symlink():
                link.symlink_to(REPO, target_is_directory=True)
                print(f"linked the pack into {link}")
        sys.path.insert(0, str(self.comfy_root))
        import torch

        import comfy.options

        comfy.options.enable_args_parsing(False)
        import comfy.cli_args

        args = comfy.cli_args.args
        has_accelerator = torch.cuda.is_available() or (
            getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        )
        args.cpu = self.force_cpu or not has_accelerator
        args.disable_api_nodes = True
        if self.base_dir is not None:
            args.base_directory = str(self.base_dir)
        import utils.extra_config  # noqa: F401  (binds the top-level `utils` package before comfy/utils.py)
        import folder_paths

        if self.base_dir is not None:
            folder_paths.set_output_directory(str(self.base_dir / "output"))
            folder_paths.set_input_directory(str(self.base_dir / "input"))
            folder_paths.set_temp_directory(str(self.base_dir / "temp"))
        self.device = "cpu" if args.cpu else "gpu"

    # stage 2: built-in and custom nodes
    def load_nodes(self) -> None:
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

    def print_load_log(self, everything: bool = False) -> None:
        formatter = logging.Formatter("%(levelname)s %(message)s")
        for record in self.log_records:
            text = record.getMessage()
            if everything or (record.levelno >= logging.WARNING and "custom_nodes" in text):
                print(formatter.format(record), file=sys.stderr)

    def known_class_types(self) -> set[str]:
        import nodes

        return set(nodes.NODE_CLASS_MAPPINGS)

    def pack_loaded(self) -> bool | None:
        """Whether ComfyUI's custom-node loader imported a folder that is (or links to) this checkout."""
        import nodes

        return any(Path(d).resolve() == REPO for d in nodes.LOADED_MODULE_DIRS.values())

    def locate_model(self, use: ModelUse, entry: dict | None) -> MissingModel | None:
        import folder_paths

        if use.folder in folder_paths.folder_names_and_paths:
            folders = list(folder_paths.get_folder_paths(use.folder))
        else:
            folders = [os.path.join(folder_paths.models_dir, use.folder)]
        want_folder = bool(entry and entry["type"] == "folder")
        missing_parts: list[str] = []
        for folder in folders:
            candidate = Path(folder) / use.name
            if candidate.is_dir():
                required = entry["files"] if want_folder else []
                lacking = [f for f in required if not (candidate / f).is_file()]
                if not lacking:
                    return None
                missing_parts = lacking
            elif candidate.is_file() and not want_folder:
                return None
        target_folder = folders[0] if folders else os.path.join(folder_paths.models_dir, use.folder)
        return MissingModel(
            use, entry, str(Path(target_folder) / use.name), folder_label(target_folder, use.folder), missing_parts
        )

    def input_exists(self, name: str) -> bool:
        import folder_paths

        return bool(name) and folder_paths.exists_annotated_filepath(name)

    def context_exists(self, name: str) -> bool:
        return self.input_exists(name)

    def input_dir(self) -> str:
        import folder_paths

        return folder_paths.get_input_directory()

    def stage_input(self, source: Path) -> str:
        """Copy ``source`` into ComfyUI's input folder (never overwriting a different file); return its name."""
        import folder_paths

        if not source.is_file():
            raise RunnerError(f"Input file not found: {source}")
        input_dir = Path(folder_paths.get_input_directory())
        input_dir.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        target = input_dir / source.name
        if target.exists() and target.read_bytes() != data:
            digest = hashlib.sha256(data).hexdigest()[:8]
            target = input_dir / f"{source.stem}_{digest}{source.suffix}"
        if not target.exists():
            shutil.copyfile(source, target)
        return target.name

    def set_output_dir(self, output: Path) -> None:
        import folder_paths

        output.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(output.resolve()))

    def validate(self, prompt: dict) -> list[str]:
        """ComfyUI's own validation (types, links, widget values, combo choices); returns the output nodes."""
        import execution

        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not ok:
            raise RunnerError(format_validation_error(error, node_errors, prompt), EXIT_USAGE)
        return outputs

    def run(self, prompt: dict, progress: Progress) -> list[Path]:
        import comfy.utils
        import execution
        import folder_paths

        outputs = self.validate(prompt)
        prompt_id = str(uuid.uuid4())
        server = _RunnerServer(progress)
        comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars on stderr; our hook prints steps
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: progress.step(value, total))
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        executor.execute(prompt, prompt_id, extra_data={"client_id": "moma-runner"}, execute_outputs=outputs)
        if not executor.success:
            raise RunnerError(format_execution_error(executor.status_messages, self.verbose), EXIT_FAILED)
        paths: list[Path] = []
        base = folder_paths.get_directory_by_type("output")
        for node_output in executor.history_result["outputs"].values():
            for image in node_output.get("images", []):
                if image.get("type") != "output":
                    continue
                paths.append(Path(base) / image.get("subfolder", "") / image["filename"])
            for saved in node_output.get("moma_context", []):
                self.saved_files.append(str(Path(base) / saved.get("subfolder", "") / saved["filename"]))
        return paths


def format_validation_error(error: dict, node_errors: dict, prompt: dict) -> str:
    lines = [f"ComfyUI rejected the workflow: {error.get('message', '')} {error.get('details', '')}".rstrip()]
    for nid, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            lines.append(f"  node {nid} {info.get('class_type', prompt.get(nid, {}).get('class_type', '?'))}: "
                         f"{err.get('message', '')}: {err.get('details', '')}")
    return "\n".join(lines)


def format_execution_error(messages: list, verbose: bool) -> str:
    for event, data in messages:
        if event == "execution_error":
            text = (f"Node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}".rstrip())
            if verbose and data.get("traceback"):
                text += "\n" + "".join(data["traceback"])
            elif not verbose:
                text += "\n(run with --verbose for the traceback)"
            return text
        if event == "execution_interrupted":
            return f"Execution interrupted at node {data.get('node_id')} ({data.get('node_type')})."
    return "Execution failed (no error message from ComfyUI)."


# --------------------------------------------------------------------------------------------------
# server backend


class ServerBackend:
    """A running ComfyUI reached over HTTP + websocket (aiohttp, which ComfyUI itself depends on)."""

    def __init__(self, url: str, output_dir: Path, verbose: bool):
        self.url = url.rstrip("/")
        self.output_dir = output_dir
        self.verbose = verbose
        self.object_info: dict[str, Any] = {}
        self.folder_paths: dict[str, list[str]] = {}
        self.uploaded: set[str] = set()
        self.device = "server"
        self.saved_files: list[str] = []

    async def _get(self, session, path: str) -> Any:
        async with session.get(self.url + path) as resp:
            if resp.status != 200:
                raise RunnerError(f"{self.url}{path} answered HTTP {resp.status}.", EXIT_FAILED)
            return await resp.json()

    def prepare(self) -> None:
        import aiohttp

        async def fetch() -> None:
            async with aiohttp.ClientSession() as session:
                self.object_info = await self._get(session, "/object_info")
                try:
                    self.folder_paths = await self._get(session, "/internal/folder_paths")
                except RunnerError:
                    self.folder_paths = {}

        try:
            asyncio.run(fetch())
        except aiohttp.ClientError as e:
            raise RunnerError(f"No ComfyUI server answers at {self.url} ({e}). Start one or drop --server.", EXIT_FAILED)

    def load_nodes(self) -> None:
        pass

    def print_load_log(self, everything: bool = False) -> None:
        print("(see the server's console for custom-node import errors)", file=sys.stderr)

    def known_class_types(self) -> set[str]:
        return set(self.object_info)

    def pack_loaded(self) -> bool | None:
        return None  # unknown from outside

    def _options(self, class_type: str, input_name: str) -> list[str] | None:
        info = self.object_info.get(class_type, {}).get("input", {})
        spec = info.get("required", {}).get(input_name) or info.get("optional", {}).get(input_name)
        if not spec:
            return None
        if isinstance(spec[0], list):
            return [str(o) for o in spec[0]]
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(o) for o in spec[1].get("options", [])]
        return None

    def locate_model(self, use: ModelUse, entry: dict | None) -> MissingModel | None:
        options = self._options(use.class_type, use.input_name)
        if options is not None and use.value in {o.rstrip("/\\") for o in options}:
            if not use.auto_download:  # an auto-download node lists files it does not have yet
                return None
        folders = self.folder_paths.get(use.folder) or []
        target_folder = folders[0] if folders else f"models/{use.folder}"
        return MissingModel(use, entry, str(Path(target_folder) / use.name), folder_label(target_folder, use.folder))

    def input_exists(self, name: str) -> bool:
        return name in self.uploaded or name in (self._options("LoadImage", "image") or [])

    def context_exists(self, name: str) -> bool:
        uploaded = name[: -len(" [input]")] if name.endswith(" [input]") else None
        return uploaded in self.uploaded or name in (self._options("MomaLoadContext", "context_file") or [])

    def input_dir(self) -> str:
        return "the server's input folder"

    def stage_input(self, source: Path) -> str:
        import aiohttp

        if not source.is_file():
            raise RunnerError(f"Input file not found: {source}")

        async def upload() -> str:
            form = aiohttp.FormData()
            form.add_field("image", source.read_bytes(), filename=source.name, content_type="application/octet-stream")
            async with aiohttp.ClientSession() as session:
                async with session.post(self.url + "/upload/image", data=form) as resp:
                    if resp.status != 200:
                        raise RunnerError(f"Upload of {source} failed: HTTP {resp.status}", EXIT_FAILED)
                    body = await resp.json()
            sub = body.get("subfolder") or ""
            return f"{sub}/{body['name']}" if sub else body["name"]

        name = asyncio.run(upload())
        self.uploaded.add(name)
        return name

    def set_output_dir(self, output: Path) -> None:
        self.output_dir = output

    def validate(self, prompt: dict) -> list[str]:
        return []  # a server validates only what it queues: --check stops at the model and input checks

    def run(self, prompt: dict, progress: Progress) -> list[Path]:
        return asyncio.run(self._run(prompt, progress))

    async def _run(self, prompt: dict, progress: Progress) -> list[Path]:
        import aiohttp

        client_id = f"moma-runner-{uuid.uuid4().hex[:8]}"
        error_message: str | None = None
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                async with session.post(self.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RunnerError(
                            format_validation_error(body.get("error", {}), body.get("node_errors", {}), prompt),
                            EXIT_USAGE,
                        )
                prompt_id = body["prompt_id"]
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        continue  # previews
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RunnerError("The server closed the websocket before the workflow finished.", EXIT_FAILED)
                    message = json.loads(msg.data)
                    data = message.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    kind = message.get("type")
                    if kind == "executing":
                        if data.get("node") is None and data.get("prompt_id") == prompt_id:
                            break
                        progress.node(data.get("node"))
                    elif kind == "execution_cached":
                        progress.cached_nodes(data.get("nodes") or [])
                    elif kind == "progress":
                        progress.step(data.get("value", 0), data.get("max", 1))
                    elif kind in ("execution_error", "execution_interrupted"):
                        error_message = format_execution_error([(kind, data)], self.verbose)
                        break
                    elif kind == "execution_success":
                        break
            if error_message:
                raise RunnerError(error_message, EXIT_FAILED)
            history: dict = {}
            for _ in range(100):  # the history entry lands just after the last message
                history = await self._get(session, f"/history/{prompt_id}")
                if prompt_id in history:
                    break
                await asyncio.sleep(0.1)
            entry = history.get(prompt_id, {})
            status = entry.get("status", {})
            if status.get("status_str") not in (None, "success"):
                raise RunnerError(format_execution_error(status.get("messages", []), self.verbose), EXIT_FAILED)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            paths: list[Path] = []
            for node_output in entry.get("outputs", {}).values():
                for saved in node_output.get("moma_context", []):
                    self.saved_files.append(f"{saved.get('subfolder', '')}/{saved['filename']} (server's output folder)")
                for image in node_output.get("images", []):
                    if image.get("type") != "output":
                        continue
                    params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"}
                    async with session.get(self.url + "/view", params=params) as resp:
                        if resp.status != 200:
                            raise RunnerError(f"Could not fetch {image['filename']}: HTTP {resp.status}", EXIT_FAILED)
                        target = self.output_dir / image["filename"]
                        target.write_bytes(await resp.read())
                        paths.append(target)
        return paths


# --------------------------------------------------------------------------------------------------
# demo: tiny fixture models under the real file names


def _demo_vae_writer(checkpoint: Path) -> Callable[[Path], None]:
    """A VAE file in the layout of vae-ft-mse-840000-ema-pruned.safetensors, cut out of the fixture checkpoint."""

    def write(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        prefix = "first_stage_model."
        with safe_open(str(checkpoint), framework="pt") as f:
            tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        save_file(tensors, str(path))

    return write


def demo_model_builders() -> dict[str, Callable[[], Path]]:
    """Model folder -> function building (or fetching from the cache) the fixture that stands in for it."""
    tests_dir = str(REPO / "tests")
    if tests_dir not in sys.path:
        sys.path.append(tests_dir)  # last: tests/nodes, tests/moma must never shadow ComfyUI's modules
    import fixtures  # tests/fixtures: cached, deterministic writers of tiny real-format models

    def checkpoint() -> Path:
        from fixtures import sd15

        return fixtures.cached("moma_test_sd15.safetensors", sd15.write_sd15_checkpoint)

    def vae() -> Path:
        ckpt = checkpoint()  # the cache key of a closure is this file; name the entry after the checkpoint's
        return fixtures.cached(f"demo_vae_of_{ckpt.parent.name}.safetensors", _demo_vae_writer(ckpt))

    def llava() -> Path:
        from fixtures import llava as llava_fixture

        return fixtures.cached("MoMA_llava_7b", llava_fixture.write_llava_folder)

    def clip_vision() -> Path:
        from fixtures import clip_vision as clip_fixture

        return fixtures.cached("clip-vit-large-patch14-336", clip_fixture.write_clip_vision_folder)

    def adapter() -> Path:
        from fixtures import adapter as adapter_fixture

        return fixtures.cached("attn_adapters_projectors.th", adapter_fixture.write_adapter_th)

    def rembg_model() -> Path:
        from fixtures import rembg as rembg_fixture

        return fixtures.cached("u2net.onnx", rembg_fixture.write_u2net_onnx)

    def lora() -> Path:
        from fixtures import lora as lora_fixture

        return fixtures.cached("moma_test_sd15_lora.safetensors", lora_fixture.write_sd15_lora)

    return {"checkpoints": checkpoint, "vae": vae, "LLM": llava, "clip_vision": clip_vision,
            "moma": adapter, "rembg": rembg_model, "loras": lora}


def demo_images() -> dict[str, tuple[Path, Path]]:
    """name -> (image, mask) test pictures from tests/fixtures/images.py."""
    demo_model_builders()  # puts tests/ on sys.path
    import fixtures
    from fixtures import images

    return images.index(fixtures.cached("images", images.write_test_images))


def prepare_demo(base_dir: Path, prompt: dict, table: dict, ov: Overrides) -> None:
    """Link a tiny fixture model into ``base_dir/models`` under every name the graph uses; pick demo inputs."""
    builders = demo_model_builders()
    for use in model_uses(prompt, table["loader_inputs"]):
        if use.folder not in builders:
            raise RunnerError(f"--demo has no stand-in for the {use.folder} model {use.name}.")
        started = time.perf_counter()
        print(f"demo: models/{use.folder}/{use.name} = tiny random stand-in", flush=True)
        source = builders[use.folder]()
        elapsed = time.perf_counter() - started
        if elapsed > 1:
            print(f"      built in {elapsed:.1f}s (cached for later runs)", flush=True)
        link = base_dir / "models" / use.folder / use.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == source:
                continue
            if link.is_dir() and not link.is_symlink():
                shutil.rmtree(link)
            else:
                link.unlink()
        link.symlink_to(source, target_is_directory=source.is_dir())
    if ids_of(prompt, "LoadImage") and ov.image is None:
        image, mask = demo_images()["rgb"]
        ov.image = image
        print(f"demo: reference image {image.name} (fixture)")
    if ids_of(prompt, "MomaFeatureGrab") and ov.reference_resolution is None:
        ov.reference_resolution = DEMO_REFERENCE_RESOLUTION


def loaded_pack_module() -> str:
    """The module name under which ComfyUI's custom-node loader imported this checkout."""
    init = (REPO / "__init__.py").resolve()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == init:
            return name
    raise RunnerError(f"The pack ({REPO}) was not loaded by ComfyUI's custom-node loader; run with --verbose.")


DEMO_CONTEXT_PROMPT = "A car in autumn with falling leaves."


def demo_context_file(subject: str) -> Path:
    """A MoMA context of the demo picture, encoded by the tiny LLaVA through the pack's own code (cached).

    Needs the pack loaded (call after ``load_nodes``); stands in for the file Save MoMA Context writes."""
    import numpy as np
    import torch
    from PIL import Image

    builders = demo_model_builders()
    import fixtures

    pack = loaded_pack_module()
    model_module = importlib.import_module(f"{pack}.moma.model")
    context_module = importlib.import_module(f"{pack}.moma.context")
    image_path, mask_path = demo_images()["rgb"]
    llava = builders["LLM"]()

    def write(path: Path) -> None:
        moma = model_module.MomaModel.load(builders["moma"](), llava, builders["clip_vision"](), precision="fp32")
        with Image.open(image_path) as picture:
            image = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)
        with Image.open(mask_path) as picture:
            mask = torch.from_numpy(np.asarray(picture.convert("L"), dtype=np.float32) / 255.0)
        encoder = moma.load_encoder("cpu")
        context = model_module.encode_context(encoder, moma, image, mask, subject, DEMO_CONTEXT_PROMPT)
        context_module.save_context(context, path)

    slug = re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_") or "subject"
    # named after the LLaVA fixture's version, as the cache key only covers this file
    return fixtures.cached(f"demo_context_{slug}_of_{llava.parent.name}.safetensors", write)


def demo_context_subject(prompt: dict) -> str:
    """The subject the graph's Feature Grab uses (the saved context must name the same object)."""
    for nid in ids_of(prompt, "MomaFeatureGrab"):
        subject = prompt[nid]["inputs"].get("subject")
        if isinstance(subject, str) and subject.strip():
            return subject.strip()
    return "car"


# --------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_workflow.py",
        description="Run a ComfyUI API-format workflow headlessly through ComfyUI's real executor.",
        epilog="Overrides" + __doc__.split("Overrides", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workflow", nargs="?", type=Path, default=DEFAULT_WORKFLOW,
                        help=f"API-format workflow JSON (default: {DEFAULT_WORKFLOW.relative_to(REPO)})")
    parser.add_argument("--demo", action="store_true",
                        help="run on generated tiny models (no downloads), 64x64, 2 steps, reference at 128, "
                             "in a separate base dir")
    parser.add_argument("--image", type=Path, help="reference image (LoadImage)")
    parser.add_argument("--mask", type=Path, help="subject mask, white = subject (LoadImageMask)")
    parser.add_argument("--context", type=Path,
                        help="saved MoMA context .safetensors (Save MoMA Context) for MomaLoadContext")
    parser.add_argument("--subject", help="subject word, e.g. 'car' (MomaContextEncoder, MomaFeatureGrab)")
    parser.add_argument("--prompt", help="text prompt (MomaContextEncoder.prompt, else the positive CLIPTextEncode)")
    parser.add_argument("--seed", type=int, help="sampler seed (also MomaFeatureGrab.seed)")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--width", type=int, help="image width (EmptyLatentImage)")
    parser.add_argument("--height", type=int, help="image height (EmptyLatentImage)")
    parser.add_argument("--reference-resolution", type=int, metavar="N",
                        help="side the reference is encoded at (MomaFeatureGrab.resolution; 512 is MoMA's, "
                             "--demo uses 128)")
    parser.add_argument("--output", type=Path,
                        help="folder for the images (default: ComfyUI's output folder; ./out with --server)")
    parser.add_argument("--base-dir", type=Path,
                        help="ComfyUI base directory (models/, input/, output/, custom_nodes/); default "
                             "<host>/base, or <host>/demo-base with --demo, or the --comfyui folder itself")
    parser.add_argument("--comfyui", type=Path,
                        help="ComfyUI root to import (default: the host scripts/setup_host.sh installs)")
    parser.add_argument("--server", metavar="URL", help="run on a ComfyUI server, e.g. http://127.0.0.1:8188")
    parser.add_argument("--check", action="store_true",
                        help="only check: node types, model files, input images and ComfyUI's validation; run nothing")
    parser.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is available")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's log and full tracebacks")
    args = parser.parse_args(argv)
    if args.server and (args.demo or args.comfyui or args.base_dir):
        parser.error("--server runs on the server's own ComfyUI and models; it cannot combine with "
                     "--demo, --comfyui or --base-dir")
    return args


def report_problems(backend: InProcessBackend | ServerBackend, prompt: dict, unknown: list[str],
                    missing: list[MissingModel], fetched_later: list[MissingModel],
                    missing_inputs: list[tuple[str, str]], missing_contexts: list[tuple[str, str]] = ()) -> int:
    """Print what stops the graph from running (on stderr); return the exit status (EXIT_OK if nothing)."""
    problems = 0
    if unknown:
        problems |= 1
        print(f"\nThis ComfyUI has no node type(s): {', '.join(unknown)}.", file=sys.stderr)
        if backend.pack_loaded():
            print(f"The pack ({REPO}) is loaded but does not provide them: is the checkout up to date?",
                  file=sys.stderr)
        else:
            print("Is the pack installed under custom_nodes/ and did it import? Messages from the custom-node "
                  "loader:", file=sys.stderr)
            backend.print_load_log()
    if missing:
        problems |= 2
        print("\n" + format_missing(missing + fetched_later), file=sys.stderr, end="")
    elif fetched_later:
        for m in fetched_later:
            print(f"note: {m.use.name} is not in {m.target}; {m.use.class_type} downloads it on first use "
                  f"(needs internet; source: {m.entry['download'] if m.entry else 'rembg releases'}).")
    if missing_inputs:
        problems |= 2
        for nid, name in missing_inputs:
            print(f"\nInput image {name!r} (node {nid} {prompt[nid]['class_type']}) is not in {backend.input_dir()}: "
                  f"pass {'--mask' if prompt[nid]['class_type'] == 'LoadImageMask' else '--image'} PATH.",
                  file=sys.stderr)
    if missing_contexts:
        problems |= 2
        for nid, name in missing_contexts:
            print(f"\nSaved MoMA context {name!r} (node {nid} MomaLoadContext) is not there. Run "
                  f"{DEFAULT_WORKFLOW.relative_to(REPO)} first (its Save MoMA Context node writes "
                  f"{SAVED_CONTEXT_HINT}), or pass --context PATH.", file=sys.stderr)
    if not problems:
        return EXIT_OK
    return EXIT_MISSING if problems & 2 else EXIT_USAGE


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    table = load_models_table()
    workflow_path = args.workflow.resolve()
    prompt = load_workflow(workflow_path)
    ov = Overrides(image=args.image, mask=args.mask, subject=args.subject, prompt=args.prompt, seed=args.seed,
                   steps=args.steps, width=args.width, height=args.height,
                   reference_resolution=args.reference_resolution, context=args.context)
    if args.demo:  # small and short unless asked otherwise
        if ids_of(prompt, *LATENT_SIZE_CLASSES):
            ov.width, ov.height = ov.width or DEMO_SIZE, ov.height or DEMO_SIZE
        if ids_of(prompt, *STEPS_INPUTS):
            ov.steps = ov.steps or DEMO_STEPS

    if args.server:
        backend: InProcessBackend | ServerBackend = ServerBackend(args.server, (args.output or Path("out")).resolve(),
                                                                  args.verbose)
    else:
        comfy_root = (args.comfyui or host_dir() / "ComfyUI").resolve()
        if args.base_dir is not None:
            base_dir: Path | None = args.base_dir.resolve()
        elif args.demo:
            base_dir = host_dir() / "demo-base"
        elif args.comfyui is not None:
            base_dir = None  # a user's own install: its own models/, input/, output/
        else:
            base_dir = host_dir() / "base"
        backend = InProcessBackend(comfy_root, base_dir, args.cpu, args.verbose)

    print(f"workflow: {workflow_path}")
    with captured_logs() as log_records:
        backend.prepare()
        if args.demo:
            assert isinstance(backend, InProcessBackend) and backend.base_dir is not None
            print(f"demo: tiny random-weight models in {backend.base_dir / 'models'} (images are noise)")
            prepare_demo(backend.base_dir, prompt, table, ov)
        changes, staged = apply_overrides(prompt, ov)
        backend.load_nodes()
        if args.demo and ov.context is None and context_file_inputs(prompt):
            subject = demo_context_subject(prompt)
            context = demo_context_file(subject)
            print(f"demo: saved MoMA context = {context.name} (the fixture picture, subject {subject!r}, "
                  "encoded by the tiny LLaVA)")
            staged += [StagedInput(nid, "context_file", context, annotate=True) for nid, _ in context_file_inputs(prompt)]
    if isinstance(backend, InProcessBackend):
        backend.log_records = log_records
        if args.verbose:
            backend.print_load_log(everything=True)
    print(f"ComfyUI ready on {backend.device} ({time.perf_counter() - started:.1f}s)")

    unknown = sorted({n["class_type"] for n in prompt.values()} - backend.known_class_types())
    missing = [m for use in model_uses(prompt, table["loader_inputs"])
               if (m := backend.locate_model(use, table_entry(table, use.folder, use.name))) is not None]
    fetched_later = [m for m in missing if m.use.auto_download]
    missing = [m for m in missing if not m.use.auto_download]
    for item in staged:
        name = backend.stage_input(item.source)
        prompt[item.node_id]["inputs"][item.input_name] = f"{name} [input]" if item.annotate else name
        changes.append(f"node {item.node_id} {prompt[item.node_id]['class_type']}.{item.input_name} = "
                       f"{prompt[item.node_id]['inputs'][item.input_name]!r} (from {item.source})")
    missing_inputs = [
        (nid, prompt[nid]["inputs"]["image"]) for nid in ids_of(prompt, "LoadImage", "LoadImageMask")
        if isinstance(prompt[nid]["inputs"].get("image"), str) and not backend.input_exists(prompt[nid]["inputs"]["image"])
    ]
    missing_contexts = [(nid, name) for nid, name in context_file_inputs(prompt) if not backend.context_exists(name)]
    for change in changes:
        print(f"override: {change}")

    code = report_problems(backend, prompt, unknown, missing, fetched_later, missing_inputs, missing_contexts)
    if code != EXIT_OK:
        return code
    if args.check:
        backend.validate(prompt)
        print("check passed: every node type, model file and input file is there"
              + (" and ComfyUI accepts the graph." if isinstance(backend, InProcessBackend) else "."))
        return EXIT_OK

    if args.output is not None:
        backend.set_output_dir(args.output.resolve())
    progress = Progress(prompt)
    images = backend.run(prompt, progress)
    elapsed = progress.done()
    if not images:
        print("The workflow ran but saved no images (no SaveImage node?).", file=sys.stderr)
        return EXIT_FAILED
    for saved in backend.saved_files:
        print(f"saved MoMA context: {saved}")
    print(f"done in {elapsed:.1f}s (total {time.perf_counter() - started:.1f}s); images:")
    for path in images:
        print(f"  {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RunnerError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
