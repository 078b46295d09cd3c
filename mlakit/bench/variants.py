"""The models decode-e2e-v1 times: a model's shape (a preset, a test shape or a model
to load), its MHA / GQA / MQA / MLA variants of the same dims, random weights and a
random cache, and the bytes one decode step reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mlakit.config import PRESETS, ModelConfig, preset
from mlakit.errors import MlakitError

DEFAULT_MLA = (512, 64)  # kv_lora_rank, qk_rope_head_dim
VARIANT_KEYS = ("original", "mla", "mqa", "mha")  # run order: the target rows first

# Shapes that are not model presets: for tests and CPU smoke runs.
SHAPES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        config=ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           intermediate_size=128, max_seq_len=4096),
        grid=((1, 64), (1, 256), (4, 64), (16, 64)),
        max_batch_context=256,
        prefill_tokens=64,
        mla=(32, 8),
    ),
}

DTYPES: Dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                                  "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass
class Variant:
    key: str  # original | mha | mqa | mla
    name: str  # what the table shows
    config: ModelConfig
    source: Optional[str] = None  # a model to load (the original of a named model); None: random weights
    convert_from: Optional[str] = None  # MLA: convert this model with mlakit.convert (rank/rope of ``config``)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise MlakitError(f"unknown dtype {name!r}") from None


def mla_variant_config(config: ModelConfig, kv_lora_rank: int, rope_dim: int) -> ModelConfig:
    """The MLA model of the same shape: latent ``kv_lora_rank`` + shared RoPE key
    ``rope_dim``, per-head nope and value dims equal to ``head_dim``, no q_lora."""
    return config.replace(attention="mla", kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim,
                          qk_nope_head_dim=config.head_dim, v_head_dim=config.head_dim, q_lora_rank=None,
                          latent_norm=False, qk_rope_freq_indices=None)


def make_variants(config: ModelConfig, kv_lora_rank: int, rope_dim: int,
                  keys: Sequence[str] = VARIANT_KEYS, source: Optional[str] = None) -> List[Variant]:
    """The original and its MHA / MQA / MLA siblings of the same shape, in ``keys`` order.
    A sibling that equals the original (e.g. MHA of an MHA model) is left out."""
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise MlakitError(f"unknown variants {unknown}; choose from {', '.join(VARIANT_KEYS)}")
    gqa_base = config if not config.is_mla else config.replace(attention="gqa", n_kv_heads=config.n_heads)
    out: List[Variant] = []
    for key in keys:
        if key == "original":
            cfg = config
        elif key == "mha":
            cfg = gqa_base.replace(n_kv_heads=config.n_heads)
        elif key == "mqa":
            cfg = gqa_base.replace(n_kv_heads=1)
        else:
            cfg = mla_variant_config(gqa_base, kv_lora_rank, rope_dim)
        if key != "original" and _same_attention(cfg, config) and "original" in keys:
            continue
        name = variant_name(cfg) + (" (original)" if key == "original" else "")
        out.append(Variant(key, name, cfg, source if key == "original" else None))
    return out


def _same_attention(a: ModelConfig, b: ModelConfig) -> bool:
    if a.attention != b.attention:
        return False
    if a.is_mla:
        return a.kv_lora_ranks() == b.kv_lora_ranks() and a.qk_rope_head_dim == b.qk_rope_head_dim
    return a.n_kv_heads == b.n_kv_heads


def variant_name(config: ModelConfig) -> str:
    """What the tables call a shape's attention: ``GQA-8``, ``MHA``, ``MQA``, ``MLA 512+64``."""
    if config.is_mla:
        ranks = sorted(set(config.kv_lora_ranks()))
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return f"MLA {rank}+{config.qk_rope_head_dim}"
    return config.gqa_variant


def resolve_shape(model: Optional[str], preset_name: str) -> Tuple[ModelConfig, Tuple[int, int], Optional[str]]:
    """(original config, default MLA (rank, rope), model source or None) of a model to
    load (``model``), else of a preset or test shape (``preset_name``)."""
    if model is not None:
        return config_of(model), DEFAULT_MLA, model
    if preset_name in SHAPES:
        shape = SHAPES[preset_name]
        return shape["config"].replace(), shape["mla"], None
    if preset_name not in PRESETS:
        raise MlakitError(f"unknown preset {preset_name!r}; presets: {', '.join(sorted([*PRESETS, *SHAPES]))}")
    return preset(preset_name), DEFAULT_MLA, None


def config_of(ref: str) -> ModelConfig:
    """The config of a model to load: read from its directory when it has one
    (no weights loaded), else by loading it on the CPU (GGUF, ``default``)."""
    from mlakit.config import CONFIG_FILENAME
    from mlakit.loading import config_from_hf, load

    path = Path(ref)
    if path.is_dir() and (path / CONFIG_FILENAME).exists():
        return ModelConfig.load(path)
    if path.is_dir() and (path / "config.json").exists():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    return load(ref, device="cpu").model.config


def build_random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``Transformer`` of ``config`` with random normal weights, drawn on ``device``
    (built on the meta device first: no float32 copy, no CPU init)."""
    from mlakit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_random(seed=seed)
    model.requires_grad_(False)
    return model.eval()


def fill_cache_random(cache, context: int, seed: int = 0) -> None:
    """Random normal keys/values/latents in every slot (never zeros); each sequence's
    length set to ``context - 1`` (the next step writes slot ``context - 1``)."""
    device = cache.lengths.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for layer in cache.layers:
            for name, buf in layer.named_buffers():
                if name == "lengths":
                    buf.fill_(context - 1)
                else:
                    buf.normal_(generator=generator)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds (a tensor-parallel DTensor counts its local shard)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Parameter bytes one decode step reads: every parameter, except that only
    ``batch`` rows of an untied embedding table are read."""
    total = weight_bytes(model)
    emb = model.tok_embeddings.weight
    if getattr(model, "output", None) is not None:  # untied: the table itself is only indexed
        total -= emb.numel() * emb.element_size()
        total += min(batch, emb.shape[0]) * emb.shape[1] * emb.element_size()
    return total
