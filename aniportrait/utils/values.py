"""Checks for the values users type (config keys, CLI options, API arguments, batch cells).

Each returns the value in its proper type or raises :class:`AniPortraitError` with one message that names the key,
repeats the value and states the allowed range, e.g. ``steps=0: give a whole number >= 1``. Text that spells a
number (a Hydra or CSV cell, "25") is accepted; booleans are never numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from aniportrait.errors import AniPortraitError

__all__ = ["integer", "number", "choice", "boolean"]


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _range(minimum: float | None, maximum: float | None, exclusive_minimum: bool = False) -> str:
    low = None if minimum is None else f"{'>' if exclusive_minimum else '>='} {_show(minimum)}"
    high = None if maximum is None else f"<= {_show(maximum)}"
    if low and high:
        return f"{low} and {high}"
    return low or high or "a finite value"


def _parse(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return value
    return value


def integer(key: str, value: Any, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """A whole number in [minimum, maximum]; ``hint`` (", -1 for no limit") is added to the message."""
    parsed = _parse(value)
    is_whole = isinstance(parsed, numbers.Integral) or (
        isinstance(parsed, numbers.Real) and math.isfinite(parsed) and float(parsed).is_integer())
    if isinstance(parsed, bool) or not is_whole:
        raise AniPortraitError(f"{key}={value!r}: give a whole number {_range(minimum, maximum)}{hint}")
    result = int(parsed)
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        raise AniPortraitError(f"{key}={value!r}: give a whole number {_range(minimum, maximum)}{hint}")
    return result


def number(key: str, value: Any, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: bool = False, hint: str = "") -> float:
    """A finite number in its range (``exclusive_minimum``: strictly above ``minimum``)."""
    parsed = _parse(value)
    try:
        result = float(parsed) if isinstance(parsed, numbers.Real) and not isinstance(parsed, bool) else math.nan
    except (TypeError, ValueError):
        result = math.nan
    below = minimum is not None and (result <= minimum if exclusive_minimum else result < minimum)
    above = maximum is not None and result > maximum
    if not math.isfinite(result) or below or above:
        raise AniPortraitError(f"{key}={value!r}: give a number {_range(minimum, maximum, exclusive_minimum)}{hint}")
    return result


def choice(key: str, value: Any, options: Iterable[Any]) -> Any:
    options = list(options)
    if value not in options:
        raise AniPortraitError(f"{key}={value!r}: choose one of {', '.join(str(option) for option in options)}")
    return value


def boolean(key: str, value: Any) -> bool:
    """true/false (also the text spellings a CSV cell or an environment variable carries)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise AniPortraitError(f"{key}={value!r}: give true or false")
