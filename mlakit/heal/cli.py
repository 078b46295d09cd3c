"""``mlakit heal``: the subcommand's arguments (``register``) and its one call (``run_from_args``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODEL_HELP = "the converted MLA model: an mlakit checkpoint directory (from mlakit convert)"
TEACHER_HELP = "the original model: a Hugging Face directory, a .gguf file, an mlakit checkpoint, or 'default'"


def register(subparsers) -> argparse.ArgumentParser:
    from mlakit.heal.data import TeacherDataOptions
    from mlakit.quant import KV_CACHE_CHOICES
    from mlakit.heal.distill import DEFAULT_LR, HealOptions

    d, g = HealOptions(), TeacherDataOptions()
    heal = subparsers.add_parser(
        "heal", help="distil a converted MLA model toward the original (KL on next-token distributions)",
        description="Knowledge distillation of MODEL (converted, MLA) toward --teacher (the original): KL "
                    "divergence of next-token distributions on text the teacher writes itself (or --data), "
                    "AdamW with warm-up and cosine decay, bf16 autocast on CUDA. Writes OUT atomically; "
                    "checkpoints to OUT.heal/ so --resume continues an interrupted run.")
    heal.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    heal.add_argument("--teacher", required=True, metavar="SOURCE", help=TEACHER_HELP)
    heal.add_argument("-o", "--output", required=True, metavar="OUT", help="the healed mlakit checkpoint to write")
    heal.add_argument("--overwrite", action="store_true", help="replace OUT (and an unfinished run's state)")
    heal.add_argument("--resume", action="store_true", help="continue the unfinished run saved in OUT.heal/")

    train = heal.add_argument_group("training")
    train.add_argument("--tokens", type=_count, default=d.tokens,
                       help=f"training tokens, e.g. 10M (default {d.tokens:,})")
    train.add_argument("--train", choices=("mla", "attention", "all"), default=d.train,
                       help="which parameters move: mla = the MLA projections and norms inside attention, "
                            "attention = those and wo, all = everything (default attention)")
    train.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                            + ")")
    train.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up fraction (default {d.warmup})")
    train.add_argument("--batch-size", type=int, default=d.batch_size,
                       help=f"windows per step (default {d.batch_size}, which fits small GPUs; where memory allows, "
                            "64 is faster: the default model healed at 228k instead of 96k tokens/s on an H200, "
                            "with --lr 3e-4 for --train all)")
    train.add_argument("--seq-len", type=int, default=d.seq_len,
                       help=f"window length (default {d.seq_len}; 2048 keeps long-range retrieval: passkey-v1 at "
                            "4096 tokens 80%% instead of 8%% at 50%% saving, docs/heal.md)")
    train.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_CHOICES, metavar="DTYPE",
                       help="train through the cache the model will run with: the student attends over its latent "
                            "(with +rope, e.g. int4+rope: and its RoPE key) as a cache of this format stores it "
                            "(straight-through gradients); one of " + ", ".join(KV_CACHE_CHOICES))
    train.add_argument("--hidden-weight", type=float, default=d.hidden_weight,
                       help="add per-layer hidden-state matching with this weight (default 0: KL only)")
    train.add_argument("--kl-chunk", type=int, default=d.kl_chunk,
                       help=f"positions per chunk of the vocabulary projection (default {d.kl_chunk})")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each block in backward (less memory, ~30%% more time)")
    train.add_argument("--shift-windows", action="store_true",
                       help="when the text is read more than once, cut it into windows at another offset each "
                            "epoch, so repeated tokens are seen in new contexts")
    train.add_argument("--layerwise-init", type=int, nargs="?", const=200, default=0, metavar="STEPS",
                       help="first fit every layer's attention to the original's output, STEPS AdamW steps per "
                            "layer (default when given: 200)")
    train.add_argument("--layerwise-lr", type=float, default=d.layerwise_lr,
                       help=f"learning rate of the layer-wise fit (default {d.layerwise_lr:g})")
    train.add_argument("--elastic-ranks", default=None, metavar="R1,R2,...",
                       help="train for several cache sizes: each step keeps only the first R latent channels, "
                            "R sampled among these (use with mlakit eval/generate --runtime-rank)")
    train.add_argument("--elastic-min-fraction", type=float, default=None, metavar="F",
                       help="elastic ranks: every rank from F x the largest latent rank up to it")
    train.add_argument("--elastic-full-share", type=float, default=d.elastic_full_share, metavar="P",
                       help="elastic ranks: share of the steps at the full (largest) rank; the others sample "
                            f"uniformly among the smaller ranks (default {d.elastic_full_share})")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block of student and teacher (regional: identical "
                            "blocks share one graph) and the KL; faster on a GPU after a short warm-up")
    train.add_argument("--seed", type=int, default=d.seed, help="data order, elastic ranks, teacher sampling")
    train.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                       help=f"steps between checkpoints and held-out evaluations (default {d.checkpoint_every})")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop after this much wall time, writing the teacher text included, saving the state "
                            "(then rerun with --resume)")

    data = heal.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="FILE",
                      help="train on this text (or .pt/.npy token ids) instead of teacher-written text")
    data.add_argument("--data-range", default=None, metavar="A:B", help="use only tokens [A, B) of --data")
    data.add_argument("--teacher-tokens", type=_count, default=None,
                      help=f"tokens of teacher text to generate (default min(--tokens, {g.tokens:,}))")
    data.add_argument("--gen-batch", type=int, default=g.batch,
                      help="sequences the teacher writes together (default: 256 on the CPU; on a GPU the largest "
                           "power of two up to 2048 whose KV cache takes at most a quarter of its memory; for "
                           "little text, at most 4 sequences per window asked)")
    data.add_argument("--temperature", type=float, default=g.temperature,
                      help=f"sampling temperature (default {g.temperature})")
    data.add_argument("--top-p", type=float, default=g.top_p, help=f"nucleus sampling mass (default {g.top_p})")
    data.add_argument("--doc-tokens", type=int, default=None, metavar="N",
                      help="tokens the teacher writes after each prompt at most (default: --seq-len minus the "
                           "longest prompt, 464); shorter documents are packed into the same windows and write "
                           "faster on a GPU (less cache to read per step)")
    data.add_argument("--snippet-fraction", type=float, default=g.snippet_fraction,
                      help="share of prompts cut from the protocol's calibration range [0, 32768) "
                           f"(default {g.snippet_fraction}; the rest from a built-in list)")

    heal.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    heal.add_argument("--no-progress", action="store_true", help="no progress bars")
    heal.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    heal.set_defaults(func=run_from_args)
    return heal


def _count(text: str) -> int:
    """``10M``, ``500k``, ``2e6`` or ``123456`` -> an int."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 10M, 500k or 2000000, got {text!r}") from None


def options_from_args(args: argparse.Namespace):
    from mlakit.heal.data import TeacherDataOptions
    from mlakit.heal.distill import HealOptions
    from mlakit.heal.elastic import parse_ranks

    progress = not (args.json or args.no_progress)
    options = HealOptions(
        tokens=args.tokens, train=args.train, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
        seq_len=args.seq_len, hidden_weight=args.hidden_weight, kl_chunk=args.kl_chunk,
        gradient_checkpointing=args.gradient_checkpointing, layerwise_steps=args.layerwise_init,
        layerwise_lr=args.layerwise_lr, shift_windows=args.shift_windows,
        elastic_ranks=parse_ranks(args.elastic_ranks) if args.elastic_ranks else None,
        elastic_min_fraction=args.elastic_min_fraction, elastic_full_share=args.elastic_full_share,
        compile=args.compile, checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes, seed=args.seed, progress=progress, kv_cache_dtype=args.kv_cache_dtype)
    data_options = TeacherDataOptions(
        tokens=args.teacher_tokens or min(args.tokens, TeacherDataOptions.tokens), seq_len=args.seq_len,
        batch=args.gen_batch, temperature=args.temperature, top_p=args.top_p,
        snippet_fraction=args.snippet_fraction, doc_tokens=args.doc_tokens, seed=args.seed)
    return options, data_options


def check_args(args: argparse.Namespace) -> None:
    """Paths and numbers, before any loading (HealOptions.check covers the training settings)."""
    from mlakit import checks
    from mlakit.errors import MlakitError

    checks.model_ref(args.model)
    checks.model_ref(args.teacher, "--teacher")
    checks.device(args.device)
    if not args.resume:
        checks.output(args.output, args.overwrite, directory=True)
    else:
        checks.writable_location(Path(args.output))
    if args.data is not None:
        checks.readable_file(args.data, "--data")
    for flag, value in (("--lr", args.lr), ("--warmup", args.warmup), ("--hidden-weight", args.hidden_weight),
                        ("--layerwise-lr", args.layerwise_lr), ("--temperature", args.temperature),
                        ("--top-p", args.top_p), ("--snippet-fraction", args.snippet_fraction),
                        ("--max-minutes", args.max_minutes), ("--elastic-min-fraction", args.elastic_min_fraction),
                        ("--elastic-full-share", args.elastic_full_share)):
        checks.finite(value, flag)
    checks.at_least(args.seed, "--seed", 0)
    if args.max_minutes is not None and args.max_minutes < 0:
        raise MlakitError(f"--max-minutes must be >= 0, got {args.max_minutes:g}")


def run_from_args(args: argparse.Namespace) -> int:
    import sys

    import torch

    from mlakit.errors import MlakitError
    from mlakit.heal.api import heal
    from mlakit.heal.distill import HELD_OUT_EVERY
    from mlakit import checks

    from mlakit import parallel

    check_args(args)
    options, data_options = options_from_args(args)
    device = checks.device(args.device)
    # under torchrun (WORLD_SIZE > 1): one process per GPU, FSDP2 (docs/distributed.md)
    job = parallel.init(device) if parallel.launched_by_torchrun() else None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        summary = heal(args.model, args.teacher, args.output, options, data_options, data=args.data,
                       data_range=args.data_range, device=device, overwrite=args.overwrite, resume=args.resume,
                       log=log, job=job)
    except torch.cuda.OutOfMemoryError as error:  # torch.OutOfMemoryError on torch >= 2.5
        raise MlakitError(
            f"out of memory while healing with batches of {options.batch_size} x {options.seq_len} tokens "
            f"({str(error).splitlines()[0]}); use a smaller --batch-size, --gradient-checkpointing or a smaller "
            "--kl-chunk (with --overwrite: a run cannot resume with other settings)") from None
    finally:
        if job is not None:
            parallel.shutdown()
    if job is not None and not job.is_main:
        pass  # rank 0 prints
    elif args.json:
        print(json.dumps(summary))
    elif summary["finished"]:
        speed = summary.get("tokens_per_second_overall")
        before, after = summary["kl_before"], summary["kl_after"]
        held_out = (f"held-out KL {before:.4f} -> {after:.4f}" if before == before and after == after  # not NaN
                    else f"no held-out KL (the text holds fewer than {HELD_OUT_EVERY} windows; give more "
                         "--teacher-tokens)")
        print(f"wrote {args.output}: {summary['tokens']:,} tokens in {summary['seconds']['train']:.0f}s"
              + (f" ({speed:,.0f} tokens/s)" if speed else "") + f", {held_out}")
    else:
        print(f"unfinished: step {summary['step']}/{summary['steps']} saved in {args.output}.heal/; "
              "rerun with --resume")
    return 0 if summary["finished"] else 3

