"""Argument checks shared by the zoo's constructors."""

from __future__ import annotations

from typing import Any


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1 (bools refused), else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be an integer >= 1, got {value!r}"
        raise ValueError(msg)
    return value


def flag(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError naming ``name``."""
    if not isinstance(value, bool):
        msg = f"{name} must be true or false, got {value!r}"
        raise ValueError(msg)
    return value
