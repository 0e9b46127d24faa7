"""Small value checks the config sections share (a leaf: the sections import it, it imports nothing)."""

from __future__ import annotations

from typing import Any


def at_least(section: Any, name: str, low: float, must: str) -> list[tuple[str, str]]:
    """[(name, "name=value must be <must>")] when the field `name` of `section` is below `low`, else []."""
    value = getattr(section, name)
    return [(name, f"{name}={value} must be {must}")] if value < low else []
