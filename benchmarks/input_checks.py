#!/usr/bin/env python3
"""Cost of the hostile-input checks (issue 24): parsing a huge block_weights string, and the one-pass tensor check
every loaded weight goes through.

    .host/comfyui-0.30/venv/bin/python benchmarks/input_checks.py [--repeats 3] [--json out.json]

1. ``block_weights``: the old splitting (a regex substitution ``\\s*[=:]\\s*``, which rescans a run of spaces from
   each of its positions) against the current one on runs of spaces, and the whole ``parse_block_weights`` on a
   megabyte (refused by its length; the splitting alone is timed too).
2. Tensor check: ``torch.aminmax`` throughput per dtype on a 1 GiB tensor in RAM (one thread), and what it adds to
   loading the test fixtures (LLaVA folder, CLIP vision folder, adapter): the same loads with the check replaced by
   a no-op, alternated, medians. The real LLaVA-7B folder is 13.5 GB of fp16: its added time is estimated from the
   measured throughput (the data is read from disk by the load anyway; the check reads it once more from RAM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tools"))  # tools/moma_demo: the writers of the real-format test models
sys.path.insert(0, str(REPO))  # the pack's `moma` package (pure torch + transformers, no ComfyUI)

import torch  # noqa: E402

from moma import clip_vision, limits, llava, weights  # noqa: E402
from moma.sd15 import _block_weight_parts, parse_block_weights  # noqa: E402

REAL_LLAVA_BYTES = 13.5e9  # MoMA_llava_7b's two fp16 shards


def _regex_parts(text: str) -> list[str]:
    text = re.sub(r"\s*[=:]\s*", "=", text.strip())
    return [part for part in re.split(r"[\s,;]+", text) if part]


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def block_weights(result: dict) -> None:
    print("block_weights: 'input' + N spaces + 'x'")
    rows = []
    for spaces in (5_000, 10_000, 20_000, 40_000):
        text = "input" + " " * spaces + "x"
        old = _seconds(lambda text=text: _regex_parts(text))
        new = _seconds(lambda text=text: _block_weight_parts(text))
        rows.append({"spaces": spaces, "old_s": old, "new_s": new})
        print(f"  {spaces:>9,} spaces: old {old:8.3f} s   new {new * 1000:8.3f} ms")
    # the old cost grows with the square of the run: extrapolate from the largest measured run
    last = rows[-1]
    megabyte = 1 << 20
    estimate = last["old_s"] * (megabyte / last["spaces"]) ** 2
    text = "input" + " " * megabyte + "= 1"
    split = _seconds(lambda: _block_weight_parts(text))
    refused = _seconds(lambda: _refuse(text))
    print(
        f"  1 MiB of spaces: old ~{estimate / 60:,.0f} min (extrapolated, quadratic), new split {split * 1000:.1f} ms, "
        f"parse_block_weights refuses it (length) in {refused * 1e6:.0f} us"
    )
    result["block_weights"] = {
        "runs": rows,
        "old_megabyte_estimate_s": estimate,
        "new_megabyte_split_s": split,
        "new_megabyte_refused_s": refused,
    }


def _refuse(text: str) -> None:
    try:
        parse_block_weights(text)
    except ValueError:
        return
    raise AssertionError("a megabyte of block_weights was accepted")


def throughput(result: dict) -> None:
    print("tensor check (torch.aminmax, one thread) on 1 GiB in RAM:")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tensor = torch.randn((1 << 30) // (torch.finfo(dtype).bits // 8), dtype=dtype)
        limits.tensor_problem(tensor)
        seconds = statistics.median(_seconds(lambda tensor=tensor: limits.tensor_problem(tensor)) for _ in range(3))
        rates[str(dtype).removeprefix("torch.")] = (1 << 30) / seconds
        print(f"  {str(dtype).removeprefix('torch.'):>8}: {(1 << 30) / seconds / 1e9:5.1f} GB/s")
        del tensor
    torch.set_num_threads(threads)
    estimate = REAL_LLAVA_BYTES / rates["float16"]
    print(
        f"  the real LLaVA-7B (13.5 GB fp16, checked on the CPU): ~{estimate:.1f} s added to its load "
        f"(on a GPU the check runs after the copy, at the GPU's memory bandwidth)"
    )
    result["throughput_bytes_per_s"] = rates
    result["real_llava_estimate_s"] = estimate


@contextlib.contextmanager
def checks_off() -> Iterator[None]:
    """Loads without the tensor check (the loaders' names for it replaced by a no-op)."""

    def identity(tensor, *args, **kwargs):
        return tensor

    modules = (llava, clip_vision, weights)
    saved = [module.check_tensor for module in modules]
    for module in modules:
        module.check_tensor = identity
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.check_tensor = original


def fixture_loads(result: dict, repeats: int) -> None:
    import moma_demo
    from moma_demo import adapter
    from moma_demo import clip_vision as clip_writer
    from moma_demo import llava as llava_writer

    adapter_file = moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th)
    llava_dir = moma_demo.cached("MoMA_llava_7b", llava_writer.write_llava_folder)
    clip_dir = moma_demo.cached("clip-vit-large-patch14-336", clip_writer.write_clip_vision_folder)
    size = sum(
        file.stat().st_size
        for file in [*llava_dir.iterdir(), *clip_dir.iterdir(), adapter_file]
        if file.suffix in (".bin", ".safetensors", ".th")
    )

    def load() -> None:
        moma_adapter = weights.load_adapter(adapter_file)
        folder = llava.LlavaFolder.open(llava_dir)
        llava._load_language_model(folder, torch.float16, torch.device("cpu"), llava._Steps(0, None, None))
        clip_vision.load_clip_vision(clip_dir, torch.float16)
        del moma_adapter

    load()  # warm: files in the page cache, transformers' modules imported
    with_checks, without = [], []
    for _ in range(repeats):
        with_checks.append(_seconds(load))
        with checks_off():
            without.append(_seconds(load))
    on, off = statistics.median(with_checks), statistics.median(without)
    print(
        f"fixture loads (adapter + LLaVA + CLIP vision, {size / 1e6:.0f} MB of files, fp16 on the CPU), "
        f"medians of {repeats}: with checks {on:.3f} s, without {off:.3f} s: +{(on - off) * 1000:.0f} ms "
        f"({on / off - 1:+.1%})"
    )
    result["fixture"] = {"bytes": size, "with_checks_s": with_checks, "without_s": without, "ratio": on / off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {"torch": torch.__version__}
    block_weights(result)
    throughput(result)
    fixture_loads(result, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
