"""Argument checks shared by the public entry points (each raises before any work, naming the argument)."""
from __future__ import annotations

import operator


def int_at_least(value, name: str, minimum: int = 0) -> int:
    """value as an int (a Python or NumPy integer, not a bool) >= minimum, else a ValueError naming it."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return operator.index(value)
