"""ComfyUI-MoMA: MoMA (multimodal LLM adapter) personalisation nodes for SD1.5 models.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node API).
"""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
