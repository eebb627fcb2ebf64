"""The ComfyUI node API the pack is written against, named in this one place.

``comfy_api.v0_0_2`` is the newest versioned V3 API present in every supported ComfyUI (0.3.75 and later);
``comfy_api.latest`` moves with each ComfyUI release. Moving the pack to another API version is this import.
"""

from comfy_api.v0_0_2 import ComfyExtension, io

API_VERSION = "v0_0_2"

__all__ = ["API_VERSION", "ComfyExtension", "io"]
