"""``mlakit demo``: the main job (convert the default model, evaluate both, print a table)."""

from __future__ import annotations

import argparse

from mlakit.commands.convert import add_budget_args, convert_options


def register(subparsers) -> argparse.ArgumentParser:
    demo = subparsers.add_parser("demo", help="the main job: convert the default model, evaluate both, print a table",
                                 description="Convert the default model at a default budget, evaluate original and "
                                             "converted on wikitext2-smollm2-v1 (512-token windows) and the "
                                             "long-window ppl of longctx-smollm2-v1 (5 x 4096 tokens), print KV "
                                             "bytes, saving, both ppl and samples; --passkey adds passkey-v1.")
    add_budget_args(demo)
    demo.add_argument("-o", "--output", metavar="OUT", default=None, help="also save the converted checkpoint")
    demo.add_argument("--passkey", action="store_true",
                      help="also run passkey-v1 (60 greedy generations at 1024/4096/7680 tokens per model; "
                           "tens of minutes per model on a 2-core CPU, where the demo runs; the original's "
                           "result is cached after the first run)")
    demo.set_defaults(func=run_from_args)
    return demo


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit import checks
    from mlakit.convert.demo import main_job

    options = convert_options(args)
    options.check()
    if args.output is not None:
        checks.output(args.output, overwrite=True, directory=True)
    main_job(options, out=args.output, passkey=args.passkey)
    return 0
