"""Readers for values of an untrusted config.json: each checks its value's type and range and raises a one-line
UserError naming the key."""

from __future__ import annotations

import math

from lmtrain.core.errors import UserError

MAX_SIZE = 1 << 31  # no model dimension is larger (the bound model.json is checked by)


def size(hf: dict, key: str, default: int | None = None) -> int:
    """config.json's `key`: an integer in 1..MAX_SIZE (KeyError when missing without a default)."""
    value = hf[key] if default is None else hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
        raise UserError(f"config.json: {key} must be an integer in 1..{MAX_SIZE}, got {value!r}")
    return value


def positive(hf: dict, key: str, default: float | None = None) -> float:
    """config.json's `key`: a finite number > 0 (KeyError when missing without a default)."""
    value = hf[key] if default is None else hf.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UserError(f"config.json: {key} must be a number > 0, got {value!r}")
    return float(value)


def need(hf: dict, key: str, expected, why: str) -> None:
    """UserError unless config.json's `key` is absent or equals `expected` (the only setting lmtrain implements)."""
    value = hf.get(key, expected)
    if value != expected:
        raise UserError(f"config.json: {key}={value!r} is not supported ({why})")
