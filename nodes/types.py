"""Custom ComfyUI socket types of the pack (objects passed by reference between nodes)."""

from .node_api import io

MomaModel = io.Custom("MOMA_MODEL")  # moma.model.MomaModel: adapter weights + how to load LLaVA/CLIP
MomaContext = io.Custom("MOMA_CONTEXT")  # moma context: 4 cond + 4 uncond tokens, subject, prompts
MomaRef = io.Custom("MOMA_REF")  # moma.reference.ReferenceBank: object keys/values per attn1 layer
