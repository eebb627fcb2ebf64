"""The server backend: a running ComfyUI reached over HTTP and its websocket (aiohttp, a ComfyUI dependency).

Everything is asked of the server: its node definitions (``/object_info``, also used to validate the graph
as ComfyUI would, see validation.py), its model lists (``/models/<folder>``), its folders
(``/internal/folder_paths``, for messages); input files are uploaded (``/upload/image``) and the images
downloaded (``/view``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .backend import Backend
from .common import EXIT_FAILED, EXIT_USAGE, RunnerError
from .models import MissingModel, ModelUse, folder_label
from .progress import Progress
from .validation import format_execution_error, format_validation_error, validate_with_object_info

# Suffixes ComfyUI lists in every model folder (folder_paths.supported_pt_extensions, plus the pack's .th and
# .onnx): a required file with another suffix (config.json) shows in a folder's listing only where the folder
# lists every file (models/LLM); where it does not, its presence cannot be seen from outside.
WEIGHT_SUFFIXES = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft", ".th", ".onnx"}
SERVER_DEMO_HINT = (
    "--demo with --server uses the server's own model files under the demo names; to have the "
    "tiny stand-ins there, start the server with `bash scripts/run.sh --gui --demo`."
)


class ServerBackend(Backend):
    """A ComfyUI server (``--server URL``)."""

    device = "server"

    def __init__(self, url: str, output_dir: Path, verbose: bool):
        super().__init__()
        self.url = url.rstrip("/")
        self.output_dir = output_dir
        self.verbose = verbose
        self.object_info: dict[str, Any] = {}
        self.folder_paths: dict[str, list[str]] = {}
        self.model_lists: dict[str, list[str] | None] = {}
        self.uploaded: set[str] = set()

    async def _get(self, session: Any, path: str, missing_ok: bool = False) -> Any:
        async with session.get(self.url + path) as resp:
            if resp.status == 404 and missing_ok:
                return None
            if resp.status != 200:
                raise RunnerError(f"{self.url}{path} answered HTTP {resp.status}.", EXIT_FAILED)
            return await resp.json()

    def _fetch(self, *paths: str) -> list[Any]:
        """GET each path (None where the server answers 404)."""
        import aiohttp

        async def fetch() -> list[Any]:
            async with aiohttp.ClientSession() as session:
                return [await self._get(session, path, missing_ok=True) for path in paths]

        try:
            return asyncio.run(fetch())
        except aiohttp.ClientError as e:
            raise RunnerError(
                f"No ComfyUI server answers at {self.url} ({e}). Start one (bash scripts/run.sh "
                "--gui) or drop --server.",
                EXIT_FAILED,
            ) from None

    def prepare(self) -> None:
        object_info, folder_paths = self._fetch("/object_info", "/internal/folder_paths")
        if not isinstance(object_info, dict):
            raise RunnerError(f"{self.url} does not serve ComfyUI's /object_info: is it a ComfyUI server?", EXIT_FAILED)
        self.object_info, self.folder_paths = object_info, folder_paths or {}

    def load_nodes(self) -> None:
        pass  # the server loaded its nodes when it started

    def provide_demo_models(self, uses: list[ModelUse], builders: dict[str, Callable[[], Path]]) -> None:
        print(f"demo: {SERVER_DEMO_HINT}")

    def load_problems(self) -> Iterator[str]:
        yield "Is the pack installed in the server's custom_nodes/? See the server's console for IMPORT FAILED."

    def known_class_types(self) -> set[str]:
        return set(self.object_info)

    def pack_loaded(self) -> bool | None:
        return None  # not visible from outside

    def _options(self, class_type: str, input_name: str) -> list[str] | None:
        info = self.object_info.get(class_type, {}).get("input", {})
        spec = (info.get("required") or {}).get(input_name) or (info.get("optional") or {}).get(input_name)
        if not spec:
            return None
        if isinstance(spec[0], list):
            return [str(o) for o in spec[0]]
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return [str(o) for o in spec[1].get("options", [])]
        return None

    def model_list(self, folder: str) -> list[str] | None:
        """The files the server lists in a model folder (``/models/<folder>``), None if it has no such folder."""
        if folder not in self.model_lists:
            (listing,) = self._fetch(f"/models/{folder}")
            self.model_lists[folder] = None if listing is None else [str(n).replace("\\", "/") for n in listing]
        return self.model_lists[folder]

    def locate_model(self, use: ModelUse, entry: dict | None) -> MissingModel | None:
        listing = self.model_list(use.folder)
        missing_parts: list[str] = []
        if listing is not None:
            files = set(listing)
            if entry and entry["type"] == "folder":
                inside = {f[len(use.name) + 1 :] for f in files if f.startswith(use.name + "/")}
                lists_everything = any(Path(f).suffix not in WEIGHT_SUFFIXES for f in files)
                visible = [f for f in entry["files"] if lists_everything or Path(f).suffix in WEIGHT_SUFFIXES]
                missing_parts = [f for f in visible if f not in inside]
                if inside and not missing_parts:
                    return None
                if not inside:
                    missing_parts = []
            elif use.name in files:
                return None
        else:  # the server has no such model folder: go by the loader's own choices
            options = self._options(use.class_type, use.input_name)
            if options is not None and use.value in {o.rstrip("/\\") for o in options} and not use.auto_download:
                return None  # (an auto-download node lists files it does not have yet)
        folders = self.folder_paths.get(use.folder) or []
        target_folder = folders[0] if folders else f"models/{use.folder}"
        return MissingModel(
            use, entry, str(Path(target_folder) / use.name), folder_label(target_folder, use.folder), missing_parts
        )

    def input_exists(self, name: str) -> bool:
        return name in self.uploaded or name in (self._options("LoadImage", "image") or [])

    def context_exists(self, name: str) -> bool:
        uploaded = name[: -len(" [input]")] if name.endswith(" [input]") else None
        return uploaded in self.uploaded or name in (self._options("MomaLoadContext", "context_file") or [])

    def input_dir(self) -> str:
        return "the server's input folder"

    def stage_input(self, source: Path) -> str:
        import aiohttp

        if not source.is_file():
            raise RunnerError(f"Input file not found: {source}")

        async def upload() -> str:
            form = aiohttp.FormData()
            form.add_field("image", source.read_bytes(), filename=source.name, content_type="application/octet-stream")
            async with aiohttp.ClientSession() as session:
                async with session.post(self.url + "/upload/image", data=form) as resp:
                    if resp.status != 200:
                        raise RunnerError(f"Upload of {source} failed: HTTP {resp.status}", EXIT_FAILED)
                    body = await resp.json()
            sub = body.get("subfolder") or ""
            return f"{sub}/{body['name']}" if sub else body["name"]

        name = asyncio.run(upload())
        self.uploaded.add(name)
        return name

    def set_output_dir(self, output: Path) -> None:
        self.output_dir = output

    def validate(self, prompt: dict) -> list[str]:
        """ComfyUI's validation rules applied to the server's /object_info (validation.py)."""
        if self.uploaded:  # the input-file choices now include the uploads
            (self.object_info,) = self._fetch("/object_info")
        ok, error, outputs, node_errors = validate_with_object_info(prompt, self.object_info)
        if not ok or node_errors:
            raise RunnerError(format_validation_error(error, node_errors, prompt), EXIT_USAGE)
        return outputs

    def run(self, prompt: dict, progress: Progress) -> list[Path]:
        self.validate(prompt)
        return asyncio.run(self._run(prompt, progress))

    async def _run(self, prompt: dict, progress: Progress) -> list[Path]:
        import aiohttp

        client_id = f"moma-runner-{uuid.uuid4().hex[:8]}"
        error_message: str | None = None
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                async with session.post(self.url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise RunnerError(
                            format_validation_error(body.get("error", {}), body.get("node_errors", {}), prompt),
                            EXIT_USAGE,
                        )
                prompt_id = body["prompt_id"]
                if body.get("node_errors"):  # queued, but ComfyUI skips the failing outputs: stop it
                    async with session.post(self.url + "/queue", json={"delete": [prompt_id]}):
                        pass
                    async with session.post(self.url + "/interrupt", json={"prompt_id": prompt_id}):
                        pass
                    raise RunnerError(format_validation_error(None, body["node_errors"], prompt), EXIT_USAGE)
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        continue  # previews
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RunnerError("The server closed the websocket before the workflow finished.", EXIT_FAILED)
                    message = json.loads(msg.data)
                    data = message.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    kind = message.get("type")
                    if kind == "executing":
                        if data.get("node") is None and data.get("prompt_id") == prompt_id:
                            break
                        progress.node(data.get("node"))
                    elif kind == "execution_cached":
                        progress.cached_nodes(data.get("nodes") or [])
                    elif kind == "progress":
                        progress.step(data.get("value", 0), data.get("max", 1))
                    elif kind in ("execution_error", "execution_interrupted"):
                        error_message = format_execution_error([(kind, data)], self.verbose)
                        break
                    elif kind == "execution_success":
                        break
            if error_message:
                raise RunnerError(error_message, EXIT_FAILED)
            history: dict = {}
            for _ in range(100):  # the history entry lands just after the last message
                history = await self._get(session, f"/history/{prompt_id}")
                if prompt_id in history:
                    break
                await asyncio.sleep(0.1)
            entry = history.get(prompt_id, {})
            status = entry.get("status", {})
            if status.get("status_str") not in (None, "success"):
                raise RunnerError(format_execution_error(status.get("messages", []), self.verbose), EXIT_FAILED)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            paths: list[Path] = []
            for node_output in entry.get("outputs", {}).values():
                for saved in node_output.get("moma_context", []):
                    self.saved_files.append(
                        f"{saved.get('subfolder', '')}/{saved['filename']} (server's output folder)"
                    )
                for image in node_output.get("images", []):
                    if image.get("type") != "output":
                        continue
                    params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"}
                    async with session.get(self.url + "/view", params=params) as resp:
                        if resp.status != 200:
                            raise RunnerError(f"Could not fetch {image['filename']}: HTTP {resp.status}", EXIT_FAILED)
                        target = self.output_dir / image["filename"]
                        target.write_bytes(await resp.read())
                        paths.append(target)
        return paths
