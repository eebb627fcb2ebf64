"""MoMA Text Encode: CLIPTextEncode that tags its conditioning with the text, so sampling finds the subject
tokens in the text the positive conditioning was really made from (not in whatever text Apply was given)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import folder_paths
import torch
from comfy.sd1_clip import SDTokenizer

from ..moma.errors import MomaError
from ..moma.subject_mask import PromptTokens, SubjectTokens
from . import host_contract
from .common import schema_extras
from .node_api import io
from .types import MomaContext
from .validation import checked_inputs, input_problems, verdict

log = logging.getLogger(__name__)

PROMPT_TAG_KEY = "moma_prompt"  # conditioning dict key: a moma.subject_mask.PromptTokens
_TOKENIZER: SDTokenizer | None = None


def sd_tokenizer() -> SDTokenizer:
    """ComfyUI's SD1.5 CLIP tokenizer, with the embeddings folder, as CLIPTextEncode tokenises for SD1.5."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = SDTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return _TOKENIZER


def clip_token_ids(chunks: Iterable[Iterable[Any]]) -> tuple[int, ...]:
    """Token ids of ComfyUI's tokenised text (77-token chunks of (token, weight[, word id])); -1 where an
    embedding (a tensor) stands."""
    return tuple(-1 if torch.is_tensor(token[0]) else int(token[0]) for chunk in chunks for token in chunk)


def subject_tokens(subject: str, prompt: str) -> SubjectTokens:
    """The subject's token ids as the reference picks them (the first BPE id of each word) and ``prompt``, the
    text they are looked up in unless the positive conditioning carries its own (MoMA Text Encode)."""
    ids = set()
    for word in subject.split():
        word_ids = sd_tokenizer().tokenizer(word, add_special_tokens=False)["input_ids"]
        if word_ids:
            ids.add(int(word_ids[0]))
    return SubjectTokens(subject=subject, ids=frozenset(ids), prompt=prompt)


def sd15_token_chunks(tokens: Any) -> list:
    """The CLIP-L chunks of ``clip.tokenize``'s result (SD1.5's only text encoder)."""
    if isinstance(tokens, dict):
        if "l" in tokens:
            return tokens["l"]
        raise MomaError(
            f"MoMA Text Encode: this CLIP has text encoders {sorted(tokens)}, not SD1.5's CLIP-L; "
            f"wire the CLIP of the SD1.5 checkpoint you sample with."
        )
    return tokens


def encode_tagged(clip: Any, text: str) -> list:
    """What core CLIPTextEncode returns for ``text`` (the same tensors), each conditioning entry tagged with
    the text and its token ids under ``PROMPT_TAG_KEY``."""
    if clip is None:
        raise MomaError("MoMA Text Encode: the clip input is empty: wire the CLIP of your SD1.5 checkpoint loader.")
    tokens = clip.tokenize(text)
    tag = PromptTokens(text=text, token_ids=clip_token_ids(sd15_token_chunks(tokens)))
    return clip.encode_from_tokens_scheduled(tokens, add_dict={PROMPT_TAG_KEY: tag})


def prompt_tag(cond: Any) -> PromptTokens | None:
    """The MoMA Text Encode tag of one conditioning dict (as the sampler holds it), or None."""
    tag = cond.get(PROMPT_TAG_KEY) if isinstance(cond, dict) else None
    return tag if isinstance(getattr(tag, "token_ids", None), tuple) else None


class MomaTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MomaTextEncode",
            display_name="MoMA Text Encode",
            category="MoMA",
            description=(
                "CLIP Text Encode for the positive prompt of a MoMA graph: the same conditioning as CLIPTextEncode, "
                "tagged with its text, so Apply MoMA Attention finds the subject's tokens in the text the sampler "
                "really gets. Empty text with a context connected: the context's sd_prompt is encoded."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of your SD1.5 checkpoint (as for CLIPTextEncode)."),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    default="",
                    tooltip="The positive prompt. Leave it empty to use the connected context's sd_prompt "
                    "(photo of a {subject}. {prompt}).",
                ),
                MomaContext.Input(
                    "context",
                    optional=True,
                    tooltip="Optional: from LLaVA Context Encoder or Load MoMA Context. Its sd_prompt is "
                    "the text when 'text' is empty; a text without its subject word is warned about.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="CONDITIONING", tooltip="For the sampler's positive input (MoMA reads its tag)."
                )
            ],
            **schema_extras(
                search_aliases=["moma prompt", "moma positive prompt", "moma clip text encode", "text encode moma"]
            ),
        )

    @classmethod
    def validate_inputs(cls, text: str | None = None) -> bool | str:
        values = {"text": text}
        return verdict(input_problems(cls, values), values)

    @classmethod
    def execute(cls, clip, text="", context=None) -> io.NodeOutput:
        host_contract.require(host_contract.TEXT)
        checked_inputs(cls, {"text": text})
        if context is not None and not hasattr(context, "sd_prompt"):
            raise MomaError("MoMA Text Encode: 'context' must come from LLaVA Context Encoder or Load MoMA Context.")
        if not (text or "").strip():
            if context is None:
                raise MomaError(
                    "MoMA Text Encode: 'text' is empty and no context is connected: type the positive "
                    "prompt, or connect the context (its sd_prompt is then encoded)."
                )
            text = context.sd_prompt
        conditioning = encode_tagged(clip, text)
        if context is not None and getattr(context, "subject", "").strip():
            tag = prompt_tag(conditioning[0][1])
            if tag is not None and not subject_tokens(context.subject, text).positions(tag.token_ids):
                log.warning(
                    "MoMA Text Encode: the text %r does not contain the context's subject %r; MoMA finds no "
                    "subject tokens in it and acts unmasked.",
                    text,
                    context.subject,
                )
        return io.NodeOutput(conditioning)
