"""The ``mlakit`` command: thin subcommands that parse, call one function, print."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from mlakit.errors import MlakitError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "a Hugging Face directory, an mlakit checkpoint directory, a .gguf file, or 'default' (SmolLM2-135M)"


def _check_model_args(args: argparse.Namespace) -> None:
    """What every command that loads a model checks first (before any loading)."""
    from mlakit import checks

    checks.model_ref(args.model)
    checks.device(getattr(args, "device", None))
    rank = getattr(args, "runtime_rank", None)
    checks.at_least(None if rank == "auto" else rank, "--runtime-rank", 1)


def _load(args: argparse.Namespace):
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


def _forward_options(args: argparse.Namespace, model):
    """``ForwardOptions`` from the --kv-cache-dtype and --sparse-* flags (the default where none is given)."""
    from mlakit.options import ForwardOptions

    cache = ForwardOptions(kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
    if getattr(args, "sparse_topk", None) is None:
        return cache
    if not model.config.is_mla:
        raise MlakitError("--sparse-topk needs an MLA model (convert it first: mlakit convert)")
    return cache.replace(sparse_topk=args.sparse_topk, sparse_window=args.sparse_window,
                         sparse_sink=args.sparse_sink, sparse_index_rank=args.sparse_index_rank)


# ------------------------------------------------------------------ generate
def _check_sampling(args: argparse.Namespace) -> None:
    from mlakit import checks

    checks.at_least(args.max_new_tokens, "--max-new-tokens", 1)
    checks.finite(args.temperature, "--temperature", 0.0, low_open=not args.greedy)
    checks.finite(args.top_p, "--top-p", 0.0, 1.0, low_open=True)
    checks.at_least(args.top_k, "--top-k", 1)
    checks.at_least(args.seed, "--seed", 0)


def cmd_generate(args: argparse.Namespace) -> int:
    from mlakit import checks

    _check_model_args(args)
    _check_sampling(args)
    args.prompt = checks.prompt(args.prompt, args.prompt_file)
    if not args.prompt:
        raise MlakitError("the prompt is empty")
    job = _tensor_parallel_job(args) if args.tensor_parallel else None
    try:
        return _generate(args, job)
    finally:
        if job is not None:
            from mlakit import parallel

            parallel.shutdown()


def _tensor_parallel_job(args: argparse.Namespace):
    """``--tensor-parallel``: join torchrun's job; only rank 0 prints (the others' stdout is muted)."""
    from mlakit import parallel

    if "RANK" not in os.environ:
        raise MlakitError("--tensor-parallel runs under torchrun: torchrun --nproc-per-node N -m mlakit generate ...")
    from mlakit import checks

    job = parallel.init(checks.device(getattr(args, "device", None)))
    if not job.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of this process)
    return job


def _generate(args: argparse.Namespace, job) -> int:
    from mlakit.engine import SamplingParams, generate
    from mlakit.options import ForwardOptions

    loaded = _load(args)
    if job is not None:
        from mlakit.parallel import broadcast_object, parallelize_for_decode

        parallelize_for_decode(loaded.model, job.mesh)
        if not args.greedy and args.seed is None:  # every rank must draw the same tokens
            import random

            args.seed = broadcast_object(random.randrange(2 ** 31), job)
    if loaded.tokenizer is None:
        raise MlakitError(f"{args.model} has no tokenizer (pip install transformers, or add tokenizer files)")
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer(args.prompt).input_ids
    if not prompt_ids:
        raise MlakitError("the prompt is empty after tokenisation")
    longest = loaded.model.config.max_seq_len
    if len(prompt_ids) + args.max_new_tokens > longest:  # before anything is printed
        raise MlakitError(f"the prompt ({len(prompt_ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceed "
                          f"the model's context of {longest} tokens")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    generated: list[int] = []
    printed = ""

    def stream(step: list[int | None]) -> None:
        nonlocal printed
        if step[0] is None:
            return
        generated.append(step[0])
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not args.json and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    fast = args.compile and loaded.model.device.type == "cuda"
    if args.compile and not fast:
        # measured on the 2-core CPU box (default model): the compiled step was slower than eager
        print("mlakit: --compile is for CUDA GPUs; ignored on the CPU", file=sys.stderr)
    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    options = _forward_options(args, loaded.model)
    generate(loaded.model, [prompt_ids], params, on_step=stream, compile=fast, options=options)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"model": loaded.source, "prompt_ids": prompt_ids, "output_ids": generated,
                          "text": text}))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
    return 0


# ------------------------------------------------------------------ info
def model_info(model) -> dict:
    import torch

    from mlakit.cache import ModelCache

    config = model.config
    info = {
        "architecture": config.arch,
        "attention": config.gqa_variant,
        "parameters": model.num_parameters(),
        "layers": config.n_layers,
        "hidden": config.dim,
        "heads": config.n_heads,
        "vocab": config.vocab_size,
        "dtype": str(model.dtype).replace("torch.", ""),
        "kv_values_per_token": config.kv_values_per_token_total(),
    }
    if config.is_mla:
        ranks = config.kv_lora_ranks()
        info.update(kv_lora_rank=ranks[0] if len(set(ranks)) == 1 else ranks,
                    qk_rope_head_dim=config.qk_rope_head_dim, qk_nope_head_dim=config.qk_nope_head_dim,
                    v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank)
    else:
        info.update(kv_heads=config.n_kv_heads, head_dim=config.head_dim)
    for dtype in (model.dtype, torch.bfloat16):
        cache = model.new_cache(1, 1, dtype=dtype)
        info[f"kv_bytes_per_token_{str(dtype).replace('torch.', '')}"] = cache.bytes_per_token()
    for name in ("fp8", "int8", "int4"):  # values + float32 scales (+ the MLA RoPE key in bf16)
        cache = model.new_cache(1, 1, dtype=torch.bfloat16, kv_cache_dtype=name)
        info[f"kv_bytes_per_token_{name}"] = cache.bytes_per_token()
    if config.is_mla:  # which stock engines run `mlakit export` of it, and where (mlakit.export.engines)
        from mlakit.export.engines import engines_for

        info["engines"] = [fit.to_dict() for fit in engines_for(config)]
    return info


def cmd_info(args: argparse.Namespace) -> int:
    _check_model_args(args)
    loaded = _load(args)
    info = {"model": loaded.source, **model_info(loaded.model)}
    if args.json:
        print(json.dumps(info))
        return 0
    engines = info.pop("engines", None)
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    if engines:
        from mlakit.export.engines import EngineFit

        print("engines (mlakit export):\n" + "\n".join("  " + EngineFit(**e).line() for e in engines))
    return 0


# ------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    _check_model_args(args)
    from mlakit.protocols import evaluate_protocols, format_results, results_dict, selected

    selected(args.protocol)  # a bad choice fails before the model loads
    loaded = _load(args)
    results = evaluate_protocols(loaded, args.protocol, progress=not args.json,
                                 options=_forward_options(args, loaded.model))
    if not args.json:
        print("\n".join(format_results(results)))
    elif args.protocol == "wikitext2":  # the one-protocol object, as before --protocol existed
        print(json.dumps(next(iter(results.values())).to_dict()))
    else:
        print(json.dumps(results_dict(loaded.source, results)))
    return 0


# ------------------------------------------------------------------ convert
def _convert_options(args: argparse.Namespace, sweep: bool = False):
    from mlakit import checks
    from mlakit.convert import ConvertOptions

    if args.rope_frequencies == "both" and not sweep:
        raise MlakitError("--rope-frequencies both is for --sweep; a conversion takes free or deepseek")
    if args.rank_shape != "free" and sweep:
        raise MlakitError(f"--sweep varies --kv-saving; --rank-shape {args.rank_shape} fixes the budget")
    args.rope_frequencies = args.rope_frequencies or ("deepseek" if args.rank_shape == "vllm" else "free")
    checks.finite(args.kv_saving, "--kv-saving")
    if args.kv_saving is not None and args.kv_saving < 0:
        raise MlakitError(f"--kv-saving {args.kv_saving:g} asks for a cache larger than the original")
    if args.kv_saving is not None and not 0 < args.kv_saving < 1:
        raise MlakitError(f"--kv-saving must be a fraction of the cache in (0, 1), got {args.kv_saving:g}")
    checks.at_least(args.kv_lora_rank, "--kv-lora-rank", 1)
    checks.at_least(args.rope_dim, "--rope-dim", 0)
    if args.rope_dim is not None and args.rope_dim % 2:
        raise MlakitError(f"--rope-dim must be even, got {args.rope_dim}")
    from mlakit.evaluate import CALIB_RANGE

    calib = CALIB_RANGE[1] - CALIB_RANGE[0]
    if args.calib_tokens is not None and not 0 < args.calib_tokens <= calib:
        raise MlakitError(f"--calib-tokens: calibration tokens must be in [1, {calib}] (the protocol's range), "
                          f"got {args.calib_tokens}")
    return ConvertOptions(kv_saving=args.kv_saving, kv_lora_rank=args.kv_lora_rank, rope_dim=args.rope_dim,
                          rank_allocation=args.rank_allocation, calib_tokens=args.calib_tokens,
                          rank_shape=args.rank_shape,
                          rope_frequencies="free" if args.rope_frequencies == "both" else args.rope_frequencies,
                          progress=not getattr(args, "json", False))


def _savings(text: str) -> list[float]:
    try:
        savings = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MlakitError(f"--sweep takes comma-separated savings like 0.5,0.75, got {text!r}") from None
    if not savings:
        raise MlakitError(f"--sweep takes comma-separated savings like 0.5,0.75, got {text!r}")
    for saving in savings:
        if not 0 < saving < 1:  # NaN too
            raise MlakitError(f"--sweep savings must be fractions in (0, 1), got {saving:g}")
    return savings


def cmd_convert(args: argparse.Namespace) -> int:
    from mlakit import checks

    checks.model_ref(args.source, "SOURCE")
    device = checks.device(args.device or "cpu")
    options = _convert_options(args, sweep=args.sweep is not None)
    options.check()
    if args.sweep is not None:
        if args.report is None:
            raise MlakitError("--sweep needs --report DIR (where the table and the plot go)")
        savings = _savings(args.sweep)
        checks.report_dir(args.report)
        from mlakit.loading import load
        from mlakit.report import run_sweep, write_report

        import torch

        frequencies = ("free", "deepseek") if args.rope_frequencies == "both" else (args.rope_frequencies,)
        sweep = run_sweep(load(args.source, dtype=torch.float32, device=device), savings, options,
                          rope_frequencies=frequencies)
        for path in write_report(sweep, args.report):
            print(f"wrote {path}")
        return 0
    if args.output is None:
        raise MlakitError("give -o OUT (where the converted checkpoint goes), or --sweep with --report")
    if args.report is not None:
        raise MlakitError("--report is for --sweep; a conversion writes -o OUT")
    checks.output(args.output, args.overwrite, directory=True)
    from mlakit.convert.api import convert_checkpoint

    summary = convert_checkpoint(args.source, args.output, options, device=device, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"output": args.output, **summary.to_dict()}))
    else:
        print(f"wrote {args.output}")
        print("\n".join(summary.lines()))
    return 0


# ------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    from mlakit import checks
    from mlakit.convert.demo import main_job

    options = _convert_options(args)
    options.check()
    if args.output is not None:
        checks.output(args.output, overwrite=True, directory=True)
    main_job(options, out=args.output, passkey=args.passkey)
    return 0


# ------------------------------------------------------------------ parser
def _kv_cache_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from mlakit.quant import KV_CACHE_DTYPES

    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                        help="store the KV cache (MLA: the latent; the RoPE key stays 16-bit) in this format: "
                             "bf16/fp16 as they are, fp8/int8/int4 quantised per token in groups of channels with "
                             "float32 scales (default: the model's dtype)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlakit",
        description="Multi-Head Latent Attention (MLA) for Llama-family models: run, inspect, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate a continuation of --prompt, streaming tokens as they come.")
    gen.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt (UTF-8) from this file; - for stdin")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--json", action="store_true", help="print one JSON object (token ids and text) at the end")
    gen.add_argument("--compile", action="store_true",
                     help="CUDA: fast mode for long outputs: fused projections and a torch.compile'd decode "
                          "step (compiling takes ~20 s first); ignored on the CPU, where it is slower")
    gen.add_argument("--tensor-parallel", action="store_true",
                     help="under torchrun --nproc-per-node N: split query heads (GQA: and KV heads) and the MLP "
                          "over N GPUs (MLA: the latent cache is replicated on each); docs/distributed.md")
    _device_args(gen)
    _runtime_rank_arg(gen)
    _kv_cache_dtype_arg(gen)
    _sparse_args(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model: architecture, size, attention kind, KV bytes per token")
    info.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    _device_args(info, default_device="cpu")
    info.set_defaults(func=cmd_info)

    ev = sub.add_parser("eval", help="quality on the protocols (wikitext2, long context, out-of-domain text)",
                        description="Quality protocols of PROTOCOL.md and docs/protocols.md. wikitext2: "
                                    "wikitext2-smollm2-v1, 40 windows x 512 tokens from token 131072 of wikitext-2 "
                                    "test, each from an empty cache; ppl = exp(mean NLL). longctx: "
                                    "longctx-smollm2-v1, the same range as 5 windows x 4096 tokens (ppl, also by "
                                    "position) and passkey-v1 (20 trials at 1024, 4096 and 7680 tokens through the "
                                    "generation engine; tens of minutes on a 2-core CPU). ood: "
                                    "ood-smollm2-v1, ppl on fiction and expository prose (scripts/fetch_ood_text.py "
                                    "fetches the texts). all: every one.")
    ev.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    ev.add_argument("--protocol", choices=("wikitext2", "longctx", "ood", "all"), default="wikitext2",
                    help="which protocols to run (default wikitext2)")
    ev.add_argument("--json", action="store_true",
                    help="print one JSON object (--protocol wikitext2: that result's fields; otherwise "
                         "{model, results: {protocol name: fields}})")
    _device_args(ev)
    _runtime_rank_arg(ev)
    _kv_cache_dtype_arg(ev)
    _sparse_args(ev)
    ev.set_defaults(func=cmd_eval)

    conv = sub.add_parser("convert", help="convert an MHA/GQA model to MLA (no training)",
                          description="Calibrate on the protocol's calibration tokens [0, 32768) and convert "
                                      "SOURCE to MLA at the given KV-cache budget.")
    conv.add_argument("source", metavar="SOURCE", help=MODEL_HELP)
    conv.add_argument("-o", "--output", metavar="OUT", help="the mlakit checkpoint directory to write")
    _convert_budget_args(conv)
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    conv.add_argument("--sweep", metavar="SAVINGS", default=None,
                      help="comma-separated KV savings: convert at each (uniform and adaptive), evaluate, report")
    conv.add_argument("--report", metavar="DIR", default=None, help="where --sweep writes sweep.md/.png/.json")
    conv.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    conv.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    conv.set_defaults(func=cmd_convert)

    demo = sub.add_parser("demo", help="the main job: convert the default model, evaluate both, print a table",
                          description="Convert the default model at a default budget, evaluate original and "
                                      "converted on wikitext2-smollm2-v1 (512-token windows) and the long-window "
                                      "ppl of longctx-smollm2-v1 (5 x 4096 tokens), print KV bytes, saving, both "
                                      "ppl and samples; --passkey adds passkey-v1.")
    _convert_budget_args(demo)
    demo.add_argument("-o", "--output", metavar="OUT", default=None, help="also save the converted checkpoint")
    demo.add_argument("--passkey", action="store_true",
                      help="also run passkey-v1 (60 greedy generations at 1024/4096/7680 tokens per model; "
                           "tens of minutes per model on a 2-core CPU, where the demo runs; the original's "
                           "result is cached after the first run)")
    demo.set_defaults(func=cmd_demo)

    from mlakit.heal.cli import register as add_heal_parser

    add_heal_parser(sub)

    from mlakit.export.cli import add_export_parser

    add_export_parser(sub)

    from mlakit.bench.cli import register as add_bench_parser

    add_bench_parser(sub)
    return parser


def _convert_budget_args(parser: argparse.ArgumentParser) -> None:
    from mlakit.convert.api import DEFAULT_CALIB_TOKENS, DEFAULT_KV_SAVING

    parser.add_argument("--kv-saving", type=float, default=None,
                        help=f"fraction of the source's KV cache to save (default {DEFAULT_KV_SAVING})")
    parser.add_argument("--kv-lora-rank", type=int, default=None, help="explicit latent rank (with --rope-dim)")
    parser.add_argument("--rope-dim", type=int, default=None, help="dimension of the shared RoPE key (even)")
    parser.add_argument("--rank-allocation", choices=("uniform", "adaptive"), default="uniform",
                        help="same rank in every layer, or per-layer ranks from calibration (same total)")
    parser.add_argument("--rope-frequencies", choices=("free", "deepseek", "both"), default=None,
                        help="free (default; deepseek with --rank-shape vllm): the shared RoPE key takes the best "
                        "(frequency, head-mix) pairs, repeats allowed; "
                        "deepseek: one pair per frequency on an arithmetic progression, which stock DeepSeek-V3 "
                        "engines (export --format hf-deepseek / gguf) can represent; both: --sweep runs each")
    parser.add_argument("--rank-shape", choices=("free", "vllm"), default="free",
                        help="free: the budget of --kv-saving / --kv-lora-rank; vllm: kv_lora_rank 512 (or 256 where "
                        "512 saves no cache, or as --kv-lora-rank says) + RoPE 64 in every layer, the head sizes "
                        "576 / 320 vLLM's MLA backends take (docs/export.md)")
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                        help=f"calibration tokens from the protocol's range [0, 32768) (default {DEFAULT_CALIB_TOKENS})")


def _device_args(parser: argparse.ArgumentParser, default_device: str | None = None) -> None:
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


def _runtime_rank_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime-rank", type=_runtime_rank, default=None, metavar="R",
                        help="MLA: keep only the first R latent channels per layer (a smaller cache; best on "
                             "checkpoints healed with --elastic-ranks). 'auto': R by the request's length "
                             "(prompt + new tokens; eval: its window): full rank up to 4096 tokens, then the "
                             "rank whose cache matches full rank's at 4096, at least a quarter of the full "
                             "rank (mlakit.elastic.auto_latent_rank, docs/sparse.md)")


def _sparse_args(parser: argparse.ArgumentParser) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
