"""Hostile workflows through ComfyUI's HTTP API on a real server: ``run_workflow.py --gui --demo`` (ComfyUI's
main.py with the pack and the demo models on 127.0.0.1), as a stranger's script would post them.

Python's JSON accepts ``NaN`` and ``Infinity``, so a posted workflow can carry them where a FLOAT goes; ComfyUI
turns the string ``"nan"`` into NaN too; a text can be a megabyte; the folders ``/object_info`` lists can hold
files nobody chose. Each case is the example workflow ``workflows/api/moma_context.json`` with one such change
and only the outputs that depend on it, so the server refuses it at validation: nothing is sampled. The pytest
process imports neither ComfyUI nor torch (scripts/test.sh's second run; tests/conftest.py ``PROCESS_MODULES``).
"""

from __future__ import annotations

import array
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import host  # noqa: F401  (puts tools/ on sys.path)
import pytest
from moma_runner import workflow as graph

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "scripts" / "run_workflow.py"
EXAMPLE = REPO / "workflows" / "api" / "moma_context.json"
SECONDS = 120  # per request: a linear check of a megabyte takes milliseconds
MEGABYTE = 1 << 20


class Server:
    """The GUI server of the runner (what ``bash scripts/run.sh --gui --demo`` starts) on a free port."""

    def __init__(self, base: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = base
        self.log = base.parent / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(RUNNER),
                    "--gui",
                    "--demo",
                    "--cpu",
                    "--port",
                    str(self.port),
                    "--base-dir",
                    str(base),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "the server did not start:\n" + self.log.read_text()
                time.sleep(0.5)

    def request(self, path: str, body: bytes | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=SECONDS) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        # json.dumps writes NaN / Infinity / -Infinity literals, as a hostile client may
        return self.request("/prompt", json.dumps({"prompt": prompt, "client_id": "hostile"}).encode())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _context_file(subject: str) -> bytes:
    """A MoMA context .safetensors (zero tokens) written without torch: header JSON, then the float32 data."""
    shapes = {"cond_tokens": [1, 4, 768], "uncond_tokens": [1, 4, 768], "llava_emb": [1, 1024]}
    header: dict = {
        "__metadata__": {
            "format": "moma-context",
            "version": "1",
            "subject": subject,
            "prompt": "x",
            "sd_prompt": f"photo of a {subject}. x",
        }
    }
    data, offset = b"", 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        data += array.array("f", [0.0]).tobytes() * (size // 4)
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def _odd_files(base: Path) -> list[str]:
    """Files nobody chose in the folders the server lists; their names."""
    inputs, llm = base / "input", base / "models" / "LLM"
    for name, header in (
        ("odd_list_header.safetensors", b"[1, 2]"),
        ("odd_deep_header.safetensors", b"[" * 50_000 + b"]" * 50_000),
    ):
        (inputs / name).write_bytes(struct.pack("<Q", len(header)) + header)
    os.mkfifo(inputs / "odd_fifo.safetensors")
    (inputs / "odd_broken_link.safetensors").symlink_to(inputs / "nowhere.safetensors")
    (inputs / "odd_loop").symlink_to(inputs, target_is_directory=True)
    (llm / "odd_loop").symlink_to(llm, target_is_directory=True)
    (inputs / "good_context.safetensors").write_bytes(_context_file("car"))
    return ["odd_list_header", "odd_deep_header", "odd_fifo", "odd_broken_link"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-server").resolve()
    (root / "base" / "input").mkdir(parents=True)
    (root / "base" / "models" / "LLM").mkdir(parents=True)
    odd = _odd_files(root / "base")  # there before the server starts, as a user's leftovers would be
    server = Server(root / "base")
    server.odd = odd
    try:
        yield server
    finally:
        server.close()


def _only_outputs_needing(prompt: dict, node: str) -> dict:
    """``prompt`` without the output nodes that do not depend on ``node`` (those would validate and run)."""

    def depends(node_id: str, seen: set) -> bool:
        if node_id == node:
            return True
        seen.add(node_id)
        return any(
            isinstance(value, list) and value[0] not in seen and depends(value[0], seen)
            for value in prompt[node_id]["inputs"].values()
        )

    outputs = {"SaveImage", "PreviewImage", "MomaSaveContext"}
    return {key: value for key, value in prompt.items() if value["class_type"] not in outputs or depends(key, set())}


def _hostile(class_type: str, **inputs) -> tuple[dict, str]:
    prompt = graph.load_workflow(EXAMPLE)
    (node,) = graph.ids_of(prompt, class_type)
    prompt[node]["inputs"].update(inputs)
    return _only_outputs_needing(prompt, node), node


@pytest.mark.parametrize(
    "class_type,inputs,expected",
    [
        ("MomaApply", {"start_percent": math.nan}, "start_percent: nan is not a finite number; give a number in 0..1."),
        ("MomaApply", {"context_strength": math.inf}, "context_strength: inf is not a finite number"),
        ("MomaApply", {"object_end_percent": -math.inf}, "object_end_percent: -inf is not a finite number"),
        ("MomaApply", {"object_start_percent": "nan"}, "object_start_percent: nan is not a finite number"),
        ("MomaApply", {"preset": "custom", "strength": "NaN"}, "strength: nan is not a finite number"),
        ("MomaObjectMasker", {"threshold": math.nan}, "threshold: nan is not a finite number"),
        (
            "MomaApply",
            {"block_weights": "input" + " " * MEGABYTE + "= 1"},
            "block_weights: 'input     ",
        ),  # ... (1,048,581 characters) is longer than the 2,048 characters
        ("MomaContextEncoder", {"prompt": "autumn " * (MEGABYTE // 7)}, "is longer than the 8,192 characters"),
        ("MomaSaveContext", {"filename_prefix": "moma/" + "n" * 300 + "/context"}, "has a part of 300 bytes"),
        ("MomaLoader", {"adapter_name": "absent.th"}, "adapter_name: MoMA adapter 'absent.th' not found in"),
    ],
    ids=[
        "nan-literal",
        "infinity-literal",
        "minus-infinity",
        "nan-string",
        "nan-string-custom-strength",
        "masker-nan",
        "block-weights-megabyte",
        "prompt-megabyte",
        "save-prefix-too-long",
        "adapter-missing-once",
    ],
)
def test_the_server_refuses_the_workflow_with_one_clear_error(server, class_type, inputs, expected) -> None:
    prompt, node = _hostile(class_type, **inputs)
    status, body = server.post_prompt(prompt)
    assert status == 400, (status, str(body)[:2000])
    errors = body["node_errors"][node]["errors"]
    assert len(errors) == 1, errors  # once, not under every input the node checks
    assert expected in errors[0]["details"], errors[0]
    assert len(json.dumps(body)) < 20_000  # a megabyte is never echoed back
    assert set(body["node_errors"]) == {node}, list(body["node_errors"])  # nothing else in the workflow is wrong


def test_object_info_lists_every_node_despite_odd_files(server) -> None:
    status, info = server.request("/object_info")
    assert status == 200
    assert {"MomaLoader", "MomaLoadContext", "MomaApply"} <= set(info)
    contexts = info["MomaLoadContext"]["input"]["required"]["context_file"][1]["options"]
    assert contexts == ["good_context.safetensors [input]"], contexts
    llava = info["MomaLoader"]["input"]["required"]["llava_name"][1]["options"]
    assert not any("odd_loop" in name for name in llava), llava
    status, again = server.request("/object_info/MomaLoadContext")
    assert status == 200 and again["MomaLoadContext"]["input"]["required"]["context_file"][1]["options"] == contexts
    log = server.log.read_text()
    for name in server.odd:  # one line each, however often the lists are built
        assert log.count(f"{name}.safetensors skipped in the context list") == 1, (name, log[-3000:])
    assert "Traceback" not in log


def test_choosing_an_odd_file_is_a_clear_error(server) -> None:
    prompt = graph.load_workflow(REPO / "workflows" / "api" / "moma_saved_context.json")
    (node,) = graph.ids_of(prompt, "MomaLoadContext")
    for context_file, expected in (
        ("odd_list_header.safetensors [input]", "its header is not a JSON object"),
        ("odd_deep_header.safetensors [input]", "is not a readable .safetensors file"),
        ("odd_fifo.safetensors [input]", "not found"),
    ):
        prompt[node]["inputs"].update(context_file=context_file, path="")
        status, body = server.post_prompt(_only_outputs_needing(prompt, node))
        assert status == 400, (status, body)
        errors = body["node_errors"][node]["errors"]
        assert len(errors) == 1 and expected in errors[0]["details"], errors
