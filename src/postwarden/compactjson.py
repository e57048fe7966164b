"""JSON of the records written for every message: the queue's parameter
columns and the hand-over lines from worker processes to the main one.

orjson encodes and decodes these small records in a fraction of the
standard library's time (a queue commit encodes three of them).  What
orjson refuses goes to the standard library, which reads and writes it as
it always did: a string holding a lone surrogate (written as a ``\\udcXX``
escape, which orjson does not read back), an integer beyond 64 bits.
Output is compact (no spaces) and, from orjson, UTF-8 rather than ASCII
escapes; both forms read back the same.

Security exposure: parses records this server wrote (queue rows, pipes
between its own processes); a value that does not parse raises ValueError.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """``value`` as compact JSON text."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"))


def loads(data: str | bytes) -> Any:
    """The value of JSON text; ValueError when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
