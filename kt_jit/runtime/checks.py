"""Argument checks shared by the public entry points (one message format for every integer argument)."""

from __future__ import annotations

import math
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


def check_real(value: object, name: str, positive: bool = False, hint: str = "") -> float:
    """``value`` as a float if it is a finite real number (NumPy's too, not a bool), above 0 when
    ``positive``, else a ValueError naming ``name`` (and ``hint``, what it is for)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (positive and not value > 0)):
        what = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{name} must be {what}{f' ({hint})' if hint else ''}, got {value!r}")
    return float(value)
