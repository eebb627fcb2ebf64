"""Run ComfyUI's own ``main.py`` (the web UI and its API) in this process, for ``--gui``.

    python -m moma_runner.comfy_main COMFY_ROOT [ComfyUI's main.py arguments...]

The differences from ``python main.py`` are in the log only, through logging filters and levels (nothing of
ComfyUI is replaced): where the host leaves out a dependency on purpose, the import failure of the core node
file that needs it is replaced by one line saying so; the database migrations ComfyUI runs on its first start
in a base directory (alembic's plugin, context and revision lines) and its list of comfy-kitchen kernel
backends are left out. Every warning and error, and the rest of ComfyUI's log, passes unchanged. Start it
with ``tools/`` as the working directory and on sys.path, never the pack's root (whose nodes/ would shadow
ComfyUI's nodes.py).
"""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

# core node file -> (module it needs, why it is absent): scripts/setup_host.sh leaves these out
ABSENT_ON_PURPOSE = {
    "nodes_glsl.py": (
        "comfy_angle",
        "ComfyUI's GLSL shader node needs comfy-angle and PyOpenGL (OpenGL ES "
        "libraries), which the host does not install; that one node is absent",
    ),
}


# Loggers whose INFO lines describe internals nobody acts on: shown from WARNING up.
QUIET_LOGGERS = ("alembic",)  # the database migrations (plugin set-up, SQLite context, each revision's text)
# ComfyUI's own INFO lines of the same kind (logged on the root logger), by how they start.
QUIET_PREFIXES = ("Found comfy_kitchen backend ", "Database upgraded from ")


class QuietInternals(logging.Filter):
    """Drops the root logger's INFO (and lower) records that start with one of ``QUIET_PREFIXES``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.getMessage().startswith(QUIET_PREFIXES)


class KnownAbsentNodes(logging.Filter):
    """Drops ComfyUI's warnings about the node files of ``ABSENT_ON_PURPOSE`` (and their block's header and
    advice when no other file failed); logs the reason once instead."""

    def __init__(self) -> None:
        super().__init__()
        self.header: logging.LogRecord | None = None  # "some comfy_extras/ nodes did not import correctly"
        self.other_failures = False
        self.explained: set[str] = set()

    def _explain(self, name: str) -> None:
        if name not in self.explained:
            self.explained.add(name)
            logging.getLogger("moma").info("[comfyui-moma] %s.", ABSENT_ON_PURPOSE[name][1])

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(
            f"No module named '{module}'" in text and name in text for name, (module, _why) in ABSENT_ON_PURPOSE.items()
        ):
            return False  # the traceback record and "Cannot import .../nodes_glsl.py module ..."
        if "nodes did not import correctly" in text:
            self.header, self.other_failures = record, False
            return False  # held until the lines after it say which files failed
        if self.header is None:
            return True
        if text.startswith("IMPORT FAILED: "):
            name = text[len("IMPORT FAILED: ") :].strip()
            if name in ABSENT_ON_PURPOSE:
                self._explain(name)
                return False
            if not self.other_failures:
                self.other_failures = True
                for handler in logging.getLogger().handlers:  # the held header, ahead of this line
                    if self.header.levelno >= handler.level:
                        handler.handle(self.header)
            return True
        if text == "":  # the block's last line
            self.header = None
        return self.other_failures  # the block's advice: only when something else failed too


def main(argv: list[str]) -> None:
    comfy_root = Path(argv[0]).resolve()
    sys.argv = [str(comfy_root / "main.py"), *argv[1:]]
    sys.path.insert(0, str(comfy_root))
    logging.getLogger().addFilter(KnownAbsentNodes())
    logging.getLogger().addFilter(QuietInternals())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    runpy.run_path(str(comfy_root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
