"""Argument checks shared by the public entry points (each raises before any work, naming the argument)."""
from __future__ import annotations

import operator


def ids_in_vocab(ids, vocab: int, name: str, whose: str = "the model's"):
    """Token ids in [0, vocab), else a ValueError naming them (an embedding lookup's IndexError names
    nothing)."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name}: expected ids in [0, {vocab}) ({whose} vocabulary), got [{lo}, {hi}]")
    return ids


def int_at_least(value, name: str, minimum: int = 0) -> int:
    """value as an int (a Python or NumPy integer, not a bool) >= minimum, else a ValueError naming it."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return operator.index(value)
