"""MOMA_MODEL: the adapter weights (loaded eagerly, ~150 MB) plus where and how to load LLaVA (lazily)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .clip_vision import CLIP_WHERE_TO_GET
from .context import MomaContext
from .convert import preferred_adapter_file
from .errors import MomaError
from .images import llava_pixel_values, load_clip_image_processor
from .llava import (
    PRECISIONS,
    QUANTIZATIONS,
    InterruptFn,
    LlavaContextEncoder,
    LlavaFolder,
    ProgressFn,
    load_context_encoder,
)
from .projection import build_projector, context_tokens, mean_llava_embedding
from .prompt import LlavaTokenizer, llava_prompt, sd_prompt
from .streaming import PLACEMENTS, resolve_placement
from .weights import MomaAdapterWeights, adapter_fingerprint, load_adapter

CONTEXT_CACHE_SIZE = 16  # contexts remembered per MomaModel (tiny: 2x4x768 + 1024 floats each)


# What the encoder needs, per MomaModel field: the MoMA Loader input that sets it and what to choose there.
_ENCODER_PARTS = {
    "llava_dir": ("llava_name", "the MoMA_llava_7b folder (models/LLM)"),
    "clip_vision_path": ("clip_vision_name", "the clip-vit-large-patch14-336 vision tower (models/clip_vision)"),
}


@dataclass(eq=False)
class MomaModel:
    """What the MoMA Loader outputs. LLaVA is not loaded here: the context encoder loads it when needed.

    ``llava_dir`` / ``clip_vision_path`` are None when the loader was set to 'none': such a model applies
    saved contexts (Load MoMA Context) but cannot encode new ones."""

    adapter: MomaAdapterWeights
    adapter_path: Path
    llava_dir: Path | None = None
    clip_vision_path: Path | None = None
    precision: str = "auto"
    quantization: str = "none"
    keep_llava_loaded: bool = False
    placement: str = "auto"  # where LLaVA lives while encoding: auto, gpu (resident), stream, cpu
    # Runtime state, not part of the model's identity:
    resident_encoder: Any = field(
        default=None, repr=False
    )  # kept encoder (or its ComfyUI patcher) if keep_llava_loaded
    _contexts: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _tokenizer: LlavaTokenizer | None = field(default=None, repr=False)
    _processor: Any = field(default=None, repr=False)

    @classmethod
    def load(
        cls,
        adapter_path: str | Path,
        llava_dir: str | Path | None,
        clip_vision_path: str | Path | None,
        precision: str = "auto",
        quantization: str = "none",
        keep_llava_loaded: bool = False,
        placement: str = "auto",
    ) -> MomaModel:
        """Read the adapter now; check the LLaVA folder's config and files and the CLIP path exist (cheap).

        ``llava_dir`` / ``clip_vision_path`` may be None (the loader's 'none'): nothing is checked for them and
        encoding a new context raises a MomaError naming what to choose."""
        if precision not in PRECISIONS:
            raise MomaError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
        if quantization not in QUANTIZATIONS:
            raise MomaError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
        if placement not in PLACEMENTS:
            raise MomaError(f"llava_placement must be one of {PLACEMENTS}, got {placement!r}.")
        adapter_path = preferred_adapter_file(adapter_path)  # a converted .safetensors next to the pickle wins
        adapter = load_adapter(adapter_path)
        tokenizer = None
        if llava_dir is not None:
            llava_dir = Path(llava_dir)
            LlavaFolder.open(llava_dir)
            tokenizer = LlavaTokenizer.from_folder(llava_dir)  # a broken tokenizer.model fails now, not after LLaVA
        if clip_vision_path is not None:
            clip_vision_path = Path(clip_vision_path)
            if not clip_vision_path.exists():
                raise MomaError(f"CLIP vision model not found: {clip_vision_path}. {CLIP_WHERE_TO_GET}")
        return cls(
            adapter=adapter,
            adapter_path=Path(adapter_path),
            llava_dir=llava_dir,
            clip_vision_path=clip_vision_path,
            precision=precision,
            quantization=quantization,
            keep_llava_loaded=keep_llava_loaded,
            placement=placement,
            _tokenizer=tokenizer,
        )

    def require_encoder(self, *fields: str) -> None:
        """Raise a MomaError naming the loader inputs set to 'none' among ``fields`` (default: all the encoder's)."""
        unset = [_ENCODER_PARTS[name] for name in (fields or _ENCODER_PARTS) if getattr(self, name) is None]
        if not unset:
            return
        inputs = " and ".join(f"{input_name} 'none'" for input_name, _ in unset)
        choices = " and ".join(choice for _, choice in unset)
        raise MomaError(
            f"MoMA Loader has {inputs}: choose {choices} to encode a new context, or use Load MoMA Context "
            f"(a context saved by Save MoMA Context) instead of the LLaVA Context Encoder."
        )

    @property
    def tokenizer(self) -> LlavaTokenizer:
        if self._tokenizer is None:
            self.require_encoder("llava_dir")
            self._tokenizer = LlavaTokenizer.from_folder(self.llava_dir)
        return self._tokenizer

    @property
    def image_processor(self) -> Any:
        if self._processor is None:
            self.require_encoder("clip_vision_path")
            self._processor = load_clip_image_processor(self.clip_vision_path)
        return self._processor

    def load_encoder(
        self,
        device: torch.device | str,
        progress: ProgressFn | None = None,
        interrupt: InterruptFn | None = None,
        *,
        placement: str | None = None,
        pin: bool = False,
    ) -> LlavaContextEncoder:
        """Load LLaVA + CLIP vision + mapping/projector for computing on ``device`` (the expensive step).

        ``placement`` (default: the model's; ``auto`` without memory figures means resident): ``gpu`` loads it
        all on ``device``, ``cpu`` on the CPU, ``stream`` keeps it in RAM (``pin``: page-locked) and streams
        the layers to ``device`` during each encode."""
        self.require_encoder()
        placement = resolve_placement(placement or self.placement, device)
        if placement == "cpu":
            device = "cpu"
        return load_context_encoder(
            self.llava_dir,
            self.clip_vision_path,
            self.adapter,
            precision=self.precision,
            quantization=self.quantization,
            device=device,
            progress=progress,
            interrupt=interrupt,
            stream=placement == "stream",
            pin=pin,
        )

    # --- remembered contexts: re-encoding identical inputs would give identical tokens

    @staticmethod
    def context_key(image: torch.Tensor, mask: torch.Tensor, subject: str, prompt: str) -> str:
        digest = hashlib.sha256()
        for tensor in (image, mask):
            data = tensor.detach().float().contiguous().cpu()
            digest.update(str(tuple(data.shape)).encode())
            digest.update(data.numpy().tobytes())
        digest.update(subject.encode("utf-8") + b"\0" + prompt.encode("utf-8"))
        return digest.hexdigest()

    def remembered_context(self, key: str) -> MomaContext | None:
        context = self._contexts.get(key)
        if context is not None:
            self._contexts.move_to_end(key)
        return context

    def remember_context(self, key: str, context: MomaContext) -> None:
        self._contexts[key] = context
        while len(self._contexts) > CONTEXT_CACHE_SIZE:
            self._contexts.popitem(last=False)


def encode_context(
    encoder: LlavaContextEncoder,
    moma_model: MomaModel,
    image: torch.Tensor,
    mask: torch.Tensor,
    subject: str,
    prompt: str,
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
) -> MomaContext:
    """One reference picture [H, W, C] + object mask [H, W] + texts -> MomaContext (spec 2)."""
    input_ids = moma_model.tokenizer.prompt_ids(subject, prompt)
    pixel_values = llava_pixel_values(image, mask, moma_model.image_processor)  # [1, 3, 336, 336]
    llava_emb, cond, uncond = encoder(input_ids, pixel_values, progress=progress, interrupt=interrupt)
    return MomaContext(
        cond_tokens=cond,
        uncond_tokens=uncond,
        llava_emb=llava_emb,
        subject=subject,
        prompt=prompt,
        sd_prompt=sd_prompt(subject, prompt),
        adapter_sha256=adapter_fingerprint(moma_model.adapter),
    )


def encode_context_views(
    encoder: LlavaContextEncoder,
    moma_model: MomaModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    subject: str,
    prompt: str,
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
) -> MomaContext:
    """B views of one object (pictures [B, H, W, C], their masks [B, H, W]) + texts -> one MomaContext.

    Each view is encoded alone with the same subject and prompt (``encode_context``); the context's ``llava_emb``
    is the mean of theirs (``mean_llava_embedding``), its cond tokens the adapter's projector of that mean
    (computed in float32 on the CPU), its uncond tokens the encoder's projector(zeros), the same for every view.
    One view gives exactly ``encode_context``'s context. ``progress(done, total)`` counts the steps of all views."""
    if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] or images.shape[0] < 1:
        raise MomaError(
            f"Internal: views {tuple(images.shape)} and masks {tuple(masks.shape)}; expected "
            f"[B, H, W, C] and [B, H, W] with the same B >= 1."
        )
    count = images.shape[0]
    views = []
    for index in range(count):

        def view_progress(done: int, total: int, index: int = index) -> None:
            if progress is not None:
                progress(index * total + done, count * total)

        views.append(
            encode_context(encoder, moma_model, images[index], masks[index], subject, prompt, view_progress, interrupt)
        )
    if count == 1:
        return views[0]
    llava_emb = mean_llava_embedding([view.llava_emb for view in views])
    cond, _ = context_tokens(build_projector(moma_model.adapter), llava_emb)
    first = views[0]
    return MomaContext(
        cond_tokens=cond,
        uncond_tokens=first.uncond_tokens,
        llava_emb=llava_emb,
        subject=subject,
        prompt=prompt,
        sd_prompt=first.sd_prompt,
        adapter_sha256=first.adapter_sha256,
    )


def check_texts(subject: str, prompt: str) -> None:
    """Fail fast (before loading LLaVA) on a subject/prompt the tokenizer cannot take."""
    llava_prompt(subject, prompt)
