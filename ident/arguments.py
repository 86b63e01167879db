"""argparse types shared by the ident commands."""

from __future__ import annotations

import argparse


def count(least: int):
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return value

    return parse


def counts(least: int):
    """An argparse type: a comma list of whole numbers, each at least ``least``."""
    parse_one = count(least)

    def parse(text: str) -> list[int]:
        values = [parse_one(part.strip()) for part in text.split(",")]
        if len(set(values)) != len(values):
            # Each value is one point of the sweep (and of its chart).
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value; give each one once")
        return values

    return parse
