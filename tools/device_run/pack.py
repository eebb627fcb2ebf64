"""The carried folder ``.gpu-pack/`` (git-ignored) and the size of one device-tool call.

``.gpu-pack/ComfyUI/``: the installed host's ComfyUI tree (scripts/setup_host.sh) without what in-process execution
of an SD1.5 graph never reads: the tokenizer data of other model families (SD1.5's is comfy/sd1_tokenizer), the
API nodes (not loaded: ``init_api_nodes=False``), the frontend's subgraph blueprints, ComfyUI's own tests and CI.
``.gpu-pack/wheels/``: cp312 / pure wheels of the packages that tree imports and the machine lacks (WHEELS), fetched
with ``pip download`` here and installed there with ``pip install --no-index --no-deps --target``.
``.gpu-pack/manifest.json``: what was packed, from where, with sizes and sha256 of the wheels.

What travels in one call is the working tree (tracked files and untracked files git does not ignore, plus
``shared/`` if the checkout has one) and the carried paths: 64 MiB in all (``account``).
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import machine

PACK_DIR = ".gpu-pack"
CARRY = (PACK_DIR,)  # the device tool's `carry` list for the run

# Paths (relative to the ComfyUI root, fnmatch patterns; a folder drops everything in it; a pattern ending in "/"
# matches folders only) left out of the copy.
COMFY_LEFT_OUT = {
    "comfy/text_encoders/*_tokenizer/": "tokenizer data of other model families (26 MiB; SD1.5 uses comfy/sd1_tokenizer)",
    "comfy_api_nodes": "the API nodes (the run boots ComfyUI with init_api_nodes=False)",
    "blueprints": "the frontend's subgraph blueprints (read by the server's subgraph manager only)",
    "tests": "ComfyUI's own tests",
    "tests-unit": "ComfyUI's own tests",
    ".github": "ComfyUI's CI",
    ".ci": "ComfyUI's CI",
    "script_examples": "API client examples",
    "openapi.yaml": "the server's API description",
}
SKIPPED_NAMES = ("__pycache__", "*.pyc", ".git")


@dataclass(frozen=True)
class Wheel:
    """A package the machine lacks, carried as a wheel: ``pure`` fetches the py3-none-any build, else the
    manylinux build for CPython 3.12."""

    requirement: str  # name==version
    pure: bool
    why: str
    mib: float  # the wheel's size (checked when packing; the CI test adds these up without downloading)

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


WHEELS = (
    Wheel(
        "av==18.1.0", False, "comfy_api.latest imports it at start (video types); LoadImage decodes with it", mib=34.13
    ),
    Wheel("comfy-aimdo==0.4.11", False, "comfy.model_management imports it at start", mib=0.33),
    Wheel(
        "comfy-kitchen==0.2.26",
        True,
        "comfy.quant_ops and comfy.ldm.joyimage import it at start; the pure build "
        "(eager and triton backends): the build with CUDA kernels is 45 MB, and only fp8/fp4 weights use them",
        mib=0.14,
    ),
    Wheel("torchsde==0.2.6", True, "comfy.k_diffusion.sampling imports it (every sampler)", mib=0.06),
    Wheel("trampoline==0.1.2", True, "torchsde needs it", mib=0.01),
    Wheel("simpleeval==1.0.8", True, "comfy_extras/nodes_math.py (small)", mib=0.02),
    Wheel("spandrel==0.4.2", True, "comfy_extras/nodes_upscale_model.py (small)", mib=0.31),
)

# ComfyUI requirements neither on the machine nor carried: what is lost without them.
LEFT_OUT_REQUIREMENTS = {
    "comfyui-frontend-package": "the web frontend (no server runs)",
    "comfyui-workflow-templates": "the frontend's templates (no server runs)",
    "comfyui-embedded-docs": "the frontend's node docs (no server runs)",
    "alembic": "the server's database",
    "sqlalchemy": "the server's database and asset index (nodes_images, nodes_gaussian_splat, nodes_replacements "
    "fail to import: none is used by the run)",
    "blake3": "asset hashing (server)",
    "kornia": "nodes_canny, nodes_latent, nodes_morphology, nodes_post_processing (not used by the run)",
    "pydantic": "API nodes and pyproject parsing of custom nodes (warnings only)",
    "pydantic-settings": "pyproject parsing of custom nodes (warnings only)",
    "pyopengl": "the GLSL node (not used)",
    "comfy-angle": "the GLSL node (not used)",
}

PIP_NOISE = re.compile(
    r"is ignored: it is neither a file nor a directory|Running pip as the 'root' user|"
    r"pip's dependency resolver|^\s*$"
)


# --- building ------------------------------------------------------------------------------------------------


def left_out(relative: str, is_dir: bool = False) -> bool:
    """Whether a path inside the ComfyUI tree (posix, relative to its root) stays behind."""
    parts = relative.split("/")
    if any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in SKIPPED_NAMES):
        return True
    # every folder above it, and the path itself (with a "/" when it is a folder)
    prefixes = ["/".join(parts[: i + 1]) + "/" for i in range(len(parts) - 1)]
    prefixes.append(relative + ("/" if is_dir else ""))
    for pattern in COMFY_LEFT_OUT:
        if any(
            fnmatch.fnmatch(prefix, pattern if pattern.endswith("/") else pattern + "/")
            or fnmatch.fnmatch(prefix, pattern)
            for prefix in prefixes
        ):
            return True
    return False


def copy_comfy_tree(source: Path, target: Path) -> dict:
    """Copy ``source`` (a ComfyUI root) to ``target`` without what ``left_out`` names; sizes copied / left out."""
    if not (source / "comfy").is_dir() or not (source / "nodes.py").is_file():
        raise SystemExit(f"No ComfyUI tree at {source}: install the host first (bash scripts/setup_host.sh).")
    if target.exists():
        shutil.rmtree(target)
    copied = left = files = 0
    for folder, dirnames, filenames in os.walk(source):
        folder_path = Path(folder)
        relative_folder = folder_path.relative_to(source).as_posix()
        for dirname in list(dirnames):
            relative = dirname if relative_folder == "." else f"{relative_folder}/{dirname}"
            if left_out(relative, is_dir=True):
                dirnames.remove(dirname)
                left += tree_bytes(folder_path / dirname)
        for filename in filenames:
            relative = filename if relative_folder == "." else f"{relative_folder}/{filename}"
            path = folder_path / filename
            if left_out(relative):
                left += path.lstat().st_size
                continue
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                raise SystemExit(f"{path}: a link in the ComfyUI tree (it would travel as a link): copy it by hand")
            shutil.copy2(path, destination)
            copied += path.stat().st_size
            files += 1
    return {"files": files, "bytes": copied, "bytes_left_out": left}


def pip_download(wheel: Wheel, dest: Path, python: str = sys.executable) -> Path:
    """Fetch ``wheel`` for the machine (CPython 3.12, manylinux x86-64) into ``dest``; reuse one already there."""
    existing = find_wheel(wheel, dest)
    if existing is not None:
        return existing
    if wheel.pure:
        target = ["--implementation", "py", "--platform", "any"]
    else:
        target = [
            "--implementation",
            "cp",
            *[
                arg
                for tag in (
                    "manylinux_2_28_x86_64",
                    "manylinux_2_27_x86_64",
                    "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64",
                    "manylinux1_x86_64",
                )
                for arg in ("--platform", tag)
            ],
        ]
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        machine.PYTHON,
        *target,
        "-d",
        str(dest),
        wheel.requirement,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        noise = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if not PIP_NOISE.search(line))
        raise SystemExit(f"pip download {wheel.requirement} failed:\n{noise}")
    found = find_wheel(wheel, dest)
    if found is None:
        raise SystemExit(f"pip download {wheel.requirement}: no wheel of it in {dest}")
    return found


def find_wheel(wheel: Wheel, folder: Path) -> Path | None:
    """The wheel file of ``wheel`` (its name and version, and a pure build if it must be pure) in ``folder``."""
    stem = f"{machine.normalize(wheel.name).replace('-', '_')}-{wheel.version}-"
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        if path.name.lower().startswith(stem.lower()) and (not wheel.pure or path.name.endswith("-none-any.whl")):
            return path
    return None


def wheel_fits_machine(path: Path) -> bool:
    """Whether a wheel's file name allows CPython 3.12 on manylinux x86-64 (abi3 from an older CPython counts)."""
    parts = path.name[:-4].split("-")
    python_tags, abi_tags, platform_tags = (parts[-3].split("."), parts[-2].split("."), parts[-1].split("."))
    if platform_tags != ["any"] and not any(
        tag.startswith(("manylinux", "linux_x86_64")) and tag.endswith("x86_64") for tag in platform_tags
    ):
        return False
    for python_tag in python_tags:
        if python_tag in ("py3", "py312", "cp312"):
            return True
        if python_tag.startswith("cp3") and "abi3" in abi_tags and int(python_tag[3:]) <= 12:
            return True
    return False


def build(repo: Path, host_comfy: Path, download: bool = True, echo=print) -> dict:
    """Build ``repo/.gpu-pack`` from ``host_comfy`` (a ComfyUI root) and the WHEELS; return its manifest."""
    pack = repo / PACK_DIR
    pack.mkdir(exist_ok=True)
    echo(f"[pack] copying {host_comfy} into {pack / 'ComfyUI'} (leaving out {', '.join(COMFY_LEFT_OUT)})")
    comfy = copy_comfy_tree(host_comfy, pack / "ComfyUI")
    version_file = host_comfy / "comfyui_version.py"
    version = (
        re.search(r'__version__\s*=\s*"([^"]+)"', version_file.read_text()).group(1) if version_file.is_file() else "?"
    )
    wheels_dir = pack / "wheels"
    wheels_dir.mkdir(exist_ok=True)
    wanted = []
    for wheel in WHEELS:
        path = pip_download(wheel, wheels_dir) if download else find_wheel(wheel, wheels_dir)
        if path is None:
            raise SystemExit(f"{wheel.requirement}: no wheel in {wheels_dir} (build with downloads allowed)")
        if not wheel_fits_machine(path):
            raise SystemExit(f"{path.name} does not install on CPython {machine.PYTHON} manylinux x86-64")
        size = path.stat().st_size / 2**20
        if abs(size - wheel.mib) > max(0.05, 0.1 * wheel.mib):
            echo(f"[pack] note: {path.name} is {size:.2f} MiB, pack.WHEELS says {wheel.mib}: update it")
        wanted.append(path)
    for stray in set(wheels_dir.glob("*.whl")) - set(wanted):  # an older pin's wheel: two versions stop pip there
        stray.unlink()
    manifest = {
        "built": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "repo_commit": _git(repo, "rev-parse", "HEAD").strip(),
        "comfyui": {"source": str(host_comfy), "version": version, **comfy, "left_out": COMFY_LEFT_OUT},
        "wheels": [
            {
                "file": path.name,
                "requirement": wheel.requirement,
                "why": wheel.why,
                "bytes": path.stat().st_size,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
            for wheel, path in zip(WHEELS, wanted)
        ],
        "left_out_requirements": LEFT_OUT_REQUIREMENTS,
    }
    (pack / "manifest.json").write_text(json.dumps(manifest, indent=2))
    echo(
        f"[pack] ComfyUI {version}: {comfy['files']} files, {comfy['bytes'] / 2**20:.1f} MiB "
        f"({comfy['bytes_left_out'] / 2**20:.1f} MiB left out); wheels: "
        + ", ".join(f"{w['file']} ({w['bytes'] / 2**20:.2f} MiB)" for w in manifest["wheels"])
    )
    return manifest


# --- accounting ----------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def tree_bytes(path: Path) -> int:
    """Bytes under ``path`` as they travel (a link counts as a link)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(child.lstat().st_size for child in path.rglob("*") if child.is_symlink() or child.is_file())


def travelling_files(repo: Path) -> list[tuple[str, int]]:
    """(path, bytes) of what every call sends: tracked files and untracked files git does not ignore, and
    ``shared/`` if the checkout has one."""
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files: dict[str, int] = {}
    for name in filter(None, listed):
        path = repo / name
        if path.is_symlink() or path.is_file():
            files[name] = path.lstat().st_size
    shared = repo / "shared"
    if shared.is_dir():
        for path in shared.rglob("*"):
            if path.is_symlink() or path.is_file():
                files[path.relative_to(repo).as_posix()] = path.lstat().st_size
    return sorted(files.items())


def ignored(repo: Path, relative: str) -> bool:
    return subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", relative]).returncode == 0


def account(repo: Path, carry: tuple[str, ...] | list[str] = CARRY, limit: int = machine.TREE_LIMIT_BYTES) -> dict:
    """What one call with ``carry`` sends and whether it fits: bytes of the working tree and of each carried path,
    the largest files, and the problems (over the limit, a carried path missing or not ignored, too many paths)."""
    tree = travelling_files(repo)
    tree_total = sum(size for _, size in tree)
    problems: list[str] = []
    carried: dict[str, int] = {}
    largest = [(size, name) for name, size in tree]
    if len(carry) > machine.CARRY_MAX_PATHS:
        problems.append(f"{len(carry)} carried paths, over {machine.CARRY_MAX_PATHS}")
    for relative in carry:
        path = repo / relative
        if not path.exists():
            problems.append(f"{relative}: not there (build it: bash scripts/gpu_check.sh --pack)")
            continue
        if not ignored(repo, relative):
            problems.append(f"{relative}: not ignored by git (it would travel twice)")
        carried[relative] = tree_bytes(path)
        largest += (
            [
                (child.lstat().st_size, child.relative_to(repo).as_posix())
                for child in path.rglob("*")
                if child.is_file()
            ]
            if path.is_dir()
            else [(path.lstat().st_size, relative)]
        )
    total = tree_total + sum(carried.values())
    if total > limit:
        problems.append(f"{total / 2**20:.1f} MiB in all, over {limit / 2**20:.0f} MiB")
    return {
        "tree_files": len(tree),
        "tree_bytes": tree_total,
        "carried_bytes": carried,
        "total_bytes": total,
        "limit_bytes": limit,
        "headroom_bytes": limit - total,
        "largest": [{"path": name, "bytes": size} for size, name in sorted(largest, reverse=True)[:8]],
        "problems": problems,
        "ok": not problems,
    }


def format_account(report: dict) -> str:
    mib = 2**20
    lines = [f"working tree: {report['tree_files']} files, {report['tree_bytes'] / mib:.2f} MiB"]
    lines += [f"carried {name}: {size / mib:.2f} MiB" for name, size in report["carried_bytes"].items()]
    lines.append(
        f"in all: {report['total_bytes'] / mib:.2f} MiB of {report['limit_bytes'] / mib:.0f} MiB "
        f"({report['headroom_bytes'] / mib:.2f} MiB to spare)"
    )
    lines.append("largest: " + ", ".join(f"{item['path']} {item['bytes'] / mib:.2f}" for item in report["largest"][:5]))
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)


def requirement_names(requirements_txt: Path) -> list[str]:
    """Distribution names in a requirements file (comments, options and versions dropped)."""
    names = []
    for line in requirements_txt.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(machine.normalize(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


def requirement_coverage(requirements_txt: Path) -> dict[str, str]:
    """ComfyUI requirement -> 'machine', 'carried' or 'left out: why'; 'UNACCOUNTED' for one nobody decided on."""
    carried = {machine.normalize(wheel.name) for wheel in WHEELS}
    left = {machine.normalize(name): why for name, why in LEFT_OUT_REQUIREMENTS.items()}
    coverage = {}
    for name in requirement_names(requirements_txt):
        if machine.on_machine(name):
            coverage[name] = "machine"
        elif name in carried:
            coverage[name] = "carried"
        elif name in left:
            coverage[name] = f"left out: {left[name]}"
        else:
            coverage[name] = "UNACCOUNTED"
    return coverage
