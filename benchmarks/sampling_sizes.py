"""Per-size ratios (benchmarks/sampling.py's default run): per-step time of plain SD1.5 vs MoMA at each size, the
reference pass, memory, and the targets they are judged against."""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io as text_io
import os
import pstats
import statistics
from typing import Any

from sampling_common import (
    FIRST_STEP,
    REPO,
    SCHEDULE_STEPS,
    SD_PROMPT,
    SUBJECT,
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
from sampling_counts import COUNT_SIZE, count_ops, format_counts
from sampling_recompiles import COMPILE_SIZE, count_recompiles

TARGETS = {"30%": {256: 1.05, 512: 1.20}, "full": {256: 1.5, 512: 1.5}}
MEMORY_TARGET_MB = 250.0


def profile_step(label: str, model: Any, sampling: Sampling) -> str:
    """torch.profiler op table and cProfile of the pack's functions for a 2-step run (2nd step kept)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() and str(sampling.device).startswith("cuda") else []
    )
    with profile(activities=activities) as prof:
        sampling.run(model, steps=2)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    profiler = cProfile.Profile()
    profiler.enable()
    sampling.run(model, steps=2)
    profiler.disable()
    stream = text_io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(r"(comfyui_moma|" + REPO.name + r")/(nodes|moma)/", 25)
    return f"=== {label} @ {sampling.size}: torch ops (2 steps) ===\n{ops}\n=== {label}: pack functions ===\n{stream.getvalue()}"


def measure(opts: argparse.Namespace, hostinfo: boot.ComfyHost, monitor: RssMonitor) -> tuple[dict, str]:
    """Everything but the re-run check; returns (report, profile text). Its models are freed on return."""
    import comfy.ldm.modules.attention as comfy_attention
    import torch
    from comfyui_moma.nodes.apply import apply_moma

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    model, clip, vae, checkpoint_name, moma_model, context, positive, negative = load_models(opts, hostinfo)
    device = model.load_device
    on_cuda = getattr(device, "type", "") == "cuda"

    if opts.count_only:
        opts.sizes = []
    samplings = {
        size: Sampling(model, positive, negative, size, opts.steps, opts.sampler, opts.cfg, opts.seed)
        for size in opts.sizes
    }
    count_sampling = Sampling(model, positive, negative, COUNT_SIZE, 3, opts.sampler, opts.cfg, opts.seed)
    print(
        f"Loading {checkpoint_name} and warming up ({device}, {torch.get_num_threads()} threads, ComfyUI attention "
        f"{comfy_attention.optimized_attention.__name__})...",
        flush=True,
    )
    (samplings[opts.sizes[0]] if opts.sizes else count_sampling).run(model, steps=1)  # loads the model

    reference_size = COUNT_SIZE if opts.count_only else 512  # the op counts do not depend on the bank's size
    image, masks = reference_inputs(reference_size)
    if on_cuda:  # CUDA's first use of the VAE encoder and of these shapes (kernel selection) is not the pass's cost
        time_reference_pass(model, moma_model, vae, clip, image, next(iter(masks.values())))
    banks, reference = {}, {}
    for label, mask in masks.items():
        banks[label], reference[label] = time_reference_pass(
            model, moma_model, vae, clip, image, mask, resolution=reference_size
        )
        counts = banks[label].layer_token_counts()
        top_tokens = (reference_size // 8) ** 2
        reference[label]["bank_tokens_64x64"] = counts[("input", 1)]
        reference[label]["coverage"] = round(counts[("input", 1)] / top_tokens, 3)
        reference[label]["bank_mb"] = mb(
            sum(t.numel() * t.element_size() for d in (banks[label].keys, banks[label].values) for t in d.values())
        )
        print(f"Feature Grab, {label} mask: {reference[label]['total_s']:.2f} s", flush=True)
    variants: dict[str, Any] = {"plain": model}
    for label, bank in banks.items():
        variants[f"moma {label}"] = apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)
    print(f"Counting aten ops per UNet call at {COUNT_SIZE}x{COUNT_SIZE}...", flush=True)
    op_counts = count_ops(variants, count_sampling)
    print(format_counts(op_counts), flush=True)
    if opts.count_only:
        return {
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info(device, load_before),
            "op_counts": op_counts,
        }, ""
    # Feature Grab with the generation's LATENT connected (its resolution widget left at the default): the
    # reference is encoded at the generation size, as the reference pipeline's reference and image are both
    # 512x512, and the bank holds about as many object keys as the image has object queries.
    matched: dict[int, Any] = {}
    matched_reference: dict[str, dict] = {}
    for size in opts.sizes:
        if size != 512:
            bank, info = time_reference_pass(model, moma_model, vae, clip, image, masks["30%"], latent_size=size)
            matched_reference[f"30% ref@{size}"] = {**info, "bank_tokens_top": bank.layer_token_counts()[("input", 1)]}
            matched[size] = apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)
    # Feature Grab with every setting at its default (resolution 0, auto): the reference pass runs when sampling
    # starts, at the size sampled (its time is in each run's first step, which the per-step figures leave out)
    from comfyui_moma.nodes.feature_grab import MomaFeatureGrab

    auto_reference = MomaFeatureGrab.execute(model, moma_model, vae, clip, image, masks["30%"], SUBJECT, 0).result[0]
    auto_model = apply_moma(model, moma_model, context, auto_reference, 1.0, 0.0, 1.0)

    results: dict[str, Any] = {}
    for size, sampling in samplings.items():
        print(f"{size}x{size}: warm-up", flush=True)
        sampling.run(model, steps=1)  # first use of this size's shapes; every run's own first step is left out too
        size_variants = dict(variants)
        if size in matched:
            size_variants[f"moma 30% ref@{size}"] = matched[size]
            size_variants["moma 30% default (auto)"] = auto_model
        names = list(size_variants)
        wall, cpu, memory = measure_variants(size_variants, sampling, opts.repeats, monitor, str(size))
        entry: dict[str, Any] = {"timesteps": [round(t, 1) for t in sampling.timesteps], "variants": {}}
        # The fastest steady step: interference from other processes only ever adds time.
        plain_wall, plain_cpu = min(steady(wall["plain"])), min(steady(cpu["plain"]))
        for name in names:
            per_wall, per_cpu = min(steady(wall[name])), min(steady(cpu[name]))
            entry["variants"][name] = {
                "per_step_s": round(per_wall, 4),
                "per_step_cpu_s": round(per_cpu, 4),
                "ratio": round(per_wall / plain_wall, 3),
                "ratio_cpu": round(per_cpu / plain_cpu, 3),
                "median_step_s": round(statistics.median(steady(wall[name])), 4),
                "ratio_per_repeat": [
                    round(min(steady([m])) / min(steady([p])), 3) for m, p in zip(wall[name], wall["plain"])
                ],
                "step_times_s": [[round(t, 4) for t in run] for run in wall[name]],
                "step_cpu_s": [[round(t, 4) for t in run] for run in cpu[name]],
                "peak_rss_mb": mb(max(w["peak"] for w in memory[name])),
                "rss_before_mb": mb(min(w["start"] for w in memory[name])),
                "peak_cuda_mb": mb(max(w["cuda_peak"] for w in memory[name])) if on_cuda else None,
            }
        results[size] = entry

    unit_size = 512 if 512 in results else max(results)
    plain_unit = results[unit_size]["variants"]["plain"]
    for info in reference.values():
        info["plain_cfg_steps"] = round(info["total_s"] / plain_unit["per_step_s"], 2)
        info["plain_cfg_steps_cpu"] = round(info["total_cpu_s"] / plain_unit["per_step_cpu_s"], 2)
        info["unit"] = f"plain CFG step at {unit_size}x{unit_size}"

    profile_text = ""
    if opts.profile:
        for sampling in samplings.values():
            for name, patched in variants.items():
                profile_text += profile_step(name, patched, sampling) + "\n"

    if opts.recompiles:  # last: the measurements above never run next to a compiled model
        print(
            f"Counting recompiles under torch.compile ({opts.compile_backend}) at {COMPILE_SIZE}x{COMPILE_SIZE}...",
            flush=True,
        )
        recompiles = count_recompiles(
            {"plain": model, "moma 30%": variants["moma 30%"]}, positive, negative, opts.compile_backend
        )

    report = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(device, load_before),
        "settings": {
            "metric": opts.metric,
            "sampler": opts.sampler,
            "cfg": opts.cfg,
            "seed": opts.seed,
            "steps_per_run": opts.steps,
            "repeats": opts.repeats,
            "schedule": f"normal {SCHEDULE_STEPS}, steps {FIRST_STEP}..{FIRST_STEP + opts.steps - 1}",
            "checkpoint": checkpoint_name,
            "dtype": str(model.model.get_dtype()),
            "strength": 1.0,
            "prompt": SD_PROMPT,
        },
        "sampling": results,
        "op_counts": op_counts,
        "reference_pass": reference,
        "reference_pass_at_generation_size": matched_reference,
        "targets": {"ratio": TARGETS, "memory_over_plain_mb": MEMORY_TARGET_MB},
    }
    if opts.recompiles:
        report["recompiles"] = recompiles
    return report, profile_text


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("ok" if ok else "MISSED")


def format_table(report: dict) -> str:
    """The report as Markdown tables (the README's Performance section shows the same layout)."""
    metric = report["settings"]["metric"]
    ratio_key = "ratio" if metric == "wall" else "ratio_cpu"
    lines = [
        f"| size | variant | s/step (wall) | CPU s/step | MoMA/plain (wall) | MoMA/plain (CPU) | target | "
        f"peak RSS MB | vs plain MB | met ({metric}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, entry in report["sampling"].items():
        plain = entry["variants"]["plain"]
        for name, info in entry["variants"].items():
            label = name.split(" ", 1)[1] if name != "plain" else None
            target = TARGETS.get(label.split(" ref@")[0], {}).get(int(size)) if label else None
            on_gpu = info.get("peak_cuda_mb") is not None
            extra = (
                (info["peak_cuda_mb"] - plain["peak_cuda_mb"])
                if on_gpu
                else (info["peak_rss_mb"] - plain["peak_rss_mb"])
            )
            met = (
                None if label is None else ((target is None or info[ratio_key] <= target) and extra <= MEMORY_TARGET_MB)
            )
            cuda = f" (CUDA {info['peak_cuda_mb']:.0f})" if on_gpu else ""
            lines.append(
                f"| {size} | {name} | {info['per_step_s']:.3f} | {info['per_step_cpu_s']:.3f} | {info['ratio']:.3f} | "
                f"{info['ratio_cpu']:.3f} | {f'<= {target:.2f}' if target else '-'} | {info['peak_rss_mb']:.0f}"
                f"{cuda} | {'-' if label is None else f'{round(extra):+d}'} | {_verdict(met)} |"
            )
    unit = next(iter(report["reference_pass"].values()))["unit"]
    lines += [
        "",
        f"| reference pass (Feature Grab, 512x512 reference) | s (wall) | CPU s | of which VAE encode s | "
        f"x {unit} (wall / CPU) | bank tokens at 64x64 |",
        "|---|---|---|---|---|---|",
    ]
    for label, info in report["reference_pass"].items():
        lines.append(
            f"| {label} mask | {info['total_s']:.2f} | {info['total_cpu_s']:.2f} | {info['vae_encode_s']:.2f} | "
            f"{info['plain_cfg_steps']:.2f} / {info['plain_cfg_steps_cpu']:.2f} | "
            f"{info['bank_tokens_64x64']} ({info['coverage']:.0%}) |"
        )
    for label, info in report.get("reference_pass_at_generation_size", {}).items():
        lines.append(
            f"| {label} (LATENT connected: reference at the generation size) | {info['total_s']:.2f} | {info['total_cpu_s']:.2f} | "
            f"{info['vae_encode_s']:.2f} | - | {info['bank_tokens_top']} at its top grid |"
        )
    rerun = report["rerun_check"]
    note = rerun.get("reason") or rerun.get("detail")
    lines += [
        "",
        f"re-run check (same workflow twice through ComfyUI's executor): {rerun['status']}"
        + (f" - {note}" if note else ""),
    ]
    machine = report["machine"]
    lines.append(
        f"machine: {machine['cpu']} x{machine['cpu_count']} ({machine['torch_threads']} torch threads), "
        f"{machine['ram_gb']} GB RAM, {machine['device']}{' ' + machine['gpu'] if machine['gpu'] else ''}, "
        f"torch {machine['torch']}, ComfyUI attention {machine['comfyui_attention']}, "
        f"load average {machine['load_average_start_end']} (start, end); {report['date']}"
    )
    return "\n".join(lines)
