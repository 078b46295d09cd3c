"""``mlakit generate``: stream a continuation of a prompt."""

from __future__ import annotations

import argparse
import json
import sys

from mlakit.commands.common import MODEL_HELP, add_run_args, check_model_args, forward_options, load_model
from mlakit.errors import MlakitError


def register(subparsers) -> argparse.ArgumentParser:
    gen = subparsers.add_parser("generate", help="generate text from a prompt",
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
    add_run_args(gen)
    gen.set_defaults(func=run_from_args)
    return gen


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit import checks

    check_model_args(args)
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


def _check_sampling(args: argparse.Namespace) -> None:
    from mlakit import checks

    checks.at_least(args.max_new_tokens, "--max-new-tokens", 1)
    checks.finite(args.temperature, "--temperature", 0.0, low_open=not args.greedy)
    checks.finite(args.top_p, "--top-p", 0.0, 1.0, low_open=True)
    checks.at_least(args.top_k, "--top-k", 1)
    checks.at_least(args.seed, "--seed", 0)


def _tensor_parallel_job(args: argparse.Namespace):
    """``--tensor-parallel``: join torchrun's job; only rank 0 prints (the others' stdout is muted)."""
    from mlakit import parallel

    return parallel.join_for_tensor_parallel(getattr(args, "device", None), "generate")


def _generate(args: argparse.Namespace, job) -> int:
    from mlakit.engine import SamplingParams, generate

    loaded = load_model(args)
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

    options = forward_options(args, loaded.model)  # its checks fail before anything is printed
    fast = args.compile and loaded.model.device.type == "cuda"
    if args.compile and not fast:
        # measured on the 2-core CPU box (default model): the compiled step was slower than eager
        print("mlakit: --compile is for CUDA GPUs; ignored on the CPU", file=sys.stderr)
    if not args.json:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    generate(loaded.model, [prompt_ids], params, on_step=stream, compile=fast, options=options)
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"model": loaded.source, "prompt_ids": prompt_ids, "output_ids": generated,
                          "text": text}))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
    return 0
