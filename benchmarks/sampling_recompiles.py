"""Recompiles under torch.compile (benchmarks/sampling.py ``--recompiles``, or alone with ``--recompiles-only``):
plain SD1.5 vs MoMA, the whole UNet compiled as core TorchCompileModel does it (its own execute; ComfyUI 0.30 drops
dynamo's guards on transformer_options, 0.3.75 keeps them) and as other packs do it (torch.compile of the diffusion
model, every guard kept), over whole sampling runs (KSampler euler from t = 999: the first step has no subject
mask and the object path switches on during the run; then another seed, then denoise 0.6: another schedule plan).
Per variant: frames dynamo compiled, recompiles with their guard failures, graph breaks, recompile-limit hits
(frames past it run eagerly, silently), and the seconds the compile and the runs took.

Both models use ComfyUI's SDPA attention (``optimized_attention_override``): the CPU default, sub-quadratic
attention, reads the free memory through psutil at every call, a graph break in every layer of a plain model too.
``--compile-backend aot_eager`` (the default) only traces: dynamo's guards, hence its recompiles, do not depend on
the backend, and inductor takes minutes per model on a small CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sampling_common  # noqa: F401  (puts tools/ on sys.path)
from dynamo_count import watch_dynamo

COMPILE_SIZE = 64
COMPILE_STEPS = 3
COMPILE_RUNS = ((1, 1.0), (2, 1.0), (1, 0.6))  # (seed, denoise) of the sampling runs of each compiled model


def sdpa_attention(func: Any, *args: Any, **kwargs: Any) -> Any:
    """An ``optimized_attention_override``: ComfyUI's own SDPA attention for every attention call."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def with_sdpa(model: Any) -> Any:
    patched = model.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = sdpa_attention
    return patched


def torch_compile_model(model: Any, backend: str) -> Any:
    """Core TorchCompileModel's own execute (its backend list is checked only by ComfyUI's executor)."""
    import comfy_extras.nodes_torch_compile as nodes_torch_compile

    return nodes_torch_compile.TorchCompileModel.execute(model, backend)[0]


def other_packs_compile(model: Any, backend: str) -> Any:
    """torch.compile of the diffusion model as an object patch (dynamo keeps every guard)."""
    import torch

    compiled = model.clone()
    compiled.add_object_patch(
        "diffusion_model", torch.compile(compiled.get_model_object("diffusion_model"), backend=backend)
    )
    return compiled


COMPILE_STYLES: dict[str, Callable[[Any, str], Any]] = {
    "TorchCompileModel": torch_compile_model,
    "torch.compile (guards kept)": other_packs_compile,
}


def sample_runs(model: Any, positive: Any, negative: Any) -> None:
    import torch

    import nodes

    latent = {"samples": torch.zeros(1, 4, COMPILE_SIZE // 8, COMPILE_SIZE // 8)}
    for seed, denoise in COMPILE_RUNS:
        nodes.common_ksampler(
            model, seed, COMPILE_STEPS, 7.5, "euler", "normal", positive, negative, latent, denoise=denoise
        )


def count_recompiles(variants: dict[str, Any], positive: Any, negative: Any, backend: str) -> dict:
    """What dynamo did for each variant (e.g. plain, MoMA) under each compile style; ``added_recompiles``: the
    variant's recompiles minus plain's."""
    import torch._dynamo

    styles: dict[str, dict] = {}
    for style, compile_model in COMPILE_STYLES.items():
        entries: dict[str, dict] = {}
        for name, model in variants.items():
            torch._dynamo.reset()
            start = time.perf_counter()
            compiled = compile_model(with_sdpa(model), backend)
            with watch_dynamo() as seen:
                sample_runs(compiled, positive, negative)
            entries[name] = {**seen.summary(), "compile_and_runs_s": round(time.perf_counter() - start, 1)}
            print(
                f"  {style}, {name}: {entries[name]['recompiles']} recompiles, {entries[name]['graph_breaks']} "
                f"graph breaks ({entries[name]['compile_and_runs_s']} s)",
                flush=True,
            )
        plain = entries.get("plain")
        if plain is not None:
            for entry in entries.values():
                entry["added_recompiles"] = entry["recompiles"] - plain["recompiles"]
                entry["added_graph_breaks"] = entry["graph_breaks"] - plain["graph_breaks"]
        styles[style] = entries
    torch._dynamo.reset()
    return {
        "size": COMPILE_SIZE,
        "steps": COMPILE_STEPS,
        "runs": [list(run) for run in COMPILE_RUNS],
        "backend": backend,
        "torch": torch.__version__,
        "styles": styles,
    }


def format_recompiles(report: dict) -> str:
    """The recompile counts as a Markdown table."""
    runs = ", ".join(f"seed {seed} denoise {denoise}" for seed, denoise in report["runs"])
    lines = [
        f"torch.compile ({report['backend']}, torch {report['torch']}) at {report['size']}x{report['size']}, "
        f"euler {report['steps']} steps, runs: {runs}:",
        "",
        "| compiled as | variant | compiled frames | recompiles (added) | graph breaks (added) | "
        "recompile-limit hits | s (compile + runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for style, entries in report["styles"].items():
        for name, entry in entries.items():
            lines.append(
                f"| {style} | {name} | {entry['compiled_frames']} | {entry['recompiles']} "
                f"({entry.get('added_recompiles', 0):+d}) | {entry['graph_breaks']} "
                f"({entry.get('added_graph_breaks', 0):+d}) | {entry['recompile_limit_hits']} | "
                f"{entry['compile_and_runs_s']} |"
            )
            for reason in entry["recompile_reasons"]:
                lines.append(f"|  |  | recompile: {reason[:160]} |  |  |  |  |")
    return "\n".join(lines)


def measure_recompiles(opts: Any, hostinfo: Any) -> dict:
    """``--recompiles-only``: plain vs MoMA (a 30%-coverage bank from Feature Grab at 64) under torch.compile."""
    import datetime
    import os

    from comfyui_moma.nodes.apply import apply_moma
    from sampling_common import load_models, machine_info, reference_inputs, time_reference_pass

    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    model, clip, vae, _, moma_model, context, positive, negative = load_models(opts, hostinfo)
    image, masks = reference_inputs(COMPILE_SIZE)
    bank, _ = time_reference_pass(model, moma_model, vae, clip, image, masks["30%"], resolution=COMPILE_SIZE)
    variants = {"plain": model, "moma 30%": apply_moma(model, moma_model, context, bank, 1.0, 0.0, 1.0)}
    print(
        f"Counting recompiles under torch.compile ({opts.compile_backend}) at {COMPILE_SIZE}x{COMPILE_SIZE}...",
        flush=True,
    )
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(model.load_device, load_before),
        "recompiles": count_recompiles(variants, positive, negative, opts.compile_backend),
    }
