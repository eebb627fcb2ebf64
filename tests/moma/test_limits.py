"""The limits on what a workflow or a file may hand the pack (moma/limits.py, moma/sd15.py): non-finite and
absurd numbers, megabyte strings parsed in linear time, tensor sanity, the context-token bound of an adapter."""

from __future__ import annotations

import math
import random
import re

import comfy_exec
import pytest
import torch
from comfyui_moma.moma.context import token_bound
from comfyui_moma.moma.errors import MomaError
from comfyui_moma.moma.limits import FLOAT16_MAX, check_number, check_text, shown, tensor_problem
from comfyui_moma.moma.projection import ImageProjModel, context_tokens
from comfyui_moma.moma.sd15 import BLOCK_WEIGHTS_CHARS, LAYERS, _block_weight_parts, parse_block_weights

MEGABYTE = 1 << 20
SECONDS = 30  # a linear parse of a megabyte takes milliseconds; the old regex took hours on this one


def _regex_parts(text: str) -> list[str]:
    """The entries as the parser split them before (quadratic on long runs of spaces); the reference."""
    text = re.sub(r"\s*[=:]\s*", "=", text.strip())
    return [part for part in re.split(r"[\s,;]+", text) if part]


def test_block_weight_entries_are_split_as_before() -> None:
    rng = random.Random(1)
    cases = [
        "Input = 0.5, MIDDLE: 1,",
        "a=,1",
        "a =, 1",
        "=1",
        "input =",
        "a=:b",
        "a, =1",
        "a =1 b= 2 c = 3",
        "x=1,,y=2",
        "a:=1",
        "input\t=\n1;output : 2",
    ]
    cases += ["".join(rng.choice("ab1.= :,;\t\n") for _ in range(rng.randint(0, 14))) for _ in range(5000)]
    for text in cases:
        assert _block_weight_parts(text) == _regex_parts(text), text


@pytest.mark.parametrize(
    "text",
    [
        " " * MEGABYTE,  # the old regex rescanned the run of spaces from each position: quadratic
        "input" + " " * MEGABYTE + "= 1",
        ("input = 1, " * (MEGABYTE // 11)),
        "1" * MEGABYTE,
    ],
)
def test_a_megabyte_block_weights_is_refused_quickly(text: str) -> None:
    with comfy_exec.deadline(SECONDS, "parse_block_weights of a megabyte"):
        with pytest.raises(ValueError, match=f"{len(text):,} characters long; {BLOCK_WEIGHTS_CHARS:,}"):
            parse_block_weights(text)
        # the splitting itself is linear too, whatever reaches it
        assert len(_block_weight_parts(text)) <= len(text)


def test_the_longest_allowed_block_weights_parses() -> None:
    text = ("input = 0.5" + " " * (BLOCK_WEIGHTS_CHARS - 22) + "middle = 1").ljust(BLOCK_WEIGHTS_CHARS)
    weights = parse_block_weights(text)
    assert weights[("input", 1)] == 0.5 and weights[("middle", 0)] == 1.0


@pytest.mark.parametrize("entry", ["nan", "NaN", "inf", "-inf", "1e400", "-1e400"])
def test_non_finite_block_weights_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        parse_block_weights(f"input={entry}")
    with pytest.raises(ValueError, match="not a finite number"):
        parse_block_weights(" ".join([entry] * len(LAYERS)))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, -(10**400)])
def test_non_finite_numbers_are_refused_naming_the_input(value) -> None:
    with pytest.raises(MomaError, match=r"^start_percent: .* is not a finite number; give a number in 0\.\.1\.$"):
        check_number("start_percent", value, 0.0, 1.0)


@pytest.mark.parametrize("value", ["0.5", "nan", None, True, [0.5], {"a": 1}])
def test_what_is_not_a_number_is_refused(value) -> None:
    with pytest.raises(MomaError, match="^strength: .* is not a number"):
        check_number("strength", value, 0.0, 2.0)


def test_numbers_in_range_pass_and_out_of_range_are_named() -> None:
    assert check_number("strength", 2, 0.0, 2.0) == 2.0
    assert check_number("x", -1e300) == -1e300  # no range: only finite
    with pytest.raises(MomaError, match=r"^strength: 2\.5 is outside 0\.\.2\.$"):
        check_number("strength", 2.5, 0.0, 2.0)
    with pytest.raises(MomaError, match=r"outside -inf\.\.1"):
        check_number("x", 3, None, 1.0)


def test_texts_over_their_limit_are_refused_with_the_value_shortened() -> None:
    text = "car " * MEGABYTE
    with comfy_exec.deadline(SECONDS, "check_text of 4 MB"):
        with pytest.raises(MomaError) as error:
            check_text("subject", text, 256)
    message = str(error.value)
    assert message.startswith("subject: 'car car") and f"({len(text):,} characters)" in message
    assert "longer than the 256 characters" in message and len(message) < 600
    assert check_text("subject", "x" * 256, 256) == "x" * 256


def test_a_lone_surrogate_is_not_text() -> None:
    with pytest.raises(MomaError, match=r"^prompt: .* is not valid Unicode \(a lone surrogate at character 2\)"):
        check_text("prompt", "ab\ud800cd", 100)
    with pytest.raises(MomaError, match="^subject: expected text, got int"):
        check_text("subject", 3, 100)


def test_shown_keeps_short_values_and_counts_long_ones() -> None:
    assert shown("car") == "'car'"
    assert shown("x" * 5000).endswith("... (5,000 characters)") and len(shown("x" * 5000)) < 240
    assert len(shown(list(range(10**5)))) < 500


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tensor_problems_in_every_float_dtype(dtype: torch.dtype) -> None:
    tensor = torch.randn(64, 33).to(dtype)
    assert tensor_problem(tensor) is None
    for value, expected in (
        (math.nan, "contains NaN"),
        (math.inf, "contains an infinite value"),
        (-math.inf, "contains an infinite value"),
    ):
        bad = tensor.clone()
        bad[17, 5] = value
        assert tensor_problem(bad) == expected, (dtype, value)
        assert tensor_problem(bad.t()) == expected  # not contiguous
    if torch.finfo(dtype).max > FLOAT16_MAX:
        absurd = tensor.clone()
        absurd[3, 3] = -1e30
        assert tensor_problem(absurd) == "reaches 1e+30, beyond the plausible 65504"


def test_integer_and_empty_tensors_are_not_checked() -> None:
    assert tensor_problem(torch.arange(10**6)) is None
    assert tensor_problem(torch.empty(0, 4)) is None
    assert tensor_problem(torch.tensor(float("nan"))) == "contains NaN"  # 0-dim
    assert tensor_problem(torch.empty(3, 4, device="meta")) is None  # no values to check


def _projector(seed: int, weight_scale: float) -> ImageProjModel:
    projector = ImageProjModel()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in projector.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * weight_scale)
    return projector.eval()


@pytest.mark.parametrize("seed,weight_scale,embedding_scale", [(0, 1.0, 1.0), (1, 0.05, 100.0), (2, 3.0, 1e4)])
def test_every_token_an_adapter_makes_lies_within_its_bound(
    seed: int, weight_scale: float, embedding_scale: float
) -> None:
    projector = _projector(seed, weight_scale)
    bound = token_bound({name: value for name, value in projector.state_dict().items() if name.startswith("norm.")})
    generator = torch.Generator().manual_seed(seed + 10)
    embeddings = torch.randn(64, 1024, generator=generator) * embedding_scale
    embeddings[0] = 0  # the unconditional tokens
    embeddings[1, 0] = 1e6  # one huge channel: LayerNorm's most extreme output
    with torch.no_grad():
        cond, uncond = context_tokens(projector, embeddings)
    largest = float(torch.cat([cond, uncond]).abs().max())
    assert largest <= bound
    assert largest > bound / 50  # not a vacuous bound
    assert tensor_problem(cond * 1e3, bound) is not None and tensor_problem(cond, bound) is None
