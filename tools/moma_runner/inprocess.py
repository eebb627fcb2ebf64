"""The in-process backend: ComfyUI imported here (tools/moma_runner/boot.py), its real custom-node loader,
validator and ``execution.PromptExecutor``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import boot
from .backend import Backend
from .common import EXIT_FAILED, EXIT_USAGE, REPO, RunnerError, place_samples
from .models import MissingModel, ModelUse, folder_label
from .progress import Progress
from .validation import format_execution_error, format_validation_error

EXECUTOR_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}  # no cache: models a graph loads are freed


class _BufferHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


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


class InProcessBackend(Backend):
    """ComfyUI imported into this process."""

    def __init__(self, comfy_root: Path, base_dir: Path | None, force_cpu: bool, verbose: bool, demo: bool = False):
        super().__init__()
        self.demo = demo
        self.comfy_root = comfy_root
        self.base_dir = base_dir
        self.force_cpu = force_cpu
        self.verbose = verbose
        self.log_records: list[logging.LogRecord] = []
        self.host: boot.ComfyHost | None = None

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Keep ComfyUI's start-up log (device banner, optional-dependency warnings) off the console; the
        records are kept for when a node type turns out to be missing (or --verbose)."""
        buffer = _BufferHandler()
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        root.handlers = [buffer]
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.handlers = saved_handlers
            root.setLevel(saved_level)
            self.log_records = buffer.records
            if self.verbose:
                for line in self._log_lines(everything=True):
                    print(line, file=sys.stderr)

    def prepare(self) -> None:
        if self.base_dir is not None:
            link = boot.make_base_dir(self.base_dir)
            if link is not None:
                print(f"linked the pack into {link}")
            for placed in place_samples(self.base_dir / "input"):
                print(f"sample picture: {placed} (what the example workflows load)")
        cpu = self.force_cpu or not boot.has_accelerator()
        try:
            # on a CPU the demo's random UNet is held in fp8 (--fp8_e4m3fn-unet; ComfyUI computes in fp32): 0.8 GB,
            # not fp16's 1.6 (or the 3.2 GB fp32 copy ComfyUI makes by default), and its load peaks ~0.8 GB lower.
            # Random weights need no precision; sampling is ~2x slower per step than in fp16.
            comfy_args = {"fp8_e4m3fn_unet": True} if self.demo and cpu else None
            self.host = boot.configure(self.comfy_root, self.base_dir, cpu=cpu, comfy_args=comfy_args)
        except boot.ComfyBootError as e:
            raise RunnerError(str(e)) from None
        self.device = self.host.device

    def load_nodes(self) -> None:
        assert self.host is not None, "prepare() first"
        boot.load_nodes(self.host)

    def provide_demo_models(self, uses: list[ModelUse], builders: dict[str, Callable[[], Path]]) -> None:
        from .demo import link_demo_models

        if self.base_dir is None:
            raise RunnerError("--demo needs a base directory of its own (it links stand-in models into it).")
        link_demo_models(self.base_dir / "models", uses, builders)

    def _log_lines(self, everything: bool = False) -> Iterator[str]:
        formatter = logging.Formatter("%(levelname)s %(message)s")
        for record in self.log_records:
            if everything or (record.levelno >= logging.WARNING and "custom_nodes" in record.getMessage()):
                yield formatter.format(record)

    def load_problems(self) -> Iterator[str]:
        yield "Is the pack installed under custom_nodes/ and did it import? Messages from the custom-node loader:"
        yield from self._log_lines()

    def known_class_types(self) -> set[str]:
        import nodes

        return set(nodes.NODE_CLASS_MAPPINGS)

    def pack_loaded(self) -> bool | None:
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
                lacking = [f for f in (entry["files"] if want_folder else []) if not (candidate / f).is_file()]
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
            target = input_dir / f"{source.stem}_{hashlib.sha256(data).hexdigest()[:8]}{source.suffix}"
        if not target.exists():
            shutil.copyfile(source, target)
        return target.name

    def set_output_dir(self, output: Path) -> None:
        import folder_paths

        output.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(output.resolve()))

    def validate(self, prompt: dict) -> list[str]:
        """ComfyUI's own ``validate_prompt``; a graph with any failing node is rejected (ComfyUI itself would
        run the outputs that pass and silently skip the rest)."""
        import execution

        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not ok or node_errors:
            raise RunnerError(format_validation_error(error, node_errors, prompt), EXIT_USAGE)
        return outputs

    def run(self, prompt: dict, progress: Progress) -> list[Path]:
        import comfy.utils
        import execution
        import folder_paths

        outputs = self.validate(prompt)
        server = _RunnerServer(progress)
        comfy.utils.set_progress_bar_enabled(False)  # no tqdm bars on stderr; our hook prints steps
        comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: progress.step(value, total))
        executor = execution.PromptExecutor(
            server, cache_type=execution.CacheType.CLASSIC, cache_args=EXECUTOR_CACHE_ARGS
        )
        executor.execute(prompt, str(uuid.uuid4()), extra_data={"client_id": "moma-runner"}, execute_outputs=outputs)
        if not executor.success:
            raise RunnerError(format_execution_error(executor.status_messages, self.verbose), EXIT_FAILED)
        paths: list[Path] = []
        base = folder_paths.get_directory_by_type("output")
        for node_output in executor.history_result["outputs"].values():
            for image in node_output.get("images", []):
                if image.get("type") == "output":
                    paths.append(Path(base) / image.get("subfolder", "") / image["filename"])
            for saved in node_output.get("moma_context", []):
                self.saved_files.append(str(Path(base) / saved.get("subfolder", "") / saved["filename"]))
        return paths
