"""The interface both ways of running a graph implement: ComfyUI in this process, or a ComfyUI server."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path

from .models import MissingModel, ModelUse
from .progress import Progress


class Backend(ABC):
    """A ComfyUI to check and run a graph on. The runner calls, in order: ``starting`` (around ``prepare``,
    the demo models and ``load_nodes``), the checks (``known_class_types``, ``locate_model``,
    ``input_exists``, ``context_exists``, after ``stage_input``), then ``validate`` and ``run``."""

    device: str = "?"  # shown in "ComfyUI ready on ..."

    def __init__(self) -> None:
        self.saved_files: list[str] = []  # non-image outputs (saved MoMA contexts), for the summary

    def starting(self) -> contextlib.AbstractContextManager:
        """Context around start-up (e.g. to keep ComfyUI's start-up log off the console)."""
        return contextlib.nullcontext()

    @abstractmethod
    def prepare(self) -> None:
        """Reach ComfyUI: import and configure it, or connect to the server."""

    @abstractmethod
    def load_nodes(self) -> None:
        """Make ComfyUI's built-in and custom nodes (the pack among them) available."""

    @abstractmethod
    def provide_demo_models(self, uses: list[ModelUse], builders: dict[str, Callable[[], Path]]) -> None:
        """Put the tiny demo stand-ins under the names the graph uses, or raise RunnerError saying why not."""

    @abstractmethod
    def load_problems(self) -> Iterator[str]:
        """Lines explaining why node types may be missing (the custom-node loader's messages)."""

    @abstractmethod
    def known_class_types(self) -> set[str]:
        """Node types this ComfyUI has."""

    @abstractmethod
    def pack_loaded(self) -> bool | None:
        """Whether this checkout is loaded (None: cannot tell)."""

    @abstractmethod
    def locate_model(self, use: ModelUse, entry: dict | None) -> MissingModel | None:
        """None if ComfyUI has the model file (or complete folder) ``use`` names, else what is missing."""

    @abstractmethod
    def input_exists(self, name: str) -> bool:
        """Whether LoadImage/LoadImageMask can read ``name`` from ComfyUI's input folder."""

    @abstractmethod
    def context_exists(self, name: str) -> bool:
        """Whether MomaLoadContext can read ``name`` (``file [input]`` / ``file [output]``)."""

    @abstractmethod
    def input_dir(self) -> str:
        """ComfyUI's input folder, for messages."""

    @abstractmethod
    def stage_input(self, source: Path) -> str:
        """Place a local file in ComfyUI's input folder; return its name there."""

    @abstractmethod
    def set_output_dir(self, output: Path) -> None:
        """Where the images of the run end up on this machine."""

    @abstractmethod
    def validate(self, prompt: dict) -> list[str]:
        """ComfyUI's input validation (types, links, ranges, combo choices); RunnerError if any node fails.
        Returns the output nodes."""

    @abstractmethod
    def run(self, prompt: dict, progress: Progress) -> list[Path]:
        """Execute the graph; return the saved images (on this machine)."""
