"""Console progress of a run: one line per executed node, sampler steps, and what slow first steps do."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TextIO

# Nodes whose first run in a ComfyUI process is slow for a reason the user cannot see: said once per run.
FIRST_RUN_NOTES = {
    "MomaObjectMasker": "when it cuts the subject out with rembg, its first run imports rembg and opens its "
    "ONNX model: up to about 30 s on a CPU the first time, seconds once cached",
}


class Progress:
    """Compact progress: one line per executed node, step counts of samplers (in place on a terminal)."""

    def __init__(self, prompt: dict, stream: TextIO | None = None):
        self.prompt = prompt
        self.stream = stream or sys.stdout
        self.noted: set[str] = set()
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
        """Nodes the executor took from its cache."""
        self.cached.update(node_ids)
        if self.cached:
            self._print(f"cached (not re-run): {', '.join(sorted(self.cached))}")

    def node(self, node_id: str | None) -> None:
        """A node started executing (None: the run ended)."""
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
        note = FIRST_RUN_NOTES.get(class_type)
        if note and class_type not in self.noted:
            self.noted.add(class_type)
            self._print(f"      note: {note}")

    def step(self, value: int, total: int) -> None:
        """A progress-bar update (sampler steps, downloads)."""
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
        """Close the progress output; return the seconds since the start."""
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        return time.perf_counter() - self.started
