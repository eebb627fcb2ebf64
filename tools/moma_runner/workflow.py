"""API-format workflows: loading, graph helpers and the command-line overrides (pure graph edits)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import API_DIR, REPO, RunnerError

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
SEED_INPUTS = {
    "KSampler": "seed",
    "KSamplerAdvanced": "noise_seed",
    "SamplerCustom": "noise_seed",
    "RandomNoise": "noise_seed",
    "MomaFeatureGrab": "seed",
}
STEPS_INPUTS = {"KSampler": "steps", "KSamplerAdvanced": "steps", "BasicScheduler": "steps"}
LATENT_SIZE_CLASSES = ("EmptyLatentImage",)


def load_workflow(path: Path) -> dict[str, dict]:
    """Load an API-format workflow (``{id: {class_type, inputs}}``); reject the UI format with advice."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise RunnerError(f"Workflow file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise RunnerError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):  # a saved /prompt request body
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        hint = ""
        api_twin = path.parent / "api" / path.name
        if api_twin.is_file():
            hint = f" Its API variant is {api_twin}."
        raise RunnerError(
            f"{path} is a UI-format workflow (the file the browser saves). The runner needs the API format: "
            f"in ComfyUI use Workflow > Export (API), or take the file from {API_DIR.relative_to(REPO)}/.{hint}"
        )
    if not isinstance(data, dict) or not data:
        raise RunnerError(f"{path} holds no workflow nodes.")
    for node_id, node in data.items():
        if not isinstance(node, dict) or "class_type" not in node or not isinstance(node.get("inputs"), dict):
            raise RunnerError(f"{path}: node {node_id!r} has no class_type/inputs; is this an API-format workflow?")
    return data


def is_link(value: Any) -> bool:
    """Whether an input value is a link ``[node id, output index]``."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def node_title(node: dict) -> str:
    """The title the frontend shows for a node (``_meta.title``), or ''."""
    return str(node.get("_meta", {}).get("title", ""))


def ids_of(prompt: dict, *class_types: str) -> list[str]:
    """Node ids of the given class types, in numeric order where ids are numbers."""
    found = [nid for nid, node in prompt.items() if node["class_type"] in class_types]
    return sorted(found, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))


@dataclass
class Overrides:
    image: Path | None = None
    mask: Path | None = None
    subject: str | None = None
    prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    reference_resolution: int | None = None
    context: Path | None = None


@dataclass
class StagedInput:
    """A local file that must be placed in ComfyUI's input folder and its name written into a node."""

    node_id: str
    input_name: str
    source: Path
    annotate: bool = False  # write "name [input]" (combos listing input/ and output/ files)


def _pick_one(prompt: dict, ids: list[str], title_word: str, what: str) -> str:
    if len(ids) == 1:
        return ids[0]
    titled = [i for i in ids if title_word in node_title(prompt[i]).lower()]
    if len(titled) == 1:
        return titled[0]
    listing = ", ".join(f"{i} ({node_title(prompt[i]) or prompt[i]['class_type']})" for i in ids)
    raise RunnerError(f"{what}: the workflow has several candidate nodes ({listing}); title one '...{title_word}...'.")


def _set_literal(prompt: dict, targets: dict[str, str], value: Any, changes: list[str]) -> int:
    count = 0
    for class_type, input_name in targets.items():
        for nid in ids_of(prompt, class_type):
            inputs = prompt[nid]["inputs"]
            if input_name in inputs and not is_link(inputs[input_name]):
                inputs[input_name] = value
                changes.append(f"node {nid} {class_type}.{input_name} = {value!r}")
                count += 1
    return count


def _positive_text_nodes(prompt: dict) -> list[str]:
    found: list[str] = []
    for nid in ids_of(prompt, *SAMPLER_CLASSES):
        link = prompt[nid]["inputs"].get("positive")
        if is_link(link) and link[0] in prompt:
            src = prompt[link[0]]
            if src["class_type"] == "CLIPTextEncode" and not is_link(src["inputs"].get("text")):
                if link[0] not in found:
                    found.append(link[0])
    return found


def apply_overrides(prompt: dict, ov: Overrides) -> tuple[list[str], list[StagedInput]]:
    """Apply the command-line overrides to ``prompt`` in place.

    Returns the changes made (for printing) and the local files still to be staged into ComfyUI's input
    folder (their node input is set once the file has a name there).
    """
    changes: list[str] = []
    staged: list[StagedInput] = []
    if ov.image is not None:
        ids = ids_of(prompt, "LoadImage")
        if not ids:
            raise RunnerError("--image: this workflow has no LoadImage node.")
        nid = _pick_one(prompt, ids, "reference", "--image")
        staged.append(StagedInput(nid, "image", ov.image))
    if ov.mask is not None:
        ids = ids_of(prompt, "LoadImageMask")
        if ids:
            staged.append(StagedInput(_pick_one(prompt, ids, "mask", "--mask"), "image", ov.mask))
        else:
            maskers = [i for i in ids_of(prompt, "MomaObjectMasker") if "mask" not in prompt[i]["inputs"]]
            if not maskers:
                raise RunnerError("--mask: this workflow has no LoadImageMask node and no MomaObjectMasker to feed.")
            new_id = str(max((int(i) for i in prompt if i.isdigit()), default=0) + 1)
            prompt[new_id] = {
                "class_type": "LoadImageMask",
                "inputs": {"image": "", "channel": "red"},
                "_meta": {"title": "Reference mask (added by run_workflow)"},
            }
            for masker in maskers:
                prompt[masker]["inputs"]["mask"] = [new_id, 0]
            changes.append(f"node {new_id} LoadImageMask added, wired to MomaObjectMasker {', '.join(maskers)}.mask")
            staged.append(StagedInput(new_id, "image", ov.mask))
    if ov.context is not None:
        ids = ids_of(prompt, "MomaLoadContext")
        if not ids:
            raise RunnerError("--context: this workflow has no MomaLoadContext node (Load MoMA Context).")
        for nid in ids:
            staged.append(StagedInput(nid, "context_file", ov.context, annotate=True))
            if prompt[nid]["inputs"].get("path"):
                prompt[nid]["inputs"]["path"] = ""
                changes.append(f"node {nid} MomaLoadContext.path = '' (context_file is used)")
    if ov.subject is not None:
        targets = {"MomaContextEncoder": "subject", "MomaFeatureGrab": "subject"}
        if not _set_literal(prompt, targets, ov.subject, changes):
            raise RunnerError(
                "--subject: no node in this workflow takes a subject (MomaContextEncoder, MomaFeatureGrab)."
            )
    if ov.prompt is not None:
        if not _set_literal(prompt, {"MomaContextEncoder": "prompt"}, ov.prompt, changes):
            text_nodes = _positive_text_nodes(prompt)
            if not text_nodes:
                raise RunnerError(
                    "--prompt: no MomaContextEncoder and no CLIPTextEncode wired to a sampler's positive input."
                )
            for nid in text_nodes:
                prompt[nid]["inputs"]["text"] = ov.prompt
                changes.append(f"node {nid} CLIPTextEncode.text = {ov.prompt!r}")
    if ov.seed is not None:
        if ov.seed < 0:
            raise RunnerError("--seed must be >= 0.")
        if not _set_literal(prompt, SEED_INPUTS, ov.seed, changes):
            raise RunnerError("--seed: no seed input in this workflow.")
    if ov.steps is not None:
        if ov.steps < 1:
            raise RunnerError("--steps must be >= 1.")
        if not _set_literal(prompt, STEPS_INPUTS, ov.steps, changes):
            raise RunnerError("--steps: no KSampler/KSamplerAdvanced/BasicScheduler in this workflow.")
    for name, value in (("width", ov.width), ("height", ov.height)):
        if value is None:
            continue
        if value < 16 or value % 8:
            raise RunnerError(f"--{name} must be a multiple of 8 and at least 16 (got {value}).")
        if not _set_literal(prompt, {c: name for c in LATENT_SIZE_CLASSES}, value, changes):
            raise RunnerError(f"--{name}: no EmptyLatentImage node in this workflow.")
    if ov.reference_resolution is not None:
        value = ov.reference_resolution
        if value != 0 and (value % 64 or not 64 <= value <= 1024):
            raise RunnerError(
                f"--reference-resolution must be 0 (auto) or a multiple of 64 from 64 to 1024 (got {value})."
            )
        if not _set_literal(prompt, {"MomaFeatureGrab": "resolution"}, value, changes):
            raise RunnerError(
                "--reference-resolution: no MomaFeatureGrab (Self-Attention Feature Grab) in this workflow."
            )
    return changes, staged


def context_file_inputs(prompt: dict) -> list[tuple[str, str]]:
    """(node id, context_file) of every MomaLoadContext that reads its file by name (no ``path`` given)."""
    found = []
    for nid in ids_of(prompt, "MomaLoadContext"):
        inputs = prompt[nid]["inputs"]
        name = inputs.get("context_file")
        if isinstance(name, str) and not (isinstance(inputs.get("path"), str) and inputs["path"].strip()):
            found.append((nid, name))
    return found
