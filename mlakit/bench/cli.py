"""``mlakit bench``: the benchmark group; each benchmark module registers its own command."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` and its benchmarks to the ``mlakit`` subcommands (``build_parser``'s ``sub``)."""
    from mlakit.bench import attention, e2e

    bench = subparsers.add_parser("bench", help="benchmarks on the protocol of ../shared/PROTOCOL.md (GPU)")
    benchmarks = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    attention.register(benchmarks)
    e2e.register(benchmarks)
    return bench
