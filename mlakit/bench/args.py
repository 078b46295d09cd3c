"""Argument types shared by the bench commands."""

from __future__ import annotations

import argparse
from typing import List, Tuple


def parse_grid(text: str) -> List[Tuple[int, int]]:
    """``1x8192,16x8192`` -> [(1, 8192), (16, 8192)]: (batch, context) pairs."""
    grid = []
    try:
        for item in text.split(","):
            batch, context = item.lower().split("x")
            grid.append((int(batch), int(context)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be BATCHxCONTEXT pairs like 1x8192,16x8192, got {text!r}") from None
    for batch, context in grid:  # a row of zero or negative size would only fail when it runs
        if batch < 1 or context < 1:
            raise argparse.ArgumentTypeError(f"grid's batch and context must be >= 1, got {batch}x{context}")
    return grid
