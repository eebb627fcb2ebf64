"""The runner's command line: check and run a workflow (in process or on a server), ``--gui``, ``--download``.

Exit status: 0 images written (or check passed), 1 execution failed, 2 bad arguments or workflow,
3 model or input files missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .backend import Backend
from .common import (
    DEFAULT_WORKFLOW,
    EXIT_FAILED,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_USAGE,
    REPO,
    RunnerError,
    default_base_dir,
    host_dir,
    rel,
)
from .models import MissingModel, format_missing, load_models_table, model_uses, table_entry
from .progress import Progress
from .workflow import Overrides, StagedInput, apply_overrides, context_file_inputs, ids_of, load_workflow

# The first file Save MoMA Context writes in the examples (filename_prefix moma/context), for messages.
SAVED_CONTEXT_HINT = "output/moma/context_00001_.safetensors"

DESCRIPTION = """\
Run a ComfyUI API-format workflow headlessly through ComfyUI's real executor.

The default workflow is workflows/api/moma_context.json (MoMA context editing); the other examples are next
to it (their UI-format twins, for the browser, are in workflows/).

Two ways to execute:
- in process (default): boots the ComfyUI that scripts/setup_host.sh installs (or the one at --comfyui),
  loads custom nodes through ComfyUI's own loader, validates and executes the graph with
  execution.PromptExecutor; images go to ComfyUI's output folder (or --output);
- --server http://127.0.0.1:8188: checks the graph against the server's node definitions and model lists,
  posts it, follows its progress over the websocket and downloads the images into --output (default ./out).

Before anything runs, every model file the graph names (models.json's loader_inputs; a value such as MoMA
Loader's 'none' names no file) is looked up in ComfyUI's model folders; missing ones are listed with their
folder and download command, and the runner exits with status 3 (so does a missing input image or saved
MoMA context). Then ComfyUI's input validation runs (ranges, combo choices, links): a graph any node of
which fails is rejected, exit status 2 (ComfyUI itself would silently skip the outputs that need it).
--demo writes tiny random-weight models (tools/moma_demo), links them into a separate base directory under
the real file names and runs the same graph at 64x64 with 2 steps (Feature Grab at 128) on a generated test
picture, so the whole graph can be seen executing without any download; images are noise.

Other commands:
  --gui [--port N] [--demo]   start ComfyUI's web UI with the pack (127.0.0.1:8188); --demo: on the demo models
  --download NAME|all         fetch a file of the models table into the host's models folder
"""

OVERRIDES_HELP = """\
Overrides (each one touches the nodes named here; an override the graph has no node for is an error):
  --image    LoadImage.image (if there are several LoadImage nodes: the one titled "...reference...");
             the file is copied into ComfyUI's input folder (uploaded with --server)
  --mask     LoadImageMask.image; without a LoadImageMask node, one (channel red: white = subject) is added
             and wired to the free ``mask`` input of every MomaObjectMasker
  --context  MomaLoadContext.context_file (a .safetensors written by Save MoMA Context); the file is copied
             into ComfyUI's input folder (uploaded with --server) and the node's ``path`` is cleared
  --subject  every literal ``subject`` input (MomaContextEncoder, MomaFeatureGrab)
  --prompt   MomaContextEncoder.prompt; without that node, the literal ``text`` of the CLIPTextEncode wired
             to a sampler's ``positive`` input
  --seed     KSampler.seed, KSamplerAdvanced/SamplerCustom/RandomNoise.noise_seed, MomaFeatureGrab.seed
  --steps    KSampler/KSamplerAdvanced/BasicScheduler.steps
  --width / --height   EmptyLatentImage.width / .height (multiples of 8)
  --reference-resolution   MomaFeatureGrab.resolution (0 = auto, the size sampled; or a multiple of 64, 64..1024)

Exit status: 0 images written (or check passed), 1 execution failed, 2 bad arguments or workflow,
3 model or input files missing.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_workflow.py",
        description=DESCRIPTION,
        epilog=OVERRIDES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "workflow",
        nargs="?",
        type=Path,
        default=DEFAULT_WORKFLOW,
        help=f"API-format workflow JSON (default: {rel(DEFAULT_WORKFLOW)})",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run on generated tiny models (no downloads), 64x64, 2 steps, reference at 128, "
        "in a separate base dir; with --server: the demo sizes and picture on the server",
    )
    parser.add_argument("--image", type=Path, help="reference image (LoadImage)")
    parser.add_argument("--mask", type=Path, help="subject mask, white = subject (LoadImageMask)")
    parser.add_argument(
        "--context", type=Path, help="saved MoMA context .safetensors (Save MoMA Context) for MomaLoadContext"
    )
    parser.add_argument("--subject", help="subject word, e.g. 'car' (MomaContextEncoder, MomaFeatureGrab)")
    parser.add_argument("--prompt", help="text prompt (MomaContextEncoder.prompt, else the positive CLIPTextEncode)")
    parser.add_argument("--seed", type=int, help="sampler seed (also MomaFeatureGrab.seed)")
    parser.add_argument("--steps", type=int, help="sampling steps")
    parser.add_argument("--width", type=int, help="image width (EmptyLatentImage)")
    parser.add_argument("--height", type=int, help="image height (EmptyLatentImage)")
    parser.add_argument(
        "--reference-resolution",
        type=int,
        metavar="N",
        help="side the reference is encoded at (MomaFeatureGrab.resolution; 0 = auto, the "
        "size being sampled; --demo uses 128)",
    )
    parser.add_argument(
        "--output", type=Path, help="folder for the images (default: ComfyUI's output folder; ./out with --server)"
    )
    parser.add_argument(
        "--base-dir",
        type=Path,
        help="ComfyUI base directory (models/, input/, output/, custom_nodes/); default "
        "<host>/base, or <host>/demo-base with --demo, or the --comfyui folder itself",
    )
    parser.add_argument(
        "--comfyui", type=Path, help="ComfyUI root to import (default: the host scripts/setup_host.sh installs)"
    )
    parser.add_argument("--server", metavar="URL", help="run on a ComfyUI server, e.g. http://127.0.0.1:8188")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check: node types, model files, input files and ComfyUI's validation; run nothing",
    )
    parser.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is available")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's log and full tracebacks")
    parser.add_argument("--gui", action="store_true", help="start ComfyUI's web UI with the pack (see --port)")
    parser.add_argument("--port", type=int, default=8188, help="--gui: the port on 127.0.0.1 (default 8188)")
    parser.add_argument(
        "--download",
        metavar="NAME",
        action="append",
        help="download a model of the table (its file or folder name, or 'all'); repeatable",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.server and (args.comfyui or args.base_dir):
        parser.error(
            "--server runs on the server's own ComfyUI and models; it cannot combine with --comfyui or --base-dir"
        )
    if args.gui and (args.server or args.check or args.download):
        parser.error("--gui starts a server: it does not combine with --server, --check or --download")
    return args


def make_backend(args: argparse.Namespace) -> Backend:
    if args.server:
        from .remote import ServerBackend

        return ServerBackend(args.server, (args.output or Path("out")).resolve(), args.verbose)
    from .inprocess import InProcessBackend

    comfy_root = (args.comfyui or host_dir() / "ComfyUI").resolve()
    return InProcessBackend(comfy_root, default_base_dir(args), args.cpu, args.verbose, demo=args.demo)


def report_problems(
    backend: Backend,
    prompt: dict,
    unknown: list[str],
    missing: list[MissingModel],
    fetched_later: list[MissingModel],
    missing_inputs: list[tuple[str, str]],
    missing_contexts: list[tuple[str, str]],
    demo: bool = False,
) -> int:
    """Print what stops the graph from running (on stderr); return the exit status (EXIT_OK if nothing)."""
    problems = 0
    if unknown:
        problems |= 1
        print(f"\nThis ComfyUI has no node type(s): {', '.join(unknown)}.", file=sys.stderr)
        if backend.pack_loaded():
            print(
                f"The pack ({REPO}) is loaded but does not provide them: is the checkout up to date?", file=sys.stderr
            )
        else:
            for line in backend.load_problems():
                print(line, file=sys.stderr)
    if missing:
        problems |= 2
        print("\n" + format_missing(missing + fetched_later), file=sys.stderr, end="")
        if demo and backend.device == "server":
            from .remote import SERVER_DEMO_HINT

            print(SERVER_DEMO_HINT, file=sys.stderr)
    elif fetched_later:
        for m in fetched_later:
            print(
                f"note: {m.use.name} is not in {m.target}; {m.use.class_type} downloads it on first use "
                f"(needs internet; source: {m.entry['download'] if m.entry else 'rembg releases'})."
            )
    if missing_inputs:
        problems |= 2
        for nid, name in missing_inputs:
            print(
                f"\nInput image {name!r} (node {nid} {prompt[nid]['class_type']}) is not in {backend.input_dir()}: "
                f"pass {'--mask' if prompt[nid]['class_type'] == 'LoadImageMask' else '--image'} PATH.",
                file=sys.stderr,
            )
    if missing_contexts:
        problems |= 2
        for nid, name in missing_contexts:
            print(
                f"\nSaved MoMA context {name!r} (node {nid} MomaLoadContext) is not there. Run "
                f"{rel(DEFAULT_WORKFLOW)} first (its Save MoMA Context node writes "
                f"{SAVED_CONTEXT_HINT}), or pass --context PATH.",
                file=sys.stderr,
            )
    if not problems:
        return EXIT_OK
    return EXIT_MISSING if problems & 2 else EXIT_USAGE


def run_workflow(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    table = load_models_table()
    workflow_path = args.workflow.resolve()
    prompt = load_workflow(workflow_path)
    ov = Overrides(
        image=args.image,
        mask=args.mask,
        subject=args.subject,
        prompt=args.prompt,
        seed=args.seed,
        steps=args.steps,
        width=args.width,
        height=args.height,
        reference_resolution=args.reference_resolution,
        context=args.context,
    )
    backend = make_backend(args)
    print(f"workflow: {workflow_path}")
    staged: list[StagedInput] = []
    with backend.starting():
        backend.prepare()
        if args.demo:
            from . import demo

            backend.provide_demo_models(model_uses(prompt, table["loader_inputs"]), demo.demo_model_builders())
            demo.demo_overrides(prompt, ov)
        changes, staged = apply_overrides(prompt, ov)
        backend.load_nodes()
        if args.demo and ov.context is None and context_file_inputs(prompt):
            subject = demo.demo_context_subject(prompt)
            context = demo.demo_context_file(subject)
            print(
                f"demo: saved MoMA context = {context.name} (the demo picture, subject {subject!r}, "
                "encoded by the tiny LLaVA)"
            )
            staged += [
                StagedInput(nid, "context_file", context, annotate=True) for nid, _ in context_file_inputs(prompt)
            ]
    print(f"ComfyUI ready on {backend.device} ({time.perf_counter() - started:.1f}s)")

    unknown = sorted({n["class_type"] for n in prompt.values()} - backend.known_class_types())
    missing = [
        m
        for use in model_uses(prompt, table["loader_inputs"])
        if (m := backend.locate_model(use, table_entry(table, use.folder, use.name))) is not None
    ]
    fetched_later = [m for m in missing if m.use.auto_download]
    missing = [m for m in missing if not m.use.auto_download]
    for item in staged:
        name = backend.stage_input(item.source)
        prompt[item.node_id]["inputs"][item.input_name] = f"{name} [input]" if item.annotate else name
        changes.append(
            f"node {item.node_id} {prompt[item.node_id]['class_type']}.{item.input_name} = "
            f"{prompt[item.node_id]['inputs'][item.input_name]!r} (from {item.source})"
        )
    missing_inputs = [
        (nid, prompt[nid]["inputs"]["image"])
        for nid in ids_of(prompt, "LoadImage", "LoadImageMask")
        if isinstance(prompt[nid]["inputs"].get("image"), str)
        and not backend.input_exists(prompt[nid]["inputs"]["image"])
    ]
    missing_contexts = [(nid, name) for nid, name in context_file_inputs(prompt) if not backend.context_exists(name)]
    for change in changes:
        print(f"override: {change}")

    code = report_problems(
        backend, prompt, unknown, missing, fetched_later, missing_inputs, missing_contexts, demo=args.demo
    )
    if code != EXIT_OK:
        return code
    if args.check:
        backend.validate(prompt)
        print(
            "check passed: every node type, model file and input file is there and ComfyUI's validation "
            "accepts the graph."
        )
        return EXIT_OK

    if args.output is not None:
        backend.set_output_dir(args.output.resolve())
    progress = Progress(prompt)
    images = backend.run(prompt, progress)
    elapsed = progress.done()
    if not images:
        print("The workflow ran but saved no images (no SaveImage node?).", file=sys.stderr)
        return EXIT_FAILED
    for saved in backend.saved_files:
        print(f"saved MoMA context: {saved}")
    print(f"done in {elapsed:.1f}s (total {time.perf_counter() - started:.1f}s); images:")
    for path in images:
        print(f"  {path}")
    return EXIT_OK


def run(argv: list[str] | None = None) -> int:
    """Parse the command line and do what it asks; raises RunnerError for a user-facing failure."""
    args = parse_args(argv)
    if args.download:
        from .download import download_command

        return download_command(args.download, host_dir() / "base" if args.base_dir is None else args.base_dir)
    if args.gui:
        from .gui import serve

        return serve(args)
    return run_workflow(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit status, user-facing errors printed without a traceback."""
    try:
        return run(argv)
    except RunnerError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
