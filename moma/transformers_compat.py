"""Where transformers 4 and 5 differ for this pack, in one place. Both are tested: CI's default host runs the newest
transformers 5, its oldest-supported host 4.50.3 (the pack's floor, ComfyUI's own). Each difference is detected
from what the installed transformers has, never from its version string.

- Image processors: 5.x has a PIL backend class (``CLIPImageProcessorPil``) beside a torchvision default; 4.x's
  ``CLIPImageProcessor`` is the PIL one. The reference (transformers 4.37) resized with PIL, so PIL is the exact one.
- ``CLIPVisionModel``: 4.x nests the vision transformer as ``.vision_model``; 5.x holds its parts directly.

(What differs in the files each version writes, e.g. a vision-only CLIP saved by 5.x without the
``vision_model.`` prefix, is handled where the files are read: ``moma.clip_vision``.)
"""

from __future__ import annotations

from typing import Any


def clip_image_processor_class() -> type:
    """The PIL-backed CLIP image processor class of the installed transformers."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class  # 5.x
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class  # 4.x: PIL-based
    return processor_class


def vision_transformer_prefix(model: Any) -> str:
    """The prefix of the vision transformer's parameter names in a ``CLIPVisionModel``: ``vision_model.`` (4.x) or
    nothing (5.x)."""
    return "vision_model." if any(name.startswith("vision_model.") for name, _ in model.named_parameters()) else ""
