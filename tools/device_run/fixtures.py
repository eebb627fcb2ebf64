"""Write the tests' real-format model fixtures into the fixture cache (``MOMA_FIXTURE_CACHE``): on the lent machine
they are made there, not carried (the full-layout SD1.5 alone is 2 GB).

    PYTHONPATH=tools python3 -m device_run.fixtures [--json out.json]

The SD1.5 writer builds ComfyUI's own modules, so ComfyUI (``MOMA_HOST_DIR``/ComfyUI) is imported first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

# fixture name -> (cache entry, writer module in tools/moma_demo, writer function): tests/conftest.py's FIXTURE_FILES
# (a test checks the two agree).
FIXTURES = {
    "sd15_checkpoint": ("moma_test_sd15.safetensors", "sd15", "write_sd15_checkpoint"),
    "llava_dir": ("MoMA_llava_7b", "llava", "write_llava_folder"),
    "clip_vision_dir": ("clip-vit-large-patch14-336", "clip_vision", "write_clip_vision_folder"),
    "adapter_file": ("attn_adapters_projectors.th", "adapter", "write_adapter_th"),
    "test_images": ("images", "images", "write_test_images"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write each fixture's path, size and seconds here")
    args = parser.parse_args(argv)

    from moma_runner import boot
    from moma_runner.common import host_dir

    boot.configure(host_dir() / "ComfyUI", Path(tempfile.mkdtemp(prefix="moma-fixtures-base-")), cpu=True)
    import moma_demo

    print(f"fixture cache: {moma_demo.cache_root()}", flush=True)
    report = {}
    for name, (entry, module, function) in FIXTURES.items():
        start = time.perf_counter()
        writer = getattr(importlib.import_module(f"moma_demo.{module}"), function)
        path = moma_demo.cached(entry, writer)
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        report[name] = {
            "path": str(path),
            "mb": round(size / 2**20, 1),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"  {name}: {report[name]['mb']} MB in {report[name]['seconds']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
