"""What the commands that take a model share: their arguments (``MODEL_HELP``, the
``add_*`` adders), the checks before any loading and the loading itself, with the
forward options their flags ask for.

It sits a layer below the command modules (docs/architecture.md: layer 5, with the tools),
so that a tool that registers its own command can use it as the commands do."""

from __future__ import annotations

import argparse

from mlakit.errors import MlakitError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "a Hugging Face directory, an mlakit checkpoint directory, a .gguf file, or 'default' (SmolLM2-135M)"


# ------------------------------------------------------------------ arguments
def add_device_args(parser: argparse.ArgumentParser, default_device: str | None = None) -> None:
    parser.add_argument("--device", default=default_device,
                        help="cpu or cuda (default: cuda when available)" if default_device is None
                        else f"cpu or cuda (default: {default_device})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")


def _runtime_rank(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rank (integer) or 'auto', got {text!r}") from None


def add_runtime_rank_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime-rank", type=_runtime_rank, default=None, metavar="R",
                        help="MLA: keep only the first R latent channels per layer (a smaller cache; best on "
                             "checkpoints healed with --elastic-ranks). 'auto': R by the request's length "
                             "(prompt + new tokens; eval: its window): full rank up to 4096 tokens, then the "
                             "rank whose cache matches full rank's at 4096, at least a quarter of the full "
                             "rank (mlakit.elastic.auto_latent_rank, docs/sparse.md)")


KV_CACHE_HELP = ("store the KV cache (MLA: the latent; the RoPE key stays 16-bit unless the format ends in +rope) "
                 "in this format: bf16/fp16 as they are, fp8/int8/int4 quantised per token in groups of channels "
                 "with float32 scales; fp8+rope/int8+rope/int4+rope (MLA): the RoPE key quantised too "
                 "(default: the model's dtype)")


def add_kv_cache_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from mlakit.quant import KV_CACHE_CHOICES

    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_CHOICES, metavar="DTYPE",
                        help=KV_CACHE_HELP)


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sparse-topk", type=int, default=None, metavar="K",
                        help="MLA: top-K sparse attention: each query attends to the K cache slots of best index "
                             "score plus --sparse-window recent and --sparse-sink first ones (docs/sparse.md); "
                             "generate: the decode steps (the prompt is prefilled dense); eval: every position "
                             "(a masked dense computation, exact but not fast)")
    parser.add_argument("--sparse-window", type=int, default=64, help="with --sparse-topk: recent slots always kept "
                                                                      "(default 64)")
    parser.add_argument("--sparse-sink", type=int, default=4, help="with --sparse-topk: first slots always kept "
                                                                   "(default 4)")
    parser.add_argument("--sparse-index-rank", type=int, default=64,
                        help="with --sparse-topk: latent channels of the index score, plus the RoPE key (default 64)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """How a command runs the model it loads: --device/--dtype, --runtime-rank, --kv-cache-dtype, --sparse-*."""
    add_device_args(parser)
    add_runtime_rank_arg(parser)
    add_kv_cache_dtype_arg(parser)
    add_sparse_args(parser)


# ------------------------------------------------------------------ checks, loading, options
def check_model_args(args: argparse.Namespace) -> None:
    """What every command that loads a model checks first (before any loading)."""
    from mlakit import checks

    checks.model_ref(args.model)
    checks.device(getattr(args, "device", None))
    rank = getattr(args, "runtime_rank", None)
    checks.at_least(None if rank == "auto" else rank, "--runtime-rank", 1)
    if getattr(args, "sparse_topk", None) is not None:  # the numbers; whether the model is MLA, once loaded
        checks.at_least(args.sparse_topk, "--sparse-topk", 1)
        checks.at_least(args.sparse_window, "--sparse-window", 0)
        checks.at_least(args.sparse_sink, "--sparse-sink", 0)
        checks.at_least(args.sparse_index_rank, "--sparse-index-rank", 1)


def load_model(args: argparse.Namespace):
    """The ``LoadedModel`` that ``args.model`` names, on --device in --dtype, at --runtime-rank."""
    import torch

    from mlakit import checks
    from mlakit.loading import load

    device = checks.device(getattr(args, "device", None))
    dtype_name = getattr(args, "dtype", None) or ("bfloat16" if device.startswith("cuda") else "float32")
    loaded = load(args.model, dtype=getattr(torch, dtype_name), device=device)
    if getattr(args, "runtime_rank", None) == "auto":  # the rank for this request's context length
        from mlakit.elastic import auto_latent_rank

        args.runtime_rank = auto_latent_rank(loaded.model, _context_length(args, loaded.tokenizer))
    if getattr(args, "runtime_rank", None) is not None:  # an elastic checkpoint at a smaller cache
        from mlakit.elastic import truncate_latent_rank

        ranks = loaded.model.config.kv_lora_ranks() if loaded.model.config.is_mla else []
        if ranks and args.runtime_rank > max(ranks):
            raise MlakitError(f"--runtime-rank {args.runtime_rank} is larger than the latent rank of {args.model} "
                              f"({max(ranks)}); give at most {max(ranks)}")
        loaded.model = truncate_latent_rank(loaded.model, args.runtime_rank)
        loaded.source = f"{loaded.source} (runtime rank {args.runtime_rank})"
    return loaded


def _context_length(args: argparse.Namespace, tokenizer) -> int:
    """Tokens a request spans (``--runtime-rank auto``): the prompt plus the new tokens for
    generate; the protocol's window for eval."""
    if getattr(args, "prompt", None) is None:
        from mlakit.evaluate import EVAL_WINDOW_LEN

        return EVAL_WINDOW_LEN
    if tokenizer is None:
        raise MlakitError(f"{args.model} has no tokenizer (pip install transformers, or add tokenizer files)")
    return len(tokenizer(args.prompt).input_ids) + args.max_new_tokens


def forward_options(args: argparse.Namespace, model):
    """``ForwardOptions`` from the --kv-cache-dtype and --sparse-* flags (the default where none is given)."""
    from mlakit.options import ForwardOptions

    cache = ForwardOptions.for_cache(getattr(args, "kv_cache_dtype", None))
    if cache.quantize_rope and not model.config.is_mla:
        raise MlakitError(f"--kv-cache-dtype {args.kv_cache_dtype}: +rope quantises MLA's shared RoPE key; this "
                          f"model has per-head keys (use {cache.kv_cache_dtype}, or convert it: mlakit convert)")
    if getattr(args, "sparse_topk", None) is None:
        return cache
    if not model.config.is_mla:
        raise MlakitError("--sparse-topk needs an MLA model (convert it first: mlakit convert)")
    return cache.replace(sparse_topk=args.sparse_topk, sparse_window=args.sparse_window,
                         sparse_sink=args.sparse_sink, sparse_index_rank=args.sparse_index_rank)
