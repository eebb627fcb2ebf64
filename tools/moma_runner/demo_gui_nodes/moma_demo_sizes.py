"""``run.sh --gui --demo`` only: every graph queued on this server is shrunk to the demo's sizes (moma_runner.demo
``shrink_for_demo``: 64x64, 2 steps) so that a click on a CPU gives its (noise) image in under a minute; the
workflow in the browser keeps its own settings. One log line per shrunk run says what changed.

ComfyUI loads this file as a custom node (no nodes: it registers an on-prompt handler, ComfyUI's hook for
editing a queued prompt) from the folder the demo GUI adds with ``--extra-model-paths-config``
(tools/moma_runner/gui.py); a GUI without --demo never loads it.
"""

from __future__ import annotations

import logging

from moma_runner.demo import DEMO_SIZE, DEMO_STEPS, shrink_for_demo
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
log = logging.getLogger("moma.demo")


def shrink_queued_prompt(json_data: dict) -> dict:
    """ComfyUI's on-prompt handler: the body of POST /prompt, its ``prompt`` shrunk in place."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict) and all(
        isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
        for node in prompt.values()
    ):
        changes = shrink_for_demo(prompt)
        if changes:
            log.info(
                "[comfyui-moma] demo: run shrunk for a CPU on the tiny random models (%s); the workflow keeps "
                "its settings, which real models run as saved",
                ", ".join(changes),
            )
    return json_data


PromptServer.instance.add_on_prompt_handler(shrink_queued_prompt)
log.info(
    "[comfyui-moma] demo: queued runs are shrunk to %dx%d pixels and %d steps (see the examples' notes)",
    DEMO_SIZE,
    DEMO_SIZE,
    DEMO_STEPS,
)
