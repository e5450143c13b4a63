"""What the commands share: the one-line failure and the argument types that reject bad
numbers as usage errors (exit 2) before any work starts."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A failure the command reports in one line (exit 1), without a traceback."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


__all__ = ["CommandError", "positive_float", "positive_int"]
