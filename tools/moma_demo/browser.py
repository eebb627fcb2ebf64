"""Drive ComfyUI's own web app in headless Chromium over the DevTools protocol (used by the tests and by
scripts/make_pictures.py): load UI workflows, read what the app exports and saves, take screenshots."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator


class FrontendError(RuntimeError):
    """Chromium or the web app did not do what was asked."""


def chromium() -> str | None:
    """The Chromium executable, if installed: $MOMA_CHROMIUM when set (e.g. a Chrome), else chromium or chromium-browser."""
    if os.environ.get("MOMA_CHROMIUM"):
        return shutil.which(os.environ["MOMA_CHROMIUM"])
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def headless_chromium(url: str, debug_port: int, profile: Path, size: tuple[int, int] = (1600, 1000)) -> Iterator[None]:
    """Chromium showing ``url`` with its debugging port open, stopped on exit."""
    executable = chromium()
    if executable is None:
        raise FrontendError("Chromium is not installed (apt-get install chromium).")
    browser = subprocess.Popen(
        [executable, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--hide-scrollbars", f"--remote-debugging-port={debug_port}", f"--window-size={size[0]},{size[1]}", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(profile)})
    try:
        yield
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()


async def frontend_round_trip(page_url: str, debug_port: int, workflows: dict[str, dict],
                              screenshots: dict[str, Path] | None = None) -> dict[str, dict]:
    """Load each UI workflow in the web app (app.loadGraphData); return, per name, what it exports for the
    server (graphToPrompt: ``api``) and what it saves (graph.serialize: ``saved``). ``screenshots`` maps a
    name to a PNG path: the window is captured after that workflow is loaded and fitted to the view."""
    import aiohttp

    screenshots = screenshots or {}
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{debug_port}/json") as response:
                    pages = [page for page in await response.json() if page["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise FrontendError("Chromium did not open its debugging port")
            await asyncio.sleep(0.5)
        async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            calls = iter(range(1, 1_000_000))

            async def call(method: str, params: dict) -> dict:
                number = next(calls)
                await ws.send_json({"id": number, "method": method, "params": params})
                while True:
                    message = await ws.receive_json(timeout=120)
                    if message.get("id") == number:
                        if "error" in message:
                            raise FrontendError(f"{method}: {message['error']}")
                        return message["result"]

            async def evaluate(expression: str) -> Any:
                result = await call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                         "returnByValue": True})
                if "exceptionDetails" in result:
                    raise FrontendError(json.dumps(result["exceptionDetails"])[:2000])
                return result["result"].get("value")

            deadline = time.monotonic() + 120
            while not await evaluate("!!(window.app && window.app.graph && window.app.canvas)"):
                if time.monotonic() > deadline:
                    raise FrontendError(f"the web app at {page_url} did not start")
                await asyncio.sleep(1)
            await asyncio.sleep(2)  # node definitions and extensions finish registering
            if screenshots:  # first-run dialogs (the template browser) would cover the graph
                await evaluate("""(async () => {
                    for (let i = 0; i < 5; i++) {
                        document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
                        await new Promise(resolve => setTimeout(resolve, 500));
                    }
                    return true;
                })()""")
            results = {}
            for name, workflow in workflows.items():
                results[name] = json.loads(await evaluate(f"""(async () => {{
                    await window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)});
                    await new Promise(resolve => setTimeout(resolve, 1000));
                    const prompt = await window.app.graphToPrompt();
                    return JSON.stringify({{api: prompt.output, saved: window.app.graph.serialize()}});
                }})()"""))
                if name in screenshots:
                    await evaluate("""(async () => {
                        const canvas = window.app.canvas;
                        if (canvas.fitViewToSelectionAnimated) { canvas.selectItems(); canvas.fitViewToSelectionAnimated({duration: 1}); canvas.deselectAll(); }
                        else if (canvas.ds && canvas.ds.fitToBounds) { canvas.ds.fitToBounds(window.app.graph.boundingRect ?? [0, 0, 2000, 1000]); }
                        canvas.setDirty(true, true);
                        await new Promise(resolve => setTimeout(resolve, 1200));
                        return true;
                    })()""")
                    shot = await call("Page.captureScreenshot", {"format": "png"})
                    screenshots[name].parent.mkdir(parents=True, exist_ok=True)
                    screenshots[name].write_bytes(base64.b64decode(shot["data"]))
            return results
