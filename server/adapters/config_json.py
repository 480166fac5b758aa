"""``adapter_config.json`` as JSON with bounds on size, nesting depth and number literals.

The stdlib parser is fine for honest files, but a hostile one makes it fail in ways that are not JSON errors: deep
nesting raises RecursionError (from C, after recursing as deep as the interpreter allows), an integer literal over
Python's 4,300-digit limit raises ValueError, and a 400-digit integer parses but overflows the first float
conversion. Each bound is checked before the value is built, so every such file becomes one AdapterFormatError
(HTTP 422) whose message says which bound it crossed.
"""

import json
import re
from collections.abc import Callable
from typing import TypeVar

from server.adapters.errors import AdapterFormatError

# The same cap the registry puts on an uploaded adapter_config.json (UploadLimits.max_config_bytes).
MAX_CONFIG_BYTES = 1 << 20
# peft's deepest values nest three levels (layer_replication: [[0, 4], [2, 5]] inside the top-level object).
MAX_DEPTH = 16
# A 64-bit seed has 20 digits and a float's repr at most 24 characters; 100 stays far below the 309 digits where an
# int stops converting to float and the 4,300 where Python refuses to parse it.
MAX_NUMBER_CHARS = 100

_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
T = TypeVar("T")


def load_config_json(raw: bytes | str, what: str = "adapter_config.json") -> object:
    """Parse ``raw`` (UTF-8/16/32 bytes as json.loads detects them, or text) within the bounds above."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{what} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise AdapterFormatError(f"{what} is not valid JSON: {exc}") from None
    depth = _max_depth(text, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise AdapterFormatError(f"{what} nests arrays/objects more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{what} is not valid JSON: {exc}") from None


def _max_depth(text: str, limit: int) -> int:
    """The deepest bracket nesting of JSON ``text``, counted without recursion; stops once past ``limit``.

    Escapes go first (pairing left to right, as in a JSON string), then strings, leaving the brackets that are
    structure. Up to the first character that makes ``text`` invalid JSON this agrees with the parser, and the
    parser never nests deeper than that point, so its depth is never above the one returned."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _bounded(convert: Callable[[str], T], kind: str) -> Callable[[str], T]:
    """``convert`` for json.loads' parse_int / parse_float hooks, refusing literals over MAX_NUMBER_CHARS first."""

    def parse(literal: str) -> T:
        if len(literal) > MAX_NUMBER_CHARS:
            raise AdapterFormatError(
                f"adapter_config.json holds {kind} of {len(literal)} characters ({literal[:20]}...); "
                f"numbers may have at most {MAX_NUMBER_CHARS}"
            )
        return convert(literal)

    return parse


_parse_int = _bounded(int, "an integer literal")
_parse_float = _bounded(float, "a number literal")
