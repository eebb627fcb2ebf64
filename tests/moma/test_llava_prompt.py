"""MoMA's LLaVA prompt and its token ids (spec 2, "Prompt template" / "Tokenisation"), re-derived independently.

Independent constructions: (a) plain sentencepiece pieces -> ids, with BOS and -200 placed by hand;
(b) transformers' LlamaTokenizer on the folder (what the reference's AutoTokenizer reads) + LLaVA's splice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.prompt import LlavaTokenizer, llava_prompt, llava_user_prompt, sd_prompt

CASES = [
    ("car", "A car in autumn with falling leaves."),  # ends with '.': the template then has '..'
    ("teddy bear", "a teddy bear on the beach at sunset"),  # two-word subject
    ("café cup", "Ein Tässchen im Café, 東京 ☕ ñ 2024"),  # unicode, byte fallback, digits
    ("dog", "  two spaces,\ttab and trailing space "),  # whitespace kept verbatim
]


def _by_pieces(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    return [sp.piece_to_id(piece) for piece in sp.encode(text, out_type=str)]


def _expected_ids(llava_dir: Path, subject: str, prompt: str) -> list[int]:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llava_dir / "tokenizer.model"))
    before = "USER: "
    after = f"\n A photo of a {subject}. Describe a new image of the same {subject} in: {prompt}. ASSISTANT: *"
    return [sp.bos_id()] + _by_pieces(sp, before) + [-200] + _by_pieces(sp, after)


@pytest.fixture(scope="module")
def tokenizer(llava_dir: Path) -> LlavaTokenizer:
    return LlavaTokenizer.from_folder(llava_dir)


@pytest.mark.parametrize("subject,prompt", CASES)
def test_ids_equal_a_piece_by_piece_construction(
    tokenizer: LlavaTokenizer, llava_dir: Path, subject: str, prompt: str
) -> None:
    assert tokenizer.prompt_ids(subject, prompt) == _expected_ids(llava_dir, subject, prompt)


@pytest.mark.parametrize("subject,prompt", CASES)
def test_ids_equal_transformers_llama_tokenizer_with_llavas_splice(
    tokenizer: LlavaTokenizer, llava_dir: Path, subject: str, prompt: str
) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(llava_dir))
    text = llava_prompt(subject, prompt)
    chunks = [hf(chunk).input_ids for chunk in text.split("<image>")]
    assert all(chunk[0] == hf.bos_token_id for chunk in chunks)
    expected = chunks[0] + [-200] + chunks[1][1:]
    assert tokenizer.prompt_ids(subject, prompt) == expected


def test_token_structure_bos_once_dummy_space_kept_star_last(tokenizer: LlavaTokenizer) -> None:
    sp = tokenizer.sp
    ids = tokenizer.prompt_ids("car", "A car in autumn with falling leaves.")
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1
    image_at = ids.index(-200)
    assert ids.count(-200) == 1
    # the second chunk keeps SentencePiece's dummy-prefix space: "▁" then the newline byte
    assert [sp.id_to_piece(i) for i in ids[image_at + 1 : image_at + 3]] == ["▁", "<0x0A>"]
    assert sp.id_to_piece(ids[-1]) == "▁*"
    assert sp.id_to_piece(ids[image_at - 1]) == "▁"  # "USER: " ends with a space piece
    pieces = [sp.id_to_piece(i) for i in ids[image_at + 1 :]]
    assert "".join(pieces).replace("▁", " ").endswith("leaves.. ASSISTANT: *")


def test_template_text_and_sd_prompt() -> None:
    assert llava_prompt("car", "A car in autumn.") == (
        "USER: <image>\n A photo of a car. Describe a new image of the same car in: A car in autumn.. ASSISTANT: *"
    )
    assert (
        sd_prompt("car", "A car in autumn with falling leaves.")
        == "photo of a car. A car in autumn with falling leaves."
    )
    # a prompt already written as the SD prompt is kept, and LLaVA gets it without the prefix
    assert sd_prompt("teddy bear", "Photo of a Teddy Bear. On the beach") == "Photo of a Teddy Bear. On the beach"
    assert llava_user_prompt("teddy bear", "Photo of a Teddy Bear. On the beach") == "On the beach"
    assert llava_user_prompt("car", "a red car") == "a red car"
    assert llava_prompt("car", "photo of a car. A car in autumn.") == llava_prompt("car", "A car in autumn.")


@pytest.mark.parametrize(
    "subject,prompt,word",
    [("", "x", "subject is empty"), ("car", "a <image> car", "<image>"), ("car</s>", "x", "</s>")],
)
def test_unusable_texts_are_refused(subject: str, prompt: str, word: str) -> None:
    with pytest.raises(MomaError, match=word):
        llava_prompt(subject, prompt)


def test_tokenizer_needs_tokenizer_model(tmp_path: Path) -> None:
    with pytest.raises(MomaError, match="No tokenizer.model"):
        LlavaTokenizer.from_folder(tmp_path)
