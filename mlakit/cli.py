"""The ``mlakit`` command: thin subcommands that parse, call one function, print.

Every subcommand lives in a command module with the same two functions,
``register(subparsers)`` (adds its subparser, ``func=run_from_args``) and
``run_from_args(args) -> int``; ``COMMANDS`` lists them, in the order ``mlakit --help``
shows. Here: the parser over them, and ``main``, which turns every error a user can cause
into one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mlakit import frontier
from mlakit.bench import cli as bench_cli
from mlakit.commands import convert, demo, evaluate, generate, info
from mlakit.errors import MlakitError
from mlakit.export import cli as export_cli
from mlakit.heal import cli as heal_cli

# the command modules: a new subcommand is one more module here
COMMANDS = (generate, info, evaluate, convert, demo, heal_cli, export_cli, bench_cli, frontier)


class Parser(argparse.ArgumentParser):
    """argparse's parser with mlakit's error line: a bad argument (unknown flag, invalid choice,
    a number that is not one, a missing one) is one line naming it and the command's help,
    as every other error is, instead of the usage block; exit status 2 as argparse's.
    The subcommands' parsers are of this class too (argparse makes them of the parent's)."""

    def error(self, message: str):
        self.exit(2, f"mlakit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mlakit",
        description="Multi-Head Latent Attention (MLA) for Llama-family models: run, inspect, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``argv`` names, e.g. ``bench attention``'s."""
    for token in argv:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands:
            break
        parser = commands[0].choices.get(token, parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's parse_args names the top-level help here, which does not list them
        _command_parser(parser, sys.argv[1:] if argv is None else argv).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except MlakitError as e:
        print(f"mlakit: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad numbers that argparse could not see (e.g. top-p 2)
        print(f"mlakit: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mlakit info ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs advise
        return 1
    except Exception as e:  # out of memory reads better as one line than a traceback
        if type(e).__name__ == "OutOfMemoryError":
            print(f"mlakit: error: out of memory: {e}".splitlines()[0], file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
