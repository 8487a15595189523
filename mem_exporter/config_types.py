"""The value types config keys take (sizes, durations, ratios) as pydantic types.

Shared by config.py and the rule conditions (enforcer/conditions.py), which declare their own keys.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from .units import parse_duration, parse_ratio, parse_size


def _size_or_ratio(value: Any) -> float | int:
    """`10%` or a float below 1 is a ratio of total memory; anything else is a size in bytes."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return parse_ratio(value)
    if isinstance(value, float) and 0 < value < 1:
        return value
    return parse_size(value)


_SIZE_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\s*[0-9.]+\s*[a-zA-Z]*\s*$"}],
    "description": "bytes, or a number with a unit: 800MB, 1.5GiB",
}
_DURATION_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\s*[0-9.]+\s*(ms|s|m|min|h)?\s*$"}],
    "description": "seconds, or a number with a unit: 500ms, 2s, 1m",
}
_RATIO_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "string", "pattern": r"^\s*[0-9.]+\s*%\s*$"}],
    "description": "a ratio 0..1 or a percentage: 0.1, 10%",
}

Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
Ratio = Annotated[float, BeforeValidator(parse_ratio), WithJsonSchema(_RATIO_SCHEMA)]
SizeOrRatio = Annotated[
    float,
    BeforeValidator(_size_or_ratio),
    WithJsonSchema(
        {"anyOf": [_SIZE_SCHEMA, _RATIO_SCHEMA], "description": "a size (800MB) or a share of total memory (10%)"}
    ),
]
