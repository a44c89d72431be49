"""Argument checks shared by the public entry points (one message format for every integer argument)."""

from __future__ import annotations

import numbers


def check_int(value: object, name: str, high: int | None = None, positive: bool = True, hint: str = "") -> int:
    """``value`` as an int if it is an integer (NumPy's too, not a bool), positive unless ``positive``
    is False and at most ``high``, else a ValueError naming ``name`` (and ``hint``, what it is for)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or (positive and value < 1)
            or (high is not None and value > high)):
        what = ("an integer" if not positive else f"an integer from 1 to {high}" if high is not None
                else "a positive integer")
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {value!r}")
    return int(value)
