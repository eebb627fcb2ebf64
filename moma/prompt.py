"""MoMA's LLaVA prompt (spec 2, "Prompt template" / "Tokenisation") and the SD-side prompt.

The LLaVA input is ``USER: <image>\\n A photo of a {subject}. Describe a new image of the same {subject} in:
{prompt}. ASSISTANT: *`` (no system prompt, the user prompt verbatim, so a final '.' gives '..'). It is tokenised
as LLaVA's ``tokenizer_image_token`` with the folder's slow SentencePiece LlamaTokenizer: the text is split at
``<image>``, each chunk encoded as ``[BOS] + pieces`` (SentencePiece's dummy-prefix space included), BOS kept only
at the very start, and id -200 placed between the chunks where the picture features go.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MomaError
from .limits import PROMPT_CHARS, SUBJECT_CHARS, check_text

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the picture features
PROMPT_TEMPLATE = (
    "USER: <image>\n A photo of a {subject}. Describe a new image of the same {subject} in: {prompt}. ASSISTANT: *"
)
SD_PREFIX = "photo of a {subject}"
RESERVED_TEXT = (IMAGE_TOKEN, "<s>", "</s>", "<unk>")
LLAVA_WHERE_TO_GET = (
    "Download the whole folder of the Hugging Face repo KunpengSong/MoMA_llava_7b (config.json, "
    "pytorch_model-0000x-of-00002.bin + pytorch_model.bin.index.json, tokenizer.model) into ComfyUI/models/LLM/."
)


def _check_text(subject: str, prompt: str) -> None:
    check_text("subject", subject, SUBJECT_CHARS)
    check_text("prompt", prompt, PROMPT_CHARS)
    if not subject.strip():
        raise MomaError("subject is empty: give the object's class word, e.g. 'car' or 'teddy bear'.")
    for name, text in (("subject", subject), ("prompt", prompt)):
        for reserved in RESERVED_TEXT:
            if reserved in text:
                raise MomaError(
                    f"The {name} contains {reserved!r}, which LLaVA's tokenizer treats as a control token; "
                    f"remove it from the {name}."
                )


def _strip_sd_prefix(subject: str, prompt: str) -> str | None:
    prefix = SD_PREFIX.format(subject=subject)
    if not prompt.lower().startswith(prefix.lower()):
        return None
    rest = prompt[len(prefix) :].lstrip()
    if rest.startswith("."):
        rest = rest[1:].lstrip()
    return rest


def sd_prompt(subject: str, prompt: str) -> str:
    """The SD text prompt: ``"photo of a {subject}. {prompt}"`` (the reference's), unless ``prompt`` already
    starts with ``"photo of a {subject}"`` (case-insensitive), in which case it is used unchanged."""
    if _strip_sd_prefix(subject, prompt) is not None:
        return prompt
    return f"photo of a {subject}. {prompt}"


def llava_user_prompt(subject: str, prompt: str) -> str:
    """The ``{prompt}`` part of the LLaVA template: ``prompt`` with a leading ``"photo of a {subject}"`` and the
    period after it removed (so a prompt written as the full SD prompt gives the reference's LLaVA input)."""
    stripped = _strip_sd_prefix(subject, prompt)
    return prompt if stripped is None else stripped


def llava_prompt(subject: str, prompt: str) -> str:
    """The whole LLaVA input text (no system prompt; the user prompt verbatim, so a final '.' gives '..')."""
    _check_text(subject, prompt)
    return PROMPT_TEMPLATE.format(subject=subject, prompt=llava_user_prompt(subject, prompt))


class LlavaTokenizer:
    """The folder's ``tokenizer.model`` with the slow LlamaTokenizer's semantics on plain text:
    ``[BOS] + sentencepiece.encode(text)`` (the model's dummy-prefix space included)."""

    def __init__(self, model_file: str | Path, add_bos: bool = True) -> None:
        import sentencepiece

        model_file = Path(model_file)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as error:
            raise MomaError(
                f"Could not read the SentencePiece model {model_file}: {error}. {LLAVA_WHERE_TO_GET}"
            ) from None
        self.add_bos = add_bos
        self.bos_id = self.sp.bos_id()
        if add_bos and self.bos_id < 0:
            raise MomaError(f"{model_file} defines no BOS token; LLaVA's tokenizer needs one. {LLAVA_WHERE_TO_GET}")

    @classmethod
    def from_folder(cls, folder: str | Path) -> LlavaTokenizer:
        """``tokenizer.model`` (+ ``add_bos_token`` from tokenizer_config.json, default true) of a LLaVA folder."""
        folder = Path(folder)
        model_file = folder / "tokenizer.model"
        if not model_file.is_file():
            raise MomaError(f"No tokenizer.model in {folder}. {LLAVA_WHERE_TO_GET}")
        add_bos = True
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            try:
                add_bos = bool(json.loads(config_file.read_text(encoding="utf-8")).get("add_bos_token", True))
            except (OSError, ValueError, AttributeError, RecursionError) as error:
                raise MomaError(f"Could not read {config_file} ({error}). {LLAVA_WHERE_TO_GET}") from None
        return cls(model_file, add_bos=add_bos)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """One chunk as ``tokenizer(text).input_ids``: BOS (if enabled) then the pieces."""
        ids = list(self.sp.encode(text))
        return [self.bos_id] + ids if self.add_bos else ids

    def image_prompt_ids(self, text: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: chunks split at ``<image>``, BOS only at the start, -200 between."""
        chunks = [self.encode(chunk) for chunk in text.split(IMAGE_TOKEN)]
        starts_with_bos = bool(chunks[0]) and chunks[0][0] == self.bos_id
        ids = [self.bos_id] if starts_with_bos else []
        for position, chunk in enumerate(chunks):
            if position:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[1:] if starts_with_bos else chunk)
        return ids

    def prompt_ids(self, subject: str, prompt: str) -> list[int]:
        """Token ids of MoMA's LLaVA prompt for (subject, prompt), with the -200 picture placeholder."""
        return self.image_prompt_ids(llava_prompt(subject, prompt))
