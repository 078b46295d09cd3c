"""``mlakit bench``: the benchmark group. Like every command module it has ``register``
(the subcommand and its benchmarks) and ``run_from_args`` (run the benchmark named on the
command line); each benchmark module has the same pair one level down."""

from __future__ import annotations

import argparse


def _benchmarks() -> dict:
    """The benchmarks by name, in the order ``mlakit bench --help`` lists them."""
    from mlakit.bench import attention, e2e

    return {"attention": attention, "e2e": e2e}


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` and its benchmarks to the ``mlakit`` subcommands (``build_parser``'s ``sub``)."""
    bench = subparsers.add_parser("bench", help="benchmarks on the protocol of ../shared/PROTOCOL.md (GPU)")
    benchmarks = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for module in _benchmarks().values():
        module.register(benchmarks)
    bench.set_defaults(func=run_from_args)
    return bench


def run_from_args(args: argparse.Namespace) -> int:
    return _benchmarks()[args.bench].run_from_args(args)
