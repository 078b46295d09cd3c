"""The ``mlakit`` command: thin subcommands that parse, call one function, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from mlakit.errors import MlakitError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "a Hugging Face directory, an mlakit checkpoint directory, a .gguf file, or 'default' (SmolLM2-135M)"


def _resolve_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MlakitError("--device cuda was asked for, but no CUDA GPU is available")
    return name


def _load(args: argparse.Namespace):
    import torch

    from mlakit.loading import load

    device = _resolve_device(getattr(args, "device", None))
    dtype_name = getattr(args, "dtype", None) or ("bfloat16" if device.startswith("cuda") else "float32")
    return load(args.model, dtype=getattr(torch, dtype_name), device=device)


# ------------------------------------------------------------------ generate
def cmd_generate(args: argparse.Namespace) -> int:
    from mlakit.engine import SamplingParams, generate

    loaded = _load(args)
    if loaded.tokenizer is None:
        raise MlakitError(f"{args.model} has no tokenizer (pip install transformers, or add tokenizer files)")
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer(args.prompt).input_ids
    if not prompt_ids:
        raise MlakitError("the prompt is empty after tokenisation")
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

    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    generate(loaded.model, [prompt_ids], params, on_step=stream)
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
    return info


def cmd_info(args: argparse.Namespace) -> int:
    loaded = _load(args)
    info = {"model": loaded.source, **model_info(loaded.model)}
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlakit",
        description="Multi-Head Latent Attention (MLA) for Llama-family models: run, inspect, convert.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate a continuation of --prompt, streaming tokens as they come.")
    gen.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    gen.add_argument("--greedy", action="store_true", help="always take the most likely token")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--json", action="store_true", help="print one JSON object (token ids and text) at the end")
    _device_args(gen)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="describe a model: architecture, size, attention kind, KV bytes per token")
    info.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    _device_args(info, default_device="cpu")
    info.set_defaults(func=cmd_info)
    return parser


def _device_args(parser: argparse.ArgumentParser, default_device: str | None = None) -> None:
    parser.add_argument("--device", default=default_device,
                        help="cpu or cuda (default: cuda when available)" if default_device is None
                        else f"cpu or cuda (default: {default_device})")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MlakitError as e:
        print(f"mlakit: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad numbers that argparse could not see (e.g. top-p 2)
        print(f"mlakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # out of memory reads better as one line than a traceback
        if type(e).__name__ == "OutOfMemoryError":
            print(f"mlakit: error: out of memory: {e}".splitlines()[0], file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
