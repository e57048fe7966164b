"""Typed reading of one TOML table of the config file, for the sections
whose settings live next to their module (``onboard``, ``observe``).

Each function takes the table, a key and its default, and returns the value
or raises ``ValueError("KEY: reason")``; :mod:`postwarden.config` prefixes
the section and turns it into a :class:`~postwarden.config.ConfigError`.

Security exposure: none (validation of the administrator's file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def unknown(table: Mapping[str, Any], allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            raise ValueError(f"{k}: unknown key")


def boolean(table: Mapping[str, Any], key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}: must be true or false")
    return value


def string(table: Mapping[str, Any], key: str, default: str = "") -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value.isprintable():
        raise ValueError(f"{key}: must be a string")
    return value


def number(table: Mapping[str, Any], key: str, default: float, *, minimum: float = 0,
           integer: bool = False) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number")
    if integer and not isinstance(value, int):
        raise ValueError(f"{key}: must be a whole number")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}")
    return value


def port(table: Mapping[str, Any], key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{key}: must be a port number 0-65535")
    return value


def duration(table: Mapping[str, Any], key: str, default: float) -> float:
    """Seconds, as a number or ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``."""
    value = table.get(key, default)
    if isinstance(value, str):
        text = value.strip().lower()
        unit = UNITS.get(text[-1:]) if text else None
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a duration (e.g. 900, \"15m\", "
                             "\"1h\", \"7d\")") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(f"{key}: must be a duration (e.g. 900, \"15m\", \"1h\", \"7d\")")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{key}: must be a positive duration")
    return seconds
