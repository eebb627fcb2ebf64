"""aten ops and host reads per UNet call and per model evaluation, plain vs MoMA (benchmarks/sampling.py
``--count-only``; tools/op_count.py counts)."""

from __future__ import annotations

import statistics
from typing import Any

from sampling_common import Sampling

COUNT_SIZE = 64  # image side for the op counts (latent 8x8): the counts do not depend on the size


def count_ops(variants: dict[str, Any], sampling: Sampling, steps: int = 3) -> dict:
    """aten ops and host reads per UNet call and per model evaluation for each variant (tools/op_count.py).

    A ``steps``-step run per variant (euler, one UNet call per step with cond and uncond batched); the first
    call builds each run's device caches and has no subject mask yet, so the figures are the median of the
    later calls: what every step costs. ``added`` is the difference to plain.
    """
    from op_count import ModelCallCounts, count_model_calls, host_reads

    def median(values: list[int]) -> int:
        return int(statistics.median(values))

    counts: dict[str, dict] = {}
    for name, model in variants.items():
        sampling.run(model, steps=1)  # first use of these shapes (and of this model) is not counted
        with count_model_calls() as calls:
            sampling.run(model, steps=steps)
        later_calls, later_evals = calls.per_call[1:] or calls.per_call, calls.per_eval[1:] or calls.per_eval
        top = sum(later_calls, start=type(later_calls[0])()) if later_calls else {}
        counts[name] = {
            "unet_calls": len(calls.per_call),
            "evaluations": len(calls.per_eval),
            "ops_per_call": median([ModelCallCounts.ops(c) for c in later_calls]),
            "host_reads_per_call": median([host_reads(c) for c in later_calls]),
            "ops_per_evaluation": median([ModelCallCounts.ops(c) for c in later_evals]),
            "host_reads_per_evaluation": median([host_reads(c) for c in later_evals]),
            "host_reads_per_run": host_reads(calls.total),
            "top_ops_per_call": {
                op: round(n / len(later_calls), 1) for op, n in sorted(top.items(), key=lambda item: -item[1])[:12]
            }
            if later_calls
            else {},
        }
    plain = counts.get("plain")
    if plain is not None:
        for name, entry in counts.items():
            if name != "plain":
                for key in (
                    "ops_per_call",
                    "host_reads_per_call",
                    "ops_per_evaluation",
                    "host_reads_per_evaluation",
                    "host_reads_per_run",
                ):
                    entry["added_" + key] = entry[key] - plain[key]
    return {"size": sampling.size, "steps": steps, "variants": counts}


def format_counts(report: dict) -> str:
    """The op counts as a Markdown table."""
    lines = [
        f"aten ops per UNet call at {report['size']}x{report['size']} (cond and uncond in one call; "
        f"median of calls 2..{report['steps']} of a run):",
        "",
        "| variant | ops / UNet call | added by MoMA | host reads / call (added) | ops / evaluation (added) | "
        "host reads / evaluation (added) | host reads / run (added) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["variants"].items():

        def added(key: str, entry: dict = entry) -> str:
            return f" ({entry['added_' + key]:+d})" if "added_" + key in entry else ""

        lines.append(
            f"| {name} | {entry['ops_per_call']} | {entry.get('added_ops_per_call', '-')} | "
            f"{entry['host_reads_per_call']}{added('host_reads_per_call')} | "
            f"{entry['ops_per_evaluation']}{added('ops_per_evaluation')} | "
            f"{entry['host_reads_per_evaluation']}{added('host_reads_per_evaluation')} | "
            f"{entry['host_reads_per_run']}{added('host_reads_per_run')} |"
        )
    return "\n".join(lines)
