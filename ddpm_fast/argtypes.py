"""argparse ``type=`` converters shared by the ``ddpm-fast`` subcommands.

Each turns a bad value into an ``argparse.ArgumentTypeError``, which argparse prints as one line
(``ddpm-fast train: error: argument --steps: expected a positive integer, got '0'``).
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "nonnegative_int", "positive_float", "positive_int_list"]


def _int_at_least(text: str, minimum: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An int >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """A float > 0 (finite or not: callers that care check further)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated ints >= 1, e.g. ``1,64,512``."""
    wanted = "comma-separated positive integers (e.g. 1,64,512)"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
    return values
