"""``mlakit info``: describe a model."""

from __future__ import annotations

import argparse
import json

from mlakit.commands.common import MODEL_HELP, add_device_args, check_model_args, load_model


def register(subparsers) -> argparse.ArgumentParser:
    info = subparsers.add_parser("info", help="describe a model: architecture, size, attention kind, KV bytes per token")
    info.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_args(info, default_device="cpu")
    info.set_defaults(func=run_from_args)
    return info


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
    for name in ("fp8", "int8", "int4"):  # values + float32 scales (+ the MLA RoPE key in bf16)
        cache = model.new_cache(1, 1, dtype=torch.bfloat16, kv_cache_dtype=name)
        info[f"kv_bytes_per_token_{name}"] = cache.bytes_per_token()
    if config.is_mla:  # which stock engines run `mlakit export` of it, and where (mlakit.export.engines)
        from mlakit.export.engines import engines_for

        info["engines"] = [fit.to_dict() for fit in engines_for(config)]
    return info


def run_from_args(args: argparse.Namespace) -> int:
    check_model_args(args)
    loaded = load_model(args)
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
