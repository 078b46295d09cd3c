"""``mlakit eval``: the quality protocols on one model."""

from __future__ import annotations

import argparse
import json

from mlakit.commands.common import MODEL_HELP, add_run_args, check_model_args, forward_options, load_model


def register(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="quality on the protocols (wikitext2, long context, out-of-domain text)",
                               description="Quality protocols of PROTOCOL.md and docs/protocols.md. wikitext2: "
                                           "wikitext2-smollm2-v1, 40 windows x 512 tokens from token 131072 of "
                                           "wikitext-2 test, each from an empty cache; ppl = exp(mean NLL). longctx: "
                                           "longctx-smollm2-v1, the same range as 5 windows x 4096 tokens (ppl, also "
                                           "by position) and passkey-v1 (20 trials at 1024, 4096 and 7680 tokens "
                                           "through the generation engine; tens of minutes on a 2-core CPU). ood: "
                                           "ood-smollm2-v1, ppl on fiction and expository prose "
                                           "(scripts/fetch_ood_text.py fetches the texts). all: every one. A Gemma 3 "
                                           "model runs the same protocols through its own tokenizer, named "
                                           "*-gemma3-270m-v1 (docs/protocols.md).")
    ev.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    ev.add_argument("--protocol", choices=("wikitext2", "longctx", "ood", "all"), default="wikitext2",
                    help="which protocols to run (default wikitext2)")
    ev.add_argument("--json", action="store_true",
                    help="print one JSON object (--protocol wikitext2: that result's fields; otherwise "
                         "{model, results: {protocol name: fields}})")
    add_run_args(ev)
    ev.set_defaults(func=run_from_args)
    return ev


def run_from_args(args: argparse.Namespace) -> int:
    check_model_args(args)
    from mlakit.protocols import evaluate_protocols, format_results, results_dict, selected

    selected(args.protocol)  # a bad choice fails before the model loads
    loaded = load_model(args)
    results = evaluate_protocols(loaded, args.protocol, progress=not args.json,
                                 options=forward_options(args, loaded.model))
    if not args.json:
        print("\n".join(format_results(results)))
    elif args.protocol == "wikitext2":  # the one-protocol object, as before --protocol existed
        print(json.dumps(next(iter(results.values())).to_dict()))
    else:
        print(json.dumps(results_dict(loaded.source, results)))
    return 0
