"""``mlakit convert``: an MHA/GQA model to MLA at a KV-cache budget, or a sweep of budgets
(``--sweep``). ``add_budget_args`` and ``convert_options`` serve ``mlakit demo`` too."""

from __future__ import annotations

import argparse
import json

from mlakit.commands.common import MODEL_HELP
from mlakit.errors import MlakitError


def register(subparsers) -> argparse.ArgumentParser:
    conv = subparsers.add_parser("convert", help="convert an MHA/GQA model to MLA (no training)",
                                 description="Calibrate on the protocol's calibration tokens [0, 32768) and convert "
                                             "SOURCE to MLA at the given KV-cache budget.")
    conv.add_argument("source", metavar="SOURCE", help=MODEL_HELP)
    conv.add_argument("-o", "--output", metavar="OUT", help="the mlakit checkpoint directory to write")
    add_budget_args(conv)
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    conv.add_argument("--sweep", metavar="SAVINGS", default=None,
                      help="comma-separated KV savings: convert at each (uniform and adaptive), evaluate, report")
    conv.add_argument("--report", metavar="DIR", default=None, help="where --sweep writes sweep.md/.png/.json")
    conv.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    conv.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    conv.set_defaults(func=run_from_args)
    return conv


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    """The conversion's budget and method: --kv-saving or --kv-lora-rank/--rope-dim, ranks, RoPE key, calibration."""
    from mlakit.convert.api import DEFAULT_CALIB_TOKENS, DEFAULT_KV_SAVING
    from mlakit.convert.rotate import ROTATIONS

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
    parser.add_argument("--latent-rotation", choices=ROTATIONS, default="none",
                        help="an exact change of the latent's basis so that an 8/4-bit latent cache "
                             "(--kv-cache-dtype) loses less: hadamard rotates each block of 32 channels, equalize "
                             "scales every channel to unit deviation on the calibration tokens, "
                             "equalize+hadamard does both (mlakit/convert/rotate.py); none: as factorised (default)")
    parser.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                        help=f"calibration tokens from the protocol's range [0, 32768) (default {DEFAULT_CALIB_TOKENS})")


def convert_options(args: argparse.Namespace, sweep: bool = False):
    """``ConvertOptions`` from ``add_budget_args``' flags, checked (before any loading)."""
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
                          latent_rotation=args.latent_rotation,
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


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit import checks

    checks.model_ref(args.source, "SOURCE")
    device = checks.device(args.device or "cpu")
    options = convert_options(args, sweep=args.sweep is not None)
    options.check()
    if args.sweep is not None:
        return _sweep(args, options, device)
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


def _sweep(args: argparse.Namespace, options, device: str) -> int:
    """``--sweep``: convert at each saving, evaluate, write the report."""
    from mlakit import checks

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
