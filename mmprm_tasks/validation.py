"""The rules every value a user or a file sends is held to, one per concept, so the CLI, the
seed reader, ``import-trees``, ``mmprm score``, the DAG Params and the browser's URLs agree.

* **Ids** (problems, runs, datasets, checkpoints, evaluations) become object keys
  (``trees/<run>/<problem>.json``), file names and URL segments: :data:`ID_PATTERN`.
* **Text** (questions, answers, steps, extra fields) is stored in Postgres (which refuses NUL)
  and printed to terminals (where escape sequences act): no control character but newline and
  tab, and no byte that was not UTF-8 (read as a lone surrogate).
* **Numbers** read from JSON must be finite: Python's reader takes ``NaN``, ``Infinity`` and
  ``1e309`` (infinity), which Postgres' JSON and every comparison then mishandle.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .settings import ConfigurationError

# Letters and digits first (so never "." or ".."), then letters, digits and _.:@+=- ; at most 200.
# Checked with re.fullmatch (a "$" alone would let a trailing newline through); the DAG Params
# carry the same pattern in their JSON schema.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,199}$"
ID_RULE = "letters, digits and _.:@+=-, starting with a letter or digit, at most 200 characters"
_ID = re.compile(ID_PATTERN)

# C0 controls but tab and newline, DEL, C1 controls (U+0080-U+009F: U+009B starts a terminal
# escape as ESC [ does), and lone surrogates (bytes of the input that were not UTF-8).
_FORBIDDEN_CHAR = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


class InvalidValue(ConfigurationError):
    """A value breaks one of the rules; ``field`` names where (``question``, ``steps[2]``).  Where
    it escapes a stage (an id given to a DAG run) it is a configuration error: never retried."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid id, or None when it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if _ID.fullmatch(value) is None:
        return f"{escape_text(value, 80)} is not a valid id ({ID_RULE})"
    return None


def check_id(value: object, field: str = "id") -> str:
    """``value`` when it is a valid id; :class:`InvalidValue` naming ``field`` otherwise."""
    problem = id_problem(value)
    if problem:
        raise InvalidValue(field, problem)
    return value  # type: ignore[return-value]


def text_problem(value: str) -> str | None:
    """Why ``value`` may not be stored or shown as text, or None when it may."""
    bad = _FORBIDDEN_CHAR.search(value)
    if bad is None:
        return None
    char = bad.group()
    what = "a byte that is not UTF-8" if 0xD800 <= ord(char) <= 0xDFFF else (
        "a NUL character" if char == "\x00" else f"the control character U+{ord(char):04X}")
    return f"contains {what} at position {bad.start()} (only newline and tab are allowed)"


def find_bad_value(obj: Any, field: str = "") -> InvalidValue | None:
    """The first text (key or value) or number anywhere in the JSON value ``obj`` that breaks the
    rules, as an :class:`InvalidValue` naming its place (``notes.tags[1]``); None when all pass.
    Iterative, so nesting depth costs no stack."""
    stack: list[tuple[str, Any]] = [(field, obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return InvalidValue(where or "<record>", problem)
        elif isinstance(value, float):
            if not math.isfinite(value):
                return InvalidValue(where or "<record>", f"is {value!r}: numbers must be finite")
        elif isinstance(value, dict):
            for key in value:
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    return InvalidValue(f"{where}.<key>" if where else "<key>", problem)
            stack.extend((f"{where}.{key}" if where else str(key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


# How a forbidden character can reach a string parsed from JSON text (the strict reader refuses
# raw C0 controls): as an escape of one (\\u001b, or the short \\b, \\f and \\r), as a raw DEL or
# C1 character (UTF-8 C2 80-9F), or as an encoded surrogate (ED A0-BF: json.loads decodes bytes
# with "surrogatepass").  Each pattern starts with a literal byte: a clean text costs a fast scan.
_ESCAPED_FORBIDDEN = re.compile(rb"\\(?:u(?:00[0189][0-9a-fA-F]|007[fF]|[dD][89abAB])|[bfr])")
_RAW_FORBIDDEN = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xed[\xa0-\xbf]")


def load_json(data: bytes) -> tuple[Any, InvalidValue | None]:
    """``json.loads(data)`` and the first value in it that breaks the rules (see
    :func:`find_bad_value`), or None.  The walk runs only when the text holds something suspect
    (a non-finite number, an escape of a control character), so clean records (nearly all) cost a
    scan of the text, not a walk of every string."""
    suspect = False

    def number(text: str) -> float:
        nonlocal suspect
        value = float(text)
        suspect = suspect or not math.isfinite(value)  # 1e309
        return value

    def constant(name: str) -> float:  # NaN, Infinity, -Infinity
        nonlocal suspect
        suspect = True
        return float(name)

    parsed = json.loads(data, parse_float=number, parse_constant=constant)
    if suspect or _ESCAPED_FORBIDDEN.search(data) or _RAW_FORBIDDEN.search(data):
        return parsed, find_bad_value(parsed)
    return parsed, None


def escape_text(value: str, limit: int = 200) -> str:
    """``value`` quoted with every control character escaped (``'a\\x00b'``), cut to ``limit``:
    safe to print to a terminal and to put in a one-line error."""
    text = ascii(value) if _FORBIDDEN_CHAR.search(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
