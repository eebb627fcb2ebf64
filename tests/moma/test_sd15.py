"""block_weights parsing (moma.sd15.parse_block_weights): the forms people type, and clear errors."""

from __future__ import annotations

import pytest
from comfyui_moma.moma.sd15 import LAYERS, parse_block_weights


def test_numbers_in_layer_order_with_any_separator():
    values = [i / 10 for i in range(16)]
    for text in (
        " ".join(map(str, values)),
        ", ".join(map(str, values)) + ",",
        ";".join(map(str, values)),
        "\n".join(map(str, values)),
    ):
        weights = parse_block_weights(text)
        assert [weights[layer.block] for layer in LAYERS] == values


@pytest.mark.parametrize(
    "text",
    [
        "input=0, middle=0.5",
        "input = 0, middle = 0.5",
        "input =0 ,middle= 0.5 ,",
        "INPUT=0; Middle=0.5;",
        "input: 0, middle: 0.5",
        "  input\t=\t0\n middle=.5  ",
    ],
)
def test_name_value_pairs_with_spaces_case_and_trailing_separators(text):
    weights = parse_block_weights(text)
    assert all(weights[layer.block] == 0.0 for layer in LAYERS if layer.block[0] == "input")
    assert weights[("middle", 0)] == 0.5
    assert all(weights[layer.block] == 1.0 for layer in LAYERS if layer.block[0] == "output")


def test_a_block_overrides_its_group_in_any_order():
    for text in ("output=0, Output_5 = 2", "OUTPUT_5=2, output=0"):
        weights = parse_block_weights(text)
        assert weights[("output", 5)] == 2.0 and weights[("output", 6)] == 0.0 and weights[("input", 1)] == 1.0


@pytest.mark.parametrize("text", ["", "   ", ",", " ; , "])
def test_empty_means_all_one(text):
    assert set(parse_block_weights(text).values()) == {1.0}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1 2 3", r"3 numbers given; write all 16"),
        ("input=x", r"'x' is not a number"),
        ("elbow=1", r"unknown block 'elbow': use input, middle, output or one of input_1"),
        ("input_3=1", r"unknown block 'input_3'"),
        ("input=9", r"weight 9.0 is outside 0..5"),
        ("input=-1", r"weight -1.0 is outside 0..5"),
        ("1, input=2", r"'1' is not name=value \(mixing"),
        ("input=", r"'input=' has no value"),
        ("input=, middle=1", r"'input=' has no value"),
        ("=1", r"'=1' has no block name"),
        ("input=1, INPUT=2", r"'input' is given twice"),
        ("output_5=1 output_5 = 2", r"'output_5' is given twice"),
        ("input=1=2", r"'input=1=2' is missing a value or a separator"),
        ("input= middle=1", r"'input=middle=1' is missing a value or a separator"),
    ],
)
def test_bad_strings_name_the_problem(text, words):
    with pytest.raises(ValueError, match=words):
        parse_block_weights(text)
