"""The scoring server's request body -> uint8 pixels (N, 28, 28), or one short reason it is refused.

What docs/serving.md promises: a JSON object whose one key, "inputs" (or "instances", MLflow's other
tensor key), holds N >= 1 pictures of 28 rows of 28 integers 0-255. Floats, booleans, strings, null,
negatives and values over 255 are refused, naming the first bad value's position, never its text:
an answer is a few hundred bytes whatever the request was. MLflow's own parser would cast them.
"""

from __future__ import annotations

import numpy as np
import orjson

SIDE = 28
KEYS = ("inputs", "instances")


class BadRequest(ValueError):
    """A request the server refuses with a 400; the message is short and quotes nothing of the request."""


def parse(body: bytes) -> np.ndarray:
    """uint8 pixels (N, 28, 28) from a request body, or BadRequest. orjson parses (a C-speed parser with
    a nesting limit of its own, 1024 levels, so no input reaches Python's recursion limit); numpy checks the shape
    and range of a well-formed body in one pass; only a bad one is walked to name its first bad value."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        reason = "nested too deeply" if "depth" in str(error) else "not valid JSON (UTF-8)"
        raise BadRequest(f"the body is {reason}") from None
    if not isinstance(document, dict) or len(document) != 1 or next(iter(document)) not in KEYS:
        raise BadRequest('the body must be a JSON object with one key, "inputs": pixels (N, 28, 28)')
    key, value = next(iter(document.items()))
    # true/false cannot appear in a valid body (its one string is the key): numpy would read them as 1/0.
    if b"true" not in body and b"false" not in body:
        try:
            pixels = np.array(value)
        except (ValueError, OverflowError):  # ragged lists, integers past 64 bits
            pixels = None
        if (
            pixels is not None
            and pixels.dtype.kind == "i"
            and pixels.ndim == 3
            and pixels.shape[0] >= 1
            and pixels.shape[1:] == (SIDE, SIDE)
            and pixels.min() >= 0
            and pixels.max() <= 255
        ):
            return pixels.astype(np.uint8)
    raise BadRequest(first_problem(key, value))


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a negative integer" if value < 0 else "an integer over 255"
    return {float: "a float", str: "a string", dict: "an object", list: "a list"}.get(type(value), "null")


def first_problem(key: str, value: object) -> str:
    """The first thing wrong with `value` as pixels (N, 28, 28), in document order, with its position."""
    if not isinstance(value, list) or not value:
        return f"{key}: must be a non-empty list of 28x28 pictures"
    # (position, value, depth) to visit, the first child on top: document order, no recursion.
    stack: list[tuple[str, object, int]] = [(f"{key}[{i}]", v, 1) for i, v in reversed(list(enumerate(value)))]
    while stack:
        where, item, depth = stack.pop()
        if depth < 3:
            if not isinstance(item, list):
                return f"{where}: {_kind(item)} where a list of {SIDE} {'rows' if depth == 1 else 'pixels'} belongs"
            if len(item) != SIDE:
                unit = "row" if depth == 1 else "pixel"
                return f"{where}: {len(item)} {unit}{'' if len(item) == 1 else 's'}, not {SIDE}"
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= 255:
            return f"{where}: {_kind(item)}; pixels are integers 0-255"
    return f"{key}: not pixels (N, 28, 28)"  # not reached: parse() accepted what this walk accepts
