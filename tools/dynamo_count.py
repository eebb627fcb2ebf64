"""What torch.compile's dynamo did while a block ran: frames it compiled, recompiles (each with the guard that
failed), graph breaks, and frames that hit the recompile limit and from then on ran eagerly. Used by the compile
tests and by ``benchmarks/sampling.py``.

    with watch_dynamo() as seen:
        comfy.sample.sample_custom(...)
    seen.recompiles      # one guard-failure text per recompile
    seen.graph_breaks    # reason -> count
    seen.limit_hits      # "hit config.recompile_limit" warnings (the frame then runs eagerly, silently)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class DynamoCounts:
    compiled_frames: int = 0  # frames dynamo compiled (the first compile of a function and every recompile)
    graphs: int = 0  # FX graphs handed to the backend
    recompiles: list[str] = field(default_factory=list)
    graph_breaks: dict[str, int] = field(default_factory=dict)
    limit_hits: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The counts as plain JSON values (the first line of each reason)."""
        return {
            "compiled_frames": self.compiled_frames,
            "graphs": self.graphs,
            "recompiles": len(self.recompiles),
            "recompile_reasons": [_reason(text) for text in self.recompiles],
            "graph_breaks": sum(self.graph_breaks.values()),
            "graph_break_reasons": sorted({reason.splitlines()[0] for reason in self.graph_breaks}),
            "recompile_limit_hits": len(self.limit_hits),
        }


def _reason(text: str) -> str:
    """The failed guard of a "Recompiling function ..." record (its line starting with "- ")."""
    lines = [line.strip() for line in text.splitlines()]
    return next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else text)


class _Records(logging.Handler):
    def __init__(self, counts: DynamoCounts) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Recompiling function"):
            self.counts.recompiles.append(message)
        elif "hit config." in message and "recompile_limit" in message:
            self.counts.limit_hits.append(message)


@contextlib.contextmanager
def watch_dynamo() -> Iterator[DynamoCounts]:
    """Count dynamo's compiles, recompiles, graph breaks and recompile-limit hits inside the block (dynamo's
    global counters are cleared when it opens; torch's recompile log is switched on while it is open)."""
    import torch
    from torch._dynamo.utils import counters

    counts = DynamoCounts()
    handler = _Records(counts)
    dynamo_log = logging.getLogger("torch._dynamo")
    counters.clear()
    torch._logging.set_logs(recompiles=True)
    dynamo_log.addHandler(handler)
    try:
        yield counts
    finally:
        dynamo_log.removeHandler(handler)
        torch._logging.set_logs()
        counts.compiled_frames = int(counters["frames"]["ok"])
        counts.graphs = int(counters["stats"]["unique_graphs"])
        counts.graph_breaks = dict(counters["graph_break"])
