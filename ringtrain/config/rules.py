"""Small value checks the config sections share (a leaf: the sections import it, it imports nothing)."""

from __future__ import annotations

from typing import Any


def at_least(section: Any, name: str, low: float, must: str) -> list[tuple[str, str]]:
    """[(name, "name=value must be <must>")] when the field `name` of `section` is below `low`, else []."""
    value = getattr(section, name)
    return [(name, f"{name}={value} must be {must}")] if value < low else []


def one_of(section: Any, name: str, choices: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """[(name, "name='value' is not one of a, b, c")] when the field `name` of `section` is not among `choices`."""
    value = getattr(section, name)
    return [] if value in choices else [(name, f"{name}={value!r} is not one of {', '.join(choices)}")]
