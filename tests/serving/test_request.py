"""The scoring server's request check (serving.request): the documented schema, the first bad value
named by position, short messages that quote nothing of the request, whatever the body."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_cnn.serving.request import BadRequest, parse

BLANK = [[0] * 28] * 28


def body(inputs: object, key: str = "inputs") -> bytes:
    return json.dumps({key: inputs}).encode()


def refused(raw: bytes) -> str:
    with pytest.raises(BadRequest) as error:
        parse(raw)
    message = str(error.value)
    assert len(message) <= 200, message
    return message


def with_pixel(value: object, picture: int = 1, row: int = 3, col: int = 17) -> bytes:
    pictures = [json.loads(json.dumps(BLANK)) for _ in range(2)]
    pictures[picture][row][col] = value
    return body(pictures)


def test_pixels_are_read_as_uint8() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    parsed = parse(body(pixels.tolist()))
    assert parsed.dtype == np.uint8 and parsed.shape == (3, 28, 28)
    np.testing.assert_array_equal(parsed, pixels)
    assert parse(body([BLANK], key="instances")).shape == (1, 28, 28)
    assert parse(b' {"inputs" :\n' + json.dumps([BLANK]).encode() + b"} ").shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("value", "kind"),
    [(-0.5, "a float"), (0.7, "a float"), (255.9, "a float"), (3.0, "a float"), (1e2, "a float"),
     ("12", "a string"), (True, "a boolean"), (False, "a boolean"), (None, "null"), (-1, "a negative integer"),
     (256, "an integer over 255"), (2**70, "a float"), ([1], "a list"), ({"a": 1}, "an object")],
)  # fmt: skip
def test_each_bad_pixel_is_a_400_naming_its_position_and_kind(value: object, kind: str) -> None:
    message = refused(with_pixel(value))
    assert message.startswith(f"inputs[1][3][17]: {kind};"), message


def test_the_first_bad_value_in_document_order_is_named() -> None:
    pictures = [json.loads(json.dumps(BLANK)) for _ in range(2)]
    pictures[1][0][5], pictures[0][20][1] = "x", 1.5
    assert refused(body(pictures)).startswith("inputs[0][20][1]: a float")


@pytest.mark.parametrize(
    ("inputs", "start"),
    [([], "inputs: must be a non-empty list"), ("x", "inputs: must be a non-empty list"),
     ([BLANK[:27]], "inputs[0]: 27 rows, not 28"), ([[*BLANK[:27], [0] * 29]], "inputs[0][27]: 29 pixels, not 28"),
     ([BLANK, 5], "inputs[1]: an integer over 255 where a list of 28 rows belongs"),
     ([[BLANK]], "inputs[0]: 1 row, not 28"),  # (N, 1, 28, 28), the format of earlier versions
     ([[[[0]] * 28] * 28], "inputs[0][0][0]: a list;")],
)  # fmt: skip
def test_shapes_other_than_n_28_28_are_named(inputs: object, start: str) -> None:
    assert refused(body(inputs)).startswith(start)


@pytest.mark.parametrize(
    ("raw", "start"),
    [(b"not json", "the body is not valid JSON"), (b"\xff\xfe{}", "the body is not valid JSON"), (b"", "the body is"),
     (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", "the body is nested too deeply"),
     (b"[1, 2]", "the body must be a JSON object"), (b'{"wrong": 1}', "the body must be a JSON object"),
     (json.dumps({"inputs": [BLANK], "params": {}}).encode(), "the body must be a JSON object"),
     (json.dumps({"dataframe_split": {"data": [[0]]}}).encode(), "the body must be a JSON object")],
)  # fmt: skip
def test_bodies_that_are_not_one_inputs_object(raw: bytes, start: str) -> None:
    assert refused(raw).startswith(start)


def test_a_huge_string_is_not_echoed() -> None:
    message = refused(body("x" * 1_000_000))
    assert "xxxx" not in message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=30) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=200,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, key=st.sampled_from(["inputs", "instances", "x"]))
def test_any_json_is_pixels_or_one_short_bad_request(value: object, key: str) -> None:
    raw = json.dumps({key: value}).encode()
    try:
        pixels = parse(raw)
    except BadRequest as error:
        assert 0 < len(str(error)) <= 200
    else:
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == (28, 28)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=2000))
def test_any_bytes_are_pixels_or_one_short_bad_request(raw: bytes) -> None:
    try:
        parse(raw)
    except BadRequest as error:
        assert 0 < len(str(error)) <= 200


@settings(max_examples=100, deadline=None)
@given(
    pixels=st.lists(st.integers(0, 255), min_size=784, max_size=784).map(lambda p: np.reshape(p, (1, 28, 28))),
    where=st.tuples(st.integers(0, 27), st.integers(0, 27)),
    bad=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.text(max_size=3),
                  st.integers(max_value=-1), st.integers(min_value=256, max_value=2**63 - 1)),
)  # fmt: skip
def test_one_bad_pixel_among_good_ones_is_found(pixels: np.ndarray, where: tuple[int, int], bad: object) -> None:
    document = pixels.tolist()
    document[0][where[0]][where[1]] = bad
    assert refused(body(document)).startswith(f"inputs[0][{where[0]}][{where[1]}]: ")
