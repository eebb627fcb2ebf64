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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any


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
        [
            executable,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--remote-debugging-port={debug_port}",
            f"--window-size={size[0]},{size[1]}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(profile)},
    )
    try:
        yield
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()


class DevTools:
    """One page of a headless Chromium, driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.calls = iter(range(1, 1_000_000))

    async def call(self, method: str, params: dict) -> dict:
        number = next(self.calls)
        await self.ws.send_json({"id": number, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == number:
                if "error" in message:
                    raise FrontendError(f"{method}: {message['error']}")
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
        )
        if "exceptionDetails" in result:
            raise FrontendError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def screenshot(self, target: Path) -> None:
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def web_app(page_url: str, debug_port: int, close_dialogs: bool = False) -> AsyncIterator[DevTools]:
    """The web app open in the Chromium of ``headless_chromium``, once it has started (first-run dialogs closed
    when asked: they would cover the graph in screenshots)."""
    import aiohttp

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
            page = DevTools(ws)
            deadline = time.monotonic() + 120
            while not await page.evaluate("!!(window.app && window.app.graph && window.app.canvas)"):
                if time.monotonic() > deadline:
                    raise FrontendError(f"the web app at {page_url} did not start")
                await asyncio.sleep(1)
            await asyncio.sleep(2)  # node definitions and extensions finish registering
            if close_dialogs:
                await page.evaluate("""(async () => {
                    for (let i = 0; i < 5; i++) {
                        document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click());
                        await new Promise(resolve => setTimeout(resolve, 500));
                    }
                    return true;
                })()""")
            yield page


async def frontend_round_trip(
    page_url: str, debug_port: int, workflows: dict[str, dict], screenshots: dict[str, Path] | None = None
) -> dict[str, dict]:
    """Load each UI workflow in the web app (app.loadGraphData); return, per name, what it exports for the
    server (graphToPrompt: ``api``) and what it saves (graph.serialize: ``saved``). ``screenshots`` maps a
    name to a PNG path: the window is captured after that workflow is loaded and fitted to the view."""
    screenshots = screenshots or {}
    async with web_app(page_url, debug_port, close_dialogs=bool(screenshots)) as page:
        results = {}
        for name, workflow in workflows.items():
            results[name] = json.loads(
                await page.evaluate(f"""(async () => {{
                await window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)});
                await new Promise(resolve => setTimeout(resolve, 1000));
                const prompt = await window.app.graphToPrompt();
                return JSON.stringify({{api: prompt.output, saved: window.app.graph.serialize()}});
            }})()""")
            )
            if name in screenshots:
                await page.evaluate("""(async () => {
                    const canvas = window.app.canvas;
                    if (canvas.fitViewToSelectionAnimated) { canvas.selectItems(); canvas.fitViewToSelectionAnimated({duration: 1}); canvas.deselectAll(); }
                    else if (canvas.ds && canvas.ds.fitToBounds) { canvas.ds.fitToBounds(window.app.graph.boundingRect ?? [0, 0, 2000, 1000]); }
                    canvas.setDirty(true, true);
                    await new Promise(resolve => setTimeout(resolve, 1200));
                    return true;
                })()""")
                await page.screenshot(screenshots[name])
        return results


async def node_titles_and_help(
    page_url: str,
    debug_port: int,
    workflow: dict,
    node_type: str,
    screenshots: dict[str, Path] | None = None,
    focus: list[str] = (),
) -> dict[str, Any]:
    """What the web app shows, in its current language, for ``workflow``'s nodes and for ``node_type``'s help page.

    Returns ``titles`` (node type -> the title drawn; nodes the workflow titles itself left out), ``inputs`` (node
    type -> input name -> its label), ``python_module`` of ``node_type``, ``frontend`` (its version) and ``help``: the
    text of its help page as the app renders it: the right side panel's Info tab for the selected node (frontend
    1.4x), or the node library's help page (older frontends). ``screenshots``: ``titles`` (the nodes of the types in ``focus`` fitted to
    the window) and ``help`` -> PNG paths."""
    screenshots = screenshots or {}
    async with web_app(page_url, debug_port, close_dialogs=True) as page:
        shown = json.loads(
            await page.evaluate(f"""(async () => {{
            await window.app.loadGraphData({json.dumps(workflow)}, true, true, "help-check");
            await new Promise(resolve => setTimeout(resolve, 1000));
            const titles = {{}}, inputs = {{}};
            for (const node of window.app.graph.nodes) {{
                if (node.title !== node.constructor.title) continue;  // titled by the workflow itself
                titles[node.type] = node.title;
                inputs[node.type] = Object.fromEntries([...(node.inputs || []), ...(node.widgets || [])]
                    .map(slot => [slot.name, slot.localized_name || slot.label || slot.name]));
            }}
            return JSON.stringify({{titles, inputs}});
        }})()""")
        )
        if "titles" in screenshots:
            await page.evaluate(f"""(async () => {{
                const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
                const panel = pinia._s.get('rightSidePanel');
                if (panel && panel.closePanel) panel.closePanel();
                await new Promise(resolve => setTimeout(resolve, 300));
                const canvas = window.app.canvas;
                const nodes = window.app.graph.nodes.filter(node => {json.dumps(list(focus))}.includes(node.type));
                if (canvas.fitViewToSelectionAnimated) {{ canvas.selectItems(nodes); canvas.fitViewToSelectionAnimated({{duration: 1}}); canvas.deselectAll(); }}
                canvas.setDirty(true, true);
                await new Promise(resolve => setTimeout(resolve, 1200));
                return true;
            }})()""")
            await page.screenshot(screenshots["titles"])
        help_page = json.loads(
            await page.evaluate(f"""(async () => {{
            const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
            const node = window.app.graph.nodes.find(node => node.type === {json.dumps(node_type)});
            const definition = pinia._s.get('nodeDef').nodeDefsByName[{json.dumps(node_type)}];
            const panel = pinia._s.get('rightSidePanel');
            let where;
            if (panel && panel.openPanel) {{
                window.app.canvas.deselectAll();
                window.app.canvas.selectNode(node);
                await new Promise(resolve => setTimeout(resolve, 500));
                panel.openPanel('info');
                where = 'right side panel, Info';
            }} else {{
                await window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
                await new Promise(resolve => setTimeout(resolve, 800));
                const help = pinia._s.get('nodeHelp');
                help.openHelp(definition);
                where = 'node library';
            }}
            let text = '';
            for (let i = 0; i < 40 && !text; i++) {{
                await new Promise(resolve => setTimeout(resolve, 250));
                const content = document.querySelector('.node-help-content');
                text = content && !content.querySelector('.fallback-content') ? content.innerText : '';
            }}
            return JSON.stringify({{text, where, python_module: definition.python_module,
                                   frontend: window.__COMFYUI_FRONTEND_VERSION__}});
        }})()""")
        )
        if "help" in screenshots:
            await asyncio.sleep(1)  # the page's pictures
            await page.screenshot(screenshots["help"])
        return {
            **shown,
            "help": help_page["text"],
            "help_shown_in": help_page["where"],
            "python_module": help_page["python_module"],
            "frontend": help_page["frontend"],
        }
