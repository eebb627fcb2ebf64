#!/usr/bin/env python3
"""Click-to-image time of each example workflow in ``bash scripts/run.sh --gui --demo`` (issue 25).

    .host/comfyui-0.30/venv/bin/python benchmarks/gui_demo.py [--examples moma_context ...] [--cap SECONDS]
                                                 [--base-dir DIR] [--keep-log PATH]

Starts the demo GUI server as the README's command does (``scripts/run_workflow.py --gui --demo --cpu``, on a
free port, in a fresh base directory unless ``--base-dir``), then queues each example as the web app's Queue
button does: its API twin (workflows/api/<name>.json, exactly what the frontend exports for the UI file; a test
checks that) posted to ``/prompt``, followed over the websocket until the prompt's image is saved. Reports, per
example: seconds from the post to the end of the run, the sampler steps run and the seconds per step; the
first example also pays for loading the models (a real first click does too). ``moma_saved_context`` loads
what ``moma_context`` saved, so it runs after it. An example still running after ``--cap`` seconds (default
900) is interrupted and its time estimated from its step rate (marked ``~``). The server's log is printed
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "workflows" / "api"
ORDER = ["moma_context", "moma_saved_context", "moma_texture", "moma_two_subjects", "moma_community_lora"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 900) -> float:
    started = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=2)
            return time.monotonic() - started
        except OSError:
            if server.poll() is not None:
                sys.exit("the GUI server stopped:\n" + log.read_text())
            if time.monotonic() - started > timeout:
                sys.exit("the GUI server did not start:\n" + log.read_text())
            time.sleep(0.5)


async def click(url: str, prompt: dict, cap: float) -> dict:
    """Queue ``prompt`` as the web app does and follow it; the run's times."""
    import aiohttp

    client_id = uuid.uuid4().hex
    steps: list[float] = []
    total_steps = 0
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}", max_msg_size=0) as ws:
            started = time.monotonic()
            async with session.post(url + "/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                answer = await response.json()
                if response.status != 200:
                    return {"error": json.dumps(answer)[:2000]}
            prompt_id = answer["prompt_id"]
            while True:
                remaining = cap - (time.monotonic() - started)
                if remaining <= 0:
                    await session.post(url + "/interrupt", json={"prompt_id": prompt_id})
                    if len(steps) < 2:
                        return {"error": f"fewer than 2 sampler steps in {cap:.0f}s"}
                    per_step = (steps[-1] - steps[0]) / (len(steps) - 1)
                    estimate = steps[0] + per_step * (total_steps - 1)
                    return {"seconds": estimate, "estimated": True, "steps": total_steps, "per_step": per_step}
                try:
                    message = await ws.receive(timeout=min(remaining, 30))
                except asyncio.TimeoutError:
                    continue
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if event["type"] == "progress" and data.get("max", 0) > 1:
                    if data["value"] == 1:
                        steps, total_steps = [], data["max"]
                    steps.append(time.monotonic() - started)
                elif event["type"] == "execution_error":
                    return {"error": f"{data.get('node_type')}: {data.get('exception_message')}"}
                elif event["type"] in ("execution_success", "execution_interrupted") or (
                    event["type"] == "executing" and data.get("node") is None and "prompt_id" in data
                ):
                    seconds = time.monotonic() - started
                    per_step = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
                    return {"seconds": seconds, "estimated": False, "steps": total_steps, "per_step": per_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", nargs="+", default=ORDER, choices=ORDER)
    parser.add_argument("--cap", type=float, default=900, help="interrupt a run after this many seconds")
    parser.add_argument("--base-dir", type=Path, help="the demo base directory (default: a fresh temporary one)")
    parser.add_argument("--keep-log", type=Path, help="copy the server's log here")
    args = parser.parse_args()
    examples = [name for name in ORDER if name in args.examples]
    with tempfile.TemporaryDirectory(prefix="moma-gui-demo-") as tmp:
        base = args.base_dir or Path(tmp) / "base"
        log = Path(tmp) / "gui.log"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "w") as handle:
            server = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "scripts" / "run_workflow.py"),
                    "--gui",
                    "--demo",
                    "--cpu",
                    "--port",
                    str(port),
                    "--base-dir",
                    str(base),
                ],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            print(
                f"server up in {wait_for_server(url, server, log):.0f}s (demo models built or cached, ComfyUI started)",
                flush=True,
            )
            results = {}
            for name in examples:
                prompt = json.loads((API_DIR / f"{name}.json").read_text())
                results[name] = asyncio.run(click(url, prompt, args.cap))
                print(f"{name}: {results[name]}", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        print("\nexample                  click-to-image   sampler steps   s/step")
        for name, result in results.items():
            if "error" in result:
                print(f"{name:24} failed: {result['error']}")
                continue
            mark = "~" if result["estimated"] else " "
            print(
                f"{name:24} {mark}{result['seconds']:8.1f} s      {result['steps']:5d}        {result['per_step']:6.2f}"
            )
        text = log.read_text()
        print("\n--- the server's log ---\n" + text)
        if args.keep_log:
            args.keep_log.write_text(text)
        return 0 if all("error" not in result for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
