"""ComfyUI nodes of the pack: thin adapters from ComfyUI types to ``moma`` calls."""

from __future__ import annotations

from . import (
    host_contract,
    paths,  # noqa: F401  (registers the pack's model folders with folder_paths)
)
from .apply import MomaApply
from .context import MomaContextEncoder, MomaLoadContext, MomaSaveContext
from .feature_grab import MomaFeatureGrab
from .loader import MomaLoader
from .masker import MomaObjectMasker
from .node_api import ComfyExtension, io
from .preview import MomaSubjectMaskPreview
from .text_encode import MomaTextEncode

host_contract.check_host()  # once, when ComfyUI loads the pack: one log line if a hook it relies on is gone

NODES: list[type[io.ComfyNode]] = [
    MomaLoader,
    MomaContextEncoder,
    MomaSaveContext,
    MomaLoadContext,
    MomaObjectMasker,
    MomaFeatureGrab,
    MomaTextEncode,
    MomaApply,
    MomaSubjectMaskPreview,
]


class MomaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MomaExtension:
    """Called by ComfyUI's custom-node loader."""
    return MomaExtension()
