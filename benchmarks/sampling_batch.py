"""Batch growth (benchmarks/sampling.py ``--batch-growth``): the same step at batch sizes 1, 4, 16 (the cost per
item should stay flat), plain vs MoMA."""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

from sampling_common import (
    RssMonitor,
    Sampling,
    boot,
    load_models,
    machine_info,
    mb,
    measure_variants,
    reference_inputs,
    steady,
    time_reference_pass,
)


def measure_batch_growth(opts: argparse.Namespace, hostinfo: boot.ComfyHost, monitor: RssMonitor) -> dict:
    """Plain vs MoMA (30% object bank, Feature Grab with the generation's LATENT connected) at each of
    ``opts.batches`` latent batch sizes, ``opts.batch_image_size`` square: the fastest steady step, the time per
    batch item, MoMA / plain, and the peak RSS while sampling above the RSS before (both models are loaded)."""
    import torch
    from comfyui_moma.nodes.apply import apply_moma

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    model, clip, vae, checkpoint_name, moma_model, context, positive, negative = load_models(opts, hostinfo)
    device = model.load_device
    on_cuda = getattr(device, "type", "") == "cuda"
    size = opts.batch_image_size
    samplings = {
        batch: Sampling(model, positive, negative, size, opts.steps, opts.sampler, opts.cfg, opts.seed, batch=batch)
        for batch in opts.batches
    }
    print(
        f"Batch growth at {size}x{size}: loading {checkpoint_name} and warming up ({device}, "
        f"{torch.get_num_threads()} threads)...",
        flush=True,
    )
    samplings[opts.batches[0]].run(model, steps=1)  # loads the model
    image, masks = reference_inputs(512)
    bank, reference = time_reference_pass(model, moma_model, vae, clip, image, masks["30%"], latent_size=size)
    variants = {"plain": model, "moma": apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)}
    rows: dict[int, dict] = {}
    for batch, sampling in samplings.items():
        for patched in variants.values():
            sampling.run(patched, steps=1)  # first use of this batch's shapes
        wall, cpu, memory = measure_variants(variants, sampling, opts.repeats, monitor, f"batch {batch:2d}")
        row: dict[str, Any] = {}
        for name in variants:
            per_wall, per_cpu = min(steady(wall[name])), min(steady(cpu[name]))
            row[name] = {
                "per_step_s": round(per_wall, 4),
                "per_step_cpu_s": round(per_cpu, 4),
                "per_item_s": round(per_wall / batch, 4),
                "per_item_cpu_s": round(per_cpu / batch, 4),
                "peak_rss_mb": mb(max(w["peak"] for w in memory[name])),
                "peak_rss_over_start_mb": mb(max(w["peak"] - w["start"] for w in memory[name])),
                "peak_cuda_mb": mb(max(w["cuda_peak"] for w in memory[name])) if on_cuda else None,
                "step_times_s": [[round(t, 4) for t in run] for run in wall[name]],
                "step_cpu_s": [[round(t, 4) for t in run] for run in cpu[name]],
            }
        row["ratio"] = round(row["moma"]["per_step_s"] / row["plain"]["per_step_s"], 3)
        row["ratio_cpu"] = round(row["moma"]["per_step_cpu_s"] / row["plain"]["per_step_cpu_s"], 3)
        rows[batch] = row
    metric = "per_item_s" if opts.metric == "wall" else "per_item_cpu_s"
    ratio_key = "ratio" if opts.metric == "wall" else "ratio_cpu"
    first = rows[opts.batches[0]]
    growth = {
        name: {batch: round(rows[batch][name][metric] / first[name][metric], 3) for batch in rows} for name in variants
    }
    ratios = [rows[batch][ratio_key] for batch in rows]
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device, load_before),
        "settings": {
            "metric": opts.metric,
            "sampler": opts.sampler,
            "cfg": opts.cfg,
            "seed": opts.seed,
            "image_size": size,
            "batches": opts.batches,
            "steps_per_run": opts.steps,
            "repeats": opts.repeats,
            "checkpoint": checkpoint_name,
            "dtype": str(model.model.get_dtype()),
            "moma": "30% object bank, Feature Grab with the generation's LATENT connected, strength 1.0",
        },
        "reference_pass": reference,
        "batch_growth": {
            "rows": rows,
            # time per item relative to the first batch size (1.0 = linear growth of the step's cost)
            "per_item_relative_to_first": growth,
            "ratio_spread": round(max(ratios) - min(ratios), 3),
        },
    }


def format_batch_table(report: dict) -> str:
    """The batch-growth rows as a Markdown table."""
    settings, growth = report["settings"], report["batch_growth"]
    lines = [
        f"batch growth at {settings['image_size']}x{settings['image_size']} ({settings['metric']} metric):",
        "",
        "| batch | plain s/step | MoMA s/step | plain s/item | MoMA s/item | MoMA / plain (wall, CPU) | "
        "peak RSS plain / MoMA MB (over start) |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, row in growth["rows"].items():
        plain, moma = row["plain"], row["moma"]
        per = "per_item_s" if settings["metric"] == "wall" else "per_item_cpu_s"
        step = "per_step_s" if settings["metric"] == "wall" else "per_step_cpu_s"
        lines.append(
            f"| {batch} | {plain[step]:.3f} | {moma[step]:.3f} | {plain[per]:.3f} | {moma[per]:.3f} | "
            f"{row['ratio']:.3f}, {row['ratio_cpu']:.3f} | {plain['peak_rss_mb']:.0f} "
            f"(+{plain['peak_rss_over_start_mb']:.0f}) / {moma['peak_rss_mb']:.0f} "
            f"(+{moma['peak_rss_over_start_mb']:.0f}) |"
        )
    machine = report["machine"]
    lines.append(
        f"\nper item relative to batch {settings['batches'][0]}: {growth['per_item_relative_to_first']}; "
        f"MoMA/plain spread {growth['ratio_spread']}"
    )
    lines.append(
        f"machine: {machine['cpu']} x{machine['cpu_count']} ({machine['torch_threads']} torch threads), "
        f"{machine['ram_gb']} GB RAM, {machine['device']}, torch {machine['torch']}, ComfyUI attention "
        f"{machine['comfyui_attention']}, load average {machine['load_average_start_end']}; {report['date']}"
    )
    return "\n".join(lines)
