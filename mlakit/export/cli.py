"""``mlakit export``: the subcommand's arguments (``register``) and its one call (``run_from_args``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlakit.errors import MlakitError

FORMATS = ("hf-deepseek", "gguf")
MODEL_HELP = "an MLA model: a Hugging Face directory, an mlakit checkpoint directory, or a .gguf file"


def check_args(args: argparse.Namespace) -> None:
    """Arguments, inputs and the output location, before any loading."""
    from mlakit import checks

    checks.model_ref(args.model)
    if checks.attention_kind(args.model) == "other":  # before a load of minutes: the loaded model is checked too
        raise MlakitError(f"export needs an MLA model; {args.model} is not one (convert it to MLA first: "
                          "mlakit convert)")
    if args.format == "hf-deepseek" and (args.type is not None or args.tokenizer_gguf is not None):
        raise MlakitError("--type and --tokenizer-gguf are for --format gguf (use --dtype for hf-deepseek)")
    if args.format == "gguf" and args.dtype is not None:
        raise MlakitError("--dtype is for --format hf-deepseek (use --type for gguf)")
    if args.format != "gguf" and args.quantised_cache:
        raise MlakitError("--quantised-cache is for --format gguf (llama.cpp's q8_0 / q4_0 cache)")
    if args.tokenizer_gguf is not None:
        from mlakit.loading import check_gguf_header

        check_gguf_header(checks.readable_file(args.tokenizer_gguf, "--tokenizer-gguf"))
    checks.output(args.output, args.overwrite, directory=args.format == "hf-deepseek")


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit.io import output_lock

    check_args(args)
    with output_lock(args.output):  # held from the load to the rename: a second export fails at once
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    import torch

    from mlakit.io import check_output
    from mlakit.loading import default_model_path, load

    out = Path(args.output)
    check_output(out, args.overwrite, directory=args.format == "hf-deepseek")
    loaded = load(args.model, dtype=torch.float32, device="cpu")
    if args.format == "hf-deepseek":
        from mlakit.export.hf_deepseek import export_hf_deepseek

        form = export_hf_deepseek(loaded.model, out, tokenizer=loaded.tokenizer, dtype=args.dtype or "float32",
                                  overwrite=args.overwrite)
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    else:
        from mlakit.export.gguf import export_gguf

        tokenizer_gguf = args.tokenizer_gguf
        if tokenizer_gguf is None and str(args.model) == "default":
            tokenizer_gguf = default_model_path()
        elif tokenizer_gguf is None and str(args.model).endswith(".gguf"):
            tokenizer_gguf = args.model
        from mlakit.export.engines import LLAMACPP_QUANT_BLOCK

        form = export_gguf(loaded.model, out, qtype=args.type or "f32", tokenizer_gguf=tokenizer_gguf,
                           tokenizer=loaded.tokenizer, name=Path(str(args.model)).name, overwrite=args.overwrite,
                           cache_block=LLAMACPP_QUANT_BLOCK if args.quantised_cache else 1)
        size = out.stat().st_size
    from mlakit.export.engines import engines_for

    engines = [fit for fit in engines_for(loaded.model.config) if fit.format == args.format]
    summary = {"output": str(out), "format": args.format, "bytes": size, "notes": form.notes,
               "linearised_norm_bound": form.linearised_bound, "engines": [fit.to_dict() for fit in engines]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.format})")
        for note in form.notes:
            print(f"  - {note}")
        print("engines:\n" + "\n".join(f"  {fit.line()}" for fit in engines))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``export`` to the ``mlakit`` subcommands (``build_parser``'s ``sub``)."""
    parser = subparsers.add_parser(
        "export", help="write an MLA model as a DeepSeek-V3 HF directory or a deepseek2 GGUF file",
        description="Export an MLA model for engines with no custom code: a stock DeepSeek-V3 Hugging Face "
                    "directory (transformers; vLLM for head sizes 576 / 320 only) or a GGUF file of architecture deepseek2 "
                    "(llama.cpp). Afterwards it prints which engines run the export and where. "
                    "The model's function is kept exactly (see docs/export.md); what cannot be represented is "
                    "refused with a message.")
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS, help="hf-deepseek (a directory) or gguf (a file)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="the directory or .gguf file to write")
    parser.add_argument("--type", choices=("f32", "f16", "q8_0"), default=None,
                        help="gguf: tensor type (default f32; norms and attn_kv_a_mqa stay f32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="hf-deepseek: weights dtype (default float32; float16 cannot hold the exact rewrite)")
    parser.add_argument("--tokenizer-gguf", default=None, metavar="FILE",
                        help="gguf: copy the tokenizer from this GGUF file (default: MODEL itself when it is a "
                             ".gguf file or 'default'; otherwise the model's byte-level BPE tokenizer)")
    parser.add_argument("--quantised-cache", action="store_true",
                        help="gguf: pad the latent and the RoPE key with zero channels to multiples of 32 (exact; "
                             "the cache grows), as llama.cpp needs to store the cache as q8_0 / q4_0 (type_k = "
                             "type_v); without it such a model loads with a 16/32-bit cache only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_from_args)
    return parser
