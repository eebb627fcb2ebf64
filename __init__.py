"""ComfyUI-MoMA: MoMA (multimodal LLM adapter) personalisation nodes for SD1.5 models.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (V3 node API). ``WEB_DIRECTORY`` is
served under /extensions/<this folder's name>/: the node library's help pages (web/docs/<NodeId>.md, and
<NodeId>/zh.md). Node names and tooltips in other languages come from locales/, which ComfyUI reads itself.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
