#!/usr/bin/env python3
"""MoMA sampling benchmark (issue 7): plain SD1.5 vs the same model with MoMA applied, side by side.

    .host/comfyui-0.30/venv/bin/python benchmarks/sampling.py [--sizes 256 512] [--steps 3] [--repeats 2]
                                                 [--json out.json] [--device cpu|cuda] [--profile]

Boots the installed ComfyUI through the pack's one boot (tools/moma_runner/boot.py), loads an SD1.5 checkpoint through ComfyUI's own
``CheckpointLoaderSimple`` (default: the full-layout random-weight test checkpoint from tools/moma_demo, the
same shapes as a real SD1.5 file; ``--checkpoint`` for a real one), runs the pack's Feature Grab on a
synthetic 512x512 reference and patches the model with the pack's ``apply_moma``. Then, per size, it samples
with ComfyUI's ``sample_custom`` (sampler euler, CFG 7.5, same seed and noise) the plain model, MoMA with a
~30%-coverage object bank and MoMA with a full-frame bank (plus, at sizes other than 512, MoMA with a 30% bank
from a Feature Grab with the generation's LATENT connected, "ref@SIZE"), interleaved and repeated, and reports:

- per-step time (the fastest steady step: the first step of every run is left out, and interference from
  other processes only adds time) as wall clock and as process CPU time, and the ratio MoMA / plain;
- aten ops and host reads (host-device syncs on CUDA) per UNet call and per model evaluation, counted at
  64x64 with a dispatch-mode counter (tools/op_count.py); ``--count-only`` prints only these;
- the Feature Grab (reference pass) time in units of one plain CFG step;
- peak RSS of the process while sampling (a thread polls RSS every few ms; and peak CUDA memory on a GPU);
- the re-run check: the same workflow executed twice through ComfyUI's executor does not run the LLaVA
  context encoder (nor the reference pass) again;
- recompiles under torch.compile, plain vs MoMA (benchmarks/sampling_recompiles.py): the whole UNet compiled as
  core TorchCompileModel does it and as other packs do it, over whole sampling runs at 64x64: compiled frames,
  recompiles and their guard failures, graph breaks, recompile-limit hits (``--compile-backend``, default
  aot_eager: the recompiles do not depend on the backend), with ``--recompiles`` (a few minutes on a CPU) or
  alone with ``--recompiles-only``.

``--batch-growth`` measures only how the cost grows with the latent batch: plain and MoMA (30% bank, Feature
Grab with the LATENT connected) at ``--batches`` (default 1 4 16) on ``--batch-image-size`` (default 128) images:
time per step and per batch item, MoMA / plain per batch size, peak RSS (the polling thread) per variant.

The measured steps are taken from the middle of a 50-step "normal" schedule (steps 10..), where MoMA's
object path is on (it is off for t >= 950, i.e. the first ~2 of 50 steps), so the ratio is that of a
typical step. ``--profile`` adds a torch.profiler table and the pack's Python hot spots for one step.
On a machine shared with other jobs use ``--threads 1 --metric cpu``: torch's OpenMP threads otherwise spin
against the other processes and the timings mean little.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO / "tools", REPO / "benchmarks"):  # the benchmark's parts, also when this file is loaded by path
    if str(folder) not in sys.path:
        sys.path.append(str(folder))  # last: the pack's one ComfyUI boot and the real-format model writers

from sampling_batch import format_batch_table, measure_batch_growth  # noqa: E402
from sampling_common import RssMonitor, boot_comfy, place_model  # noqa: E402
from sampling_counts import COUNT_SIZE, format_counts  # noqa: E402
from sampling_recompiles import format_recompiles, measure_recompiles  # noqa: E402
from sampling_rerun import rerun_check  # noqa: E402
from sampling_sizes import format_table, measure  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides (multiples of 64)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant per size")
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (euler, ddim, ...)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--attention",
        choices=["default", "pytorch"],
        default="default",
        help="ComfyUI attention backend: its default for the device, or torch SDPA",
    )
    parser.add_argument("--checkpoint", type=Path, help="an SD1.5 .safetensors (default: the random test checkpoint)")
    parser.add_argument("--adapter", type=Path, help="attn_adapters_projectors.th (default: the random test adapter)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument(
        "--metric",
        choices=["wall", "cpu"],
        default="wall",
        help="which per-step time the targets are judged on: wall clock, or process CPU time "
        "(steadier on a machine shared with other jobs)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", action="store_true", help="also print a profile of one step per variant")
    parser.add_argument("--skip-rerun", action="store_true", help="skip the executor re-run check")
    parser.add_argument("--rerun-only", action="store_true", help="only the executor re-run check")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help=f"only the aten op / host read counts per UNet call (at {COUNT_SIZE}x{COUNT_SIZE})",
    )
    parser.add_argument(
        "--recompiles-only", action="store_true", help="only the recompile counts under torch.compile, plain vs MoMA"
    )
    parser.add_argument(
        "--recompiles",
        action="store_true",
        help="also count recompiles under torch.compile, plain vs MoMA (after the other measurements)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=["aot_eager", "inductor"],
        default="aot_eager",
        help="torch.compile backend for the recompile counts (dynamo's guards, hence its "
        "recompiles, do not depend on it)",
    )
    parser.add_argument(
        "--batch-growth",
        action="store_true",
        help="only the batch-growth rows: plain and MoMA at each --batches latent batch size",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes for --batch-growth")
    parser.add_argument("--batch-image-size", type=int, default=128, help="image side for --batch-growth")
    parser.add_argument("--min-free-gb", type=float, default=8.0, help="refuse to start with less RAM available")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    available_gb = psutil.virtual_memory().available / 2**30
    if available_gb < opts.min_free_gb:
        print(
            f"Only {available_gb:.1f} GB RAM available (need {opts.min_free_gb} GB for a full SD1.5 in fp32); "
            f"try again later or pass --min-free-gb.",
            file=sys.stderr,
        )
        return 2
    if any(size % 64 for size in opts.sizes) or opts.batch_image_size % 64:
        print("--sizes must be multiples of 64", file=sys.stderr)
        return 2

    quiet = logging.Filter()
    quiet.filter = lambda record: record.levelno >= logging.ERROR  # ComfyUI lists optional nodes it can't import
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    hostinfo = boot_comfy(opts.device, opts.attention)
    for handler in logging.getLogger().handlers:
        handler.removeFilter(quiet)
    import comfy.model_management
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.rerun_only:
        import moma_demo
        from moma_demo import sd15

        checkpoint = opts.checkpoint or moma_demo.cached("moma_test_sd15.safetensors", sd15.write_sd15_checkpoint)
        result = rerun_check(hostinfo, place_model("checkpoints", checkpoint, hostinfo.models_dir))
        print(json.dumps(result, indent=2))
        return 0 if result["status"] == "pass" else 1

    if opts.recompiles_only:
        report = measure_recompiles(opts, hostinfo)
        print()
        print(format_recompiles(report["recompiles"]))
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"\nJSON written to {opts.json}")
        added = [
            entry["added_recompiles"]
            for entries in report["recompiles"]["styles"].values()
            for entry in entries.values()
        ]
        return 0 if max(added) <= 0 else 1

    monitor = RssMonitor()
    if opts.batch_growth:
        report = measure_batch_growth(opts, hostinfo, monitor)
        monitor.close()
        print()
        print(format_batch_table(report))
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"\nJSON written to {opts.json}")
        return 0
    report, profile_text = measure(opts, hostinfo, monitor)
    monitor.close()
    if opts.count_only:
        if opts.json:
            opts.json.parent.mkdir(parents=True, exist_ok=True)
            opts.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"\nJSON written to {opts.json}")
        return 0
    if opts.skip_rerun:
        report["rerun_check"] = {"status": "skipped"}
    else:
        gc.collect()  # the graph loads the checkpoint again: free the benchmark's copy first
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        print("Re-run check through ComfyUI's executor...", flush=True)
        report["rerun_check"] = rerun_check(hostinfo, report["settings"]["checkpoint"])
    print()
    print(format_table(report))
    print()
    print(format_counts(report["op_counts"]))
    if "recompiles" in report:
        print()
        print(format_recompiles(report["recompiles"]))
    if profile_text:
        print(profile_text)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
