#!/usr/bin/env python3
"""LLaVA context encoder benchmark (issues 4, 12): load time, encode time, peak RSS and peak CUDA memory.

    .host/comfyui-0.30/venv/bin/python benchmarks/llava_encode.py [--precision auto|fp16|bf16|fp32] [--device cpu|cuda]
                                                     [--placement gpu|stream|cpu] [--memory-cap-gb 6]
                                                     [--repeats 2] [--json out.json]
    .host/comfyui-0.30/venv/bin/python benchmarks/llava_encode.py --full-width [--layers N] [--keep-files DIR]
    .host/comfyui-0.30/venv/bin/python benchmarks/llava_encode.py --device cuda --quantization 8bit|4bit   (bitsandbytes)
    .host/comfyui-0.30/venv/bin/python benchmarks/llava_encode.py --matrix [--device cuda] [--full-width ...]

``--placement``: ``gpu`` = the whole encoder resident on ``--device`` (the default), ``stream`` = weights in
RAM, each layer copied to ``--device`` just before it runs (on the CPU: cpu -> cpu copies, the streaming
overhead alone), ``cpu`` = resident on the CPU. ``--memory-cap-gb`` caps this process's CUDA memory with
``torch.cuda.set_per_process_memory_fraction`` to emulate a smaller card; a row that runs out reports "OOM".
``--matrix`` runs, each in a fresh process on the same files: resident vs streaming vs cpu per precision (on
CUDA also streaming and resident under 6 and 8 GB caps), checks every row's tokens against the resident row of
its precision, and prints a Markdown table.

Default: the test fixtures (tools/moma_demo: the original-format LLaVA folder with hidden 4096 and 2 layers, a
3-layer CLIP ViT-L/14-336-shaped vision tower, the adapter file), built once into the tests' fixture cache.

``--full-width``: a random LLaVA-1.5-7B-shaped folder (hidden 4096, MLP 11008, 32 heads, vocab 32000, one
pickled shard per decoder layer + index, lm_head included) with as many decoder layers as the free memory
allows (or ``--layers``), and a full-size CLIP ViT-L/14-336 vision tower (24 layers); written to a temporary
folder and deleted afterwards. The real model has 32 layers: the report scales the per-layer cost up.

Measured with the pack's own code (``moma.model``): ``load`` = LLaVA shards + CLIP + mapping/projector onto
the device; ``encode`` = tokenise + pixels + vision + decoder + mapping + 4-token projector for one reference
(first call and warm repeats); peak RSS is polled by a thread every 10 ms during each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tools"))  # tools/moma_demo: the writers of the real-format test models
sys.path.insert(0, str(REPO))  # the pack's `moma` package (pure torch + transformers, no ComfyUI)

import torch  # noqa: E402

from moma.model import MomaModel, encode_context  # noqa: E402

FULL = dict(hidden=4096, intermediate=11008, heads=32, vocab=32000, layers=32)
SUBJECT, PROMPT = "car", "A car in autumn with falling leaves."
MB = 1024 * 1024


class PeakRss:
    """Polls this process's RSS in a thread; ``peak`` is the highest value seen inside the ``with`` block."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def rss() -> int:
    """RSS after a collection and glibc's malloc_trim (freed heap pages handed back to the OS)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss


def fixture_files() -> tuple[Path, Path, Path]:
    import moma_demo
    from moma_demo import adapter, clip_vision, llava

    return (
        moma_demo.cached("attn_adapters_projectors.th", adapter.write_adapter_th),
        moma_demo.cached("MoMA_llava_7b", llava.write_llava_folder),
        moma_demo.cached("clip-vit-large-patch14-336", clip_vision.write_clip_vision_folder),
    )


def full_width_layers(requested: int | None, dtype_bytes: int) -> int:
    """Decoder layers that fit: ~60% of the available memory minus embeddings, projector and CLIP."""
    if requested:
        return requested
    per_layer = (4 * FULL["hidden"] ** 2 + 3 * FULL["hidden"] * FULL["intermediate"]) * dtype_bytes
    fixed = (FULL["vocab"] * FULL["hidden"] + 1024 * 4096 + 4096 * 4096 + 303_000_000 + 14_000_000) * dtype_bytes
    budget = 0.6 * psutil.virtual_memory().available - fixed
    return max(1, min(FULL["layers"], int(budget // per_layer)))


def write_full_width(root: Path, layers: int, device: str = "cpu") -> tuple[Path, Path]:
    """A LLaVA-1.5-7B-shaped folder with ``layers`` decoder layers (one shard each) and a full CLIP-L/336.

    ``device``: where the random weights are drawn (``cuda``: ~6.7 B values in a second instead of about a minute
    on one CPU core; other values than the CPU's, the same shapes and scale)."""
    from moma_demo import llava
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = root / "MoMA_llava_7b_full_width"
    folder.mkdir(parents=True)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden, inter = FULL["hidden"], FULL["intermediate"]

    def matrix(rows: int, cols: int, dtype=torch.float16) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator, device=device) / math.sqrt(cols)).to(dtype).cpu()

    model_bytes = llava.train_tokenizer()
    (folder / "tokenizer.model").write_bytes(model_bytes)
    config = llava.config(FULL["vocab"])
    config.update(intermediate_size=inter, num_hidden_layers=layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(llava.TOKENIZER_CONFIG, indent=2))
    embed = 0.02 * torch.randn(FULL["vocab"], hidden, generator=generator, device=device)
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": embed.half().cpu()}]
    weight_map: dict[str, str] = {}
    total = layers + 2
    names = [f"pytorch_model-{i:05d}-of-{total:05d}.bin" for i in range(1, total + 1)]

    def flush(index: int, tensors: dict[str, torch.Tensor]) -> None:
        torch.save(tensors, folder / names[index])
        weight_map.update({key: names[index] for key in tensors})

    flush(0, shards.pop())
    for layer in range(layers):
        p = f"model.layers.{layer}."
        tensors = {
            p + f"self_attn.{n}.weight": matrix(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        tensors.update(
            {
                p + "mlp.gate_proj.weight": matrix(inter, hidden),
                p + "mlp.up_proj.weight": matrix(inter, hidden),
                p + "mlp.down_proj.weight": matrix(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            }
        )
        flush(layer + 1, tensors)
        del tensors
    flush(
        total - 1,
        {
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
            "model.mm_projector.0.weight": matrix(hidden, 1024),
            "model.mm_projector.0.bias": torch.zeros(hidden, dtype=torch.float16),
            "model.mm_projector.2.weight": matrix(hidden, hidden),
            "model.mm_projector.2.bias": torch.zeros(hidden, dtype=torch.float16),
            "lm_head.weight": matrix(FULL["vocab"], hidden),
        },
    )
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    clip_folder = root / "clip-vit-large-patch14-336"
    from moma_demo.clip_vision import PREPROCESSOR_CONFIG, VISION

    # CLIP ViT-L/14-336 at its real depth and width: the fixture's tower with the real MLP and layer count
    vision = CLIPVisionModel(CLIPVisionConfig(**{**VISION, "intermediate_size": 4096, "num_hidden_layers": 24}))
    vision.save_pretrained(str(clip_folder))

    (clip_folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))
    return folder, clip_folder


def reference_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    picture = torch.rand(1, 3, 48, 64, generator=generator)
    picture = torch.nn.functional.interpolate(picture, size=(480, 640), mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0)
    mask = torch.zeros(480, 640)
    mask[100:400, 150:500] = 1.0
    return picture.contiguous(), mask


def measure(
    adapter: Path,
    llava_dir: Path,
    clip: Path,
    precision: str,
    device: str,
    repeats: int,
    quantization: str = "none",
    placement: str = "gpu",
) -> dict:
    picture, mask = reference_inputs()
    result: dict = {"placement": placement}
    start = time.perf_counter()
    import transformers.models.clip.modeling_clip  # one-off import cost, reported apart
    import transformers.models.llama.modeling_llama  # noqa: F401

    result["import_s"] = time.perf_counter() - start
    rss_start = rss()
    moma_model = MomaModel.load(adapter, llava_dir, clip, precision=precision, quantization=quantization)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        start = time.perf_counter()
        encoder = moma_model.load_encoder(device, placement=placement, pin=cuda)
        if cuda:
            torch.cuda.synchronize()
        result["load_s"] = time.perf_counter() - start
    result["load_peak_rss_mb"] = peak.peak / MB
    if cuda:
        result["load_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / MB
    result["params_m"] = sum(p.numel() for p in encoder.parameters()) / 1e6
    result["layers"] = encoder.num_layers
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the encode's own peak (a resident encoder's weights stay in it)
    with PeakRss() as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            context = encode_context(encoder, moma_model, picture, mask, SUBJECT, PROMPT)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    result["encode_first_s"] = times[0]
    result["encode_warm_s"] = statistics.median(times[1:]) if len(times) > 1 else None
    result["encode_peak_rss_mb"] = peak.peak / MB
    result["_cond_tokens"] = context.cond_tokens.float().cpu()
    if encoder.streamer is not None:
        result["streamed_layers"] = encoder.streamer.layers_fetched
        result["max_layers_on_device"] = encoder.streamer.max_layers_on_device
    if cuda:
        result["encode_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / MB
    result["rss_with_encoder_mb"] = rss() / MB
    del encoder
    if cuda:
        torch.cuda.empty_cache()
        result["cuda_after_free_mb"] = torch.cuda.memory_allocated() / MB
    result["rss_after_free_mb"] = rss() / MB
    result["rss_before_load_mb"] = rss_start / MB
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--full-width", action="store_true", help="random full-width LLaVA (hidden 4096, MLP 11008)")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers for --full-width (default: fit memory)"
    )
    parser.add_argument("--keep-files", type=Path, default=None, help="write the --full-width files here and keep them")
    parser.add_argument(
        "--quantization",
        default="none",
        choices=["none", "8bit", "4bit"],
        help="bitsandbytes LLaVA (CUDA); the tokens are compared with an unquantised run",
    )
    parser.add_argument(
        "--placement",
        default="gpu",
        choices=["gpu", "stream", "cpu"],
        help="gpu: resident on --device; stream: layers streamed from RAM; cpu: resident on the CPU",
    )
    parser.add_argument(
        "--memory-cap-gb",
        type=float,
        default=None,
        help="CUDA: cap this process's CUDA memory (set_per_process_memory_fraction)",
    )
    parser.add_argument(
        "--matrix", action="store_true", help="resident vs stream vs cpu per precision, one process each"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PRECISION:PLACEMENT",
        help="--matrix: run only these rows, e.g. fp32:cpu bf16:cpu",
    )
    parser.add_argument(
        "--files",
        type=Path,
        nargs=3,
        default=None,
        metavar=("ADAPTER", "LLAVA_DIR", "CLIP"),
        help="benchmark these files (used by --matrix for its rows)",
    )
    parser.add_argument("--tokens", type=Path, default=None, help="also save the cond tokens here (torch.save)")
    parser.add_argument(
        "--write-device",
        default="cpu",
        help="--full-width: draw the random weights on this device (cuda: seconds, not minutes)",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()

    from moma.llava import resolve_dtype

    dtype_bytes = torch.empty((), dtype=resolve_dtype(args.precision, args.device)).element_size()
    with contextlib.ExitStack() as stack:
        if args.files:
            adapter, llava_dir, clip = args.files
        elif args.full_width:
            root = args.keep_files or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moma-bench-")))
            if (root / "MoMA_llava_7b_full_width" / "config.json").is_file():
                llava_dir, clip = root / "MoMA_llava_7b_full_width", root / "clip-vit-large-patch14-336"
                print(f"using the full-width random LLaVA already in {root}", flush=True)
            else:
                layers = full_width_layers(args.layers, dtype_bytes)
                print(
                    f"writing a full-width random LLaVA with {layers} of {FULL['layers']} layers to {root} ...",
                    flush=True,
                )
                start = time.perf_counter()
                llava_dir, clip = write_full_width(root, layers, args.write_device)
                print(f"  written in {time.perf_counter() - start:.1f} s", flush=True)
                if args.write_device.startswith("cuda"):
                    torch.cuda.empty_cache()  # the rows run in processes of their own; leave them the memory
            adapter = fixture_files()[0]
        else:
            adapter, llava_dir, clip = fixture_files()
        if args.matrix:
            run_matrix(args, adapter, llava_dir, clip)
            if args.full_width and args.keep_files is None:
                shutil.rmtree(root, ignore_errors=True)
            return
        if args.memory_cap_gb:
            if not args.device.startswith("cuda"):
                parser.error("--memory-cap-gb needs --device cuda")
            total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, args.memory_cap_gb * 2**30 / total), torch.device(args.device)
            )
        try:
            result = measure(
                adapter, llava_dir, clip, args.precision, args.device, args.repeats, args.quantization, args.placement
            )
        except torch.cuda.OutOfMemoryError as error:
            result = {"placement": args.placement, "oom": str(error).splitlines()[0]}
            print(f"out of CUDA memory ({args.placement}, cap {args.memory_cap_gb} GB): {result['oom']}")
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))
            return
        if args.tokens:
            torch.save(result["_cond_tokens"], args.tokens)
        if args.quantization != "none":
            exact = measure(adapter, llava_dir, clip, args.precision, args.device, 1)
            quantised, reference = result["_cond_tokens"].flatten(), exact["_cond_tokens"].flatten()
            result["cond_tokens_cosine_vs_unquantised"] = float(
                torch.nn.functional.cosine_similarity(quantised, reference, dim=0)
            )
            result["cond_tokens_max_abs_diff_vs_unquantised"] = float((quantised - reference).abs().max())
            result["unquantised_load_peak_cuda_mb"] = exact.get("load_peak_cuda_mb")
        result.pop("_cond_tokens")
        if args.full_width and args.keep_files is None:
            shutil.rmtree(root, ignore_errors=True)

    result.update(
        kind="given files" if args.files else "full-width random" if args.full_width else "test fixtures",
        precision=args.precision,
        quantization=args.quantization,
        memory_cap_gb=args.memory_cap_gb,
        device=args.device,
        torch=torch.__version__,
        cpu_count=psutil.cpu_count(),
        machine=platform.machine(),
    )
    print(
        f"LLaVA context encoder benchmark ({result['kind']}, {args.precision} on {args.device}, "
        f"placement {args.placement}, quantization {args.quantization}, "
        f"torch {torch.__version__}, {psutil.cpu_count()} CPUs)"
    )
    print(
        f"  model: {result['layers']} decoder layers, {result['params_m']:.0f} M parameters (with CLIP, mapping, projector)"
    )
    print(f"  import transformers' Llama/CLIP modules (once per process): {result['import_s']:.2f} s")
    print(f"  load:   {result['load_s']:.2f} s   peak RSS {result['load_peak_rss_mb']:.0f} MB")
    warm = f", warm {result['encode_warm_s']:.2f} s" if result["encode_warm_s"] is not None else ""
    print(f"  encode: first {result['encode_first_s']:.2f} s{warm}   peak RSS {result['encode_peak_rss_mb']:.0f} MB")
    if "load_peak_cuda_mb" in result:
        print(
            f"  peak CUDA memory: load {result['load_peak_cuda_mb']:.0f} MB, encode {result['encode_peak_cuda_mb']:.0f} MB, "
            f"after freeing the encoder {result['cuda_after_free_mb']:.0f} MB"
        )
    print(
        f"  RSS: before load {result['rss_before_load_mb']:.0f} MB, with encoder {result['rss_with_encoder_mb']:.0f} MB, "
        f"after freeing it {result['rss_after_free_mb']:.0f} MB"
    )
    if "cond_tokens_cosine_vs_unquantised" in result:
        print(
            f"  {args.quantization} vs unquantised: cond tokens cosine {result['cond_tokens_cosine_vs_unquantised']:.5f}, "
            f"max |diff| {result['cond_tokens_max_abs_diff_vs_unquantised']:.4f}; peak CUDA memory loading "
            f"{result.get('load_peak_cuda_mb', 0):.0f} MB vs {result['unquantised_load_peak_cuda_mb'] or 0:.0f} MB"
        )
    if args.full_width and result["layers"] < FULL["layers"]:
        per_layer_params = (4 * FULL["hidden"] ** 2 + 3 * FULL["hidden"] * FULL["intermediate"]) / 1e6
        missing = FULL["layers"] - result["layers"]
        print(
            f"  (the real model has {FULL['layers']} layers: {missing} more x {per_layer_params:.0f} M parameters; "
            f"decoder time and memory grow about linearly with the layer count)"
        )
    if "streamed_layers" in result:
        print(
            f"  streamed: {result['streamed_layers']} layers per encode, at most {result['max_layers_on_device']} "
            f"on {args.device} at a time"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def matrix_rows(device: str) -> list[tuple[str, str, float | None]]:
    """(precision, placement, CUDA cap in GB) per row: resident vs streaming vs cpu, per precision."""
    if device.startswith("cuda"):
        rows = []
        for precision in ("fp16", "bf16"):
            rows += [
                (precision, "gpu", None),
                (precision, "stream", None),
                (precision, "stream", 8.0),
                (precision, "stream", 6.0),
                (precision, "gpu", 8.0),
            ]
        return rows + [("bf16", "cpu", None)]
    return [(precision, placement, None) for precision in ("fp32", "bf16") for placement in ("cpu", "stream")]


def run_matrix(args: argparse.Namespace, adapter: Path, llava_dir: Path, clip: Path) -> None:
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory(prefix="moma-bench-rows-") as tmp:
        chosen = [row for row in matrix_rows(args.device) if not args.only or f"{row[0]}:{row[1]}" in args.only]
        for number, (precision, placement, cap) in enumerate(chosen):
            out, tokens = Path(tmp) / f"{number}.json", Path(tmp) / f"{number}.pt"
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--files",
                str(adapter),
                str(llava_dir),
                str(clip),
                "--precision",
                precision,
                "--placement",
                placement,
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
                "--json",
                str(out),
                "--tokens",
                str(tokens),
            ]
            if cap:
                command += ["--memory-cap-gb", str(cap)]
            print(f"--- {precision} {placement}" + (f" (cap {cap:g} GB)" if cap else ""), flush=True)
            completed = subprocess.run(command)
            if completed.returncode != 0 or not out.is_file():  # recorded; the other rows still run
                result = {"placement": placement, "error": f"the row's process exited with {completed.returncode}"}
            else:
                result = json.loads(out.read_text())
            result.update(precision=precision, cap=cap)
            if tokens.is_file():
                result["_tokens"] = torch.load(tokens, weights_only=True)
            rows.append(result)
    reference = {
        row["precision"]: row["_tokens"]
        for row in rows
        if row["placement"] == "gpu" and not row["cap"] and "_tokens" in row
    }
    if not args.device.startswith("cuda"):  # on the CPU the resident rows are 'cpu'
        reference = {row["precision"]: row["_tokens"] for row in rows if row["placement"] == "cpu" and "_tokens" in row}

    def mb(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    for row in rows:
        base = reference.get(row["precision"])
        if "_tokens" in row and base is not None:
            row["tokens_vs_resident"] = (
                "equal"
                if torch.equal(row["_tokens"], base)
                else f"max diff {float((row['_tokens'] - base).abs().max()):.2e}"
            )

    print(
        "\n| precision | placement | CUDA cap | load s | encode s (first / warm) | peak RSS MB (load / encode) "
        "| peak CUDA MB (load / encode) | tokens vs resident |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cap = f"{row['cap']:g} GB" if row["cap"] else "-"
        if "oom" in row or "error" in row:
            print(
                f"| {row['precision']} | {row['placement']} | {cap} | {'OOM' if 'oom' in row else row['error']} "
                f"| | | | |"
            )
            continue
        same = row.get("tokens_vs_resident", "-")
        warm = "-" if row.get("encode_warm_s") is None else f"{row['encode_warm_s']:.2f}"
        print(
            f"| {row['precision']} | {row['placement']} | {cap} | {row['load_s']:.2f} | "
            f"{row['encode_first_s']:.2f} / {warm} | {mb(row['load_peak_rss_mb'])} / {mb(row['encode_peak_rss_mb'])} | "
            f"{mb(row.get('load_peak_cuda_mb'))} / {mb(row.get('encode_peak_cuda_mb'))} | {same} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows], indent=2)
        )


if __name__ == "__main__":
    main()
