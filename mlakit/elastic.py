"""Runtime latent rank: run an elastic MLA checkpoint at a smaller cache.

The converter orders every layer's latent dimensions by importance (PCA eigenvalue
order), and elastic healing (``mlakit.heal.elastic``) trains the first channels to
carry the most, so keeping the first ``R`` latent channels is the best rank-``R``
cache the layer can have without refitting. ``truncate_latent_rank`` builds that
smaller model (``eval`` / ``generate --runtime-rank R``).

Layout of one MLA layer (see ``mlakit.attention.MLAttention``):
  wkv_a.weight  [r + p, dim]      rows [:r] the latent, rows [r:] the shared RoPE key
  wkv_b.weight  [h (nope + v), r]  one column per latent channel
"""

from __future__ import annotations

import torch

from mlakit.errors import MlakitError
from mlakit.model import Transformer


def check_elastic_model(model: Transformer, what: str) -> None:
    config = model.config
    if not config.is_mla:
        raise MlakitError(f"{what} needs an MLA model (convert it first: mlakit convert)")
    if config.latent_norm:
        # the RMSNorm of the latent divides by the RMS of all r channels: dropping some
        # changes the scale of the ones kept, so truncation is no longer a prefix of the model
        raise MlakitError(f"{what} is not possible for models with a latent norm (latent_norm=true, e.g. native "
                          "DeepSeek checkpoints): the norm spans all latent channels, so dropping some changes "
                          "the others")


def truncated_ranks(model: Transformer, rank: int) -> list[int]:
    """``min(rank, r_l)`` for every layer ``l``."""
    if rank < 1:
        raise MlakitError(f"the runtime rank must be >= 1, got {rank}")
    return [min(rank, r) for r in model.config.kv_lora_ranks()]


# ``auto_latent_rank``: full rank up to this many tokens; past it, the rank whose cache holds
# as many latent values as full rank's does at this length.
AUTO_FULL_RANK_TOKENS = 4096


def auto_latent_rank(model: Transformer, context: int) -> int:
    """The runtime rank for a request spanning ``context`` tokens (``--runtime-rank auto``).

    Rule (memory pressure by context length): up to ``AUTO_FULL_RANK_TOKENS`` tokens the
    full rank; beyond, ``full * AUTO_FULL_RANK_TOKENS / context`` rounded down to a multiple
    of 8, so that a sequence's latent cache stays at most what full rank needs at 4096
    tokens, but never below a quarter of the full rank (elastic healing trains down to
    about that; below it quality falls off, docs/sparse.md). ``full`` is the largest
    layer rank; ``truncate_latent_rank`` caps every layer at its own."""
    check_elastic_model(model, "choosing a runtime rank")
    full = max(model.config.kv_lora_ranks())
    if context <= AUTO_FULL_RANK_TOKENS:
        return full
    fitted = (full * AUTO_FULL_RANK_TOKENS // context) // 8 * 8
    return max(fitted, -(-full // 4), 1)


def auto_latent_ranks(model: Transformer, contexts) -> list[int]:
    """``auto_latent_rank`` per sequence: what ``ForwardOptions(latent_ranks=...)`` takes to run
    a batch of requests each at its own rank in one engine."""
    return [auto_latent_rank(model, int(c)) for c in contexts]


def truncate_latent_rank(model: Transformer, rank: int) -> Transformer:
    """A new MLA model keeping the first ``min(rank, r_l)`` latent channels of every
    layer (same dtype and device; ``model`` is left as it is)."""
    from mlakit.loading import build_model

    check_elastic_model(model, "truncating the latent rank")
    ranks = truncated_ranks(model, rank)
    config = model.config
    state = dict(model.state_dict())
    for l, (layer, new) in enumerate(zip(model.layers, ranks)):
        attn = layer.attention
        r, p = attn.kv_lora_rank, attn.rope_dim
        keep = torch.cat([torch.arange(new), torch.arange(r, r + p)]).to(attn.wkv_a.weight.device)  # latent + RoPE rows
        prefix = f"layers.{l}.attention."
        state[prefix + "wkv_a.weight"] = attn.wkv_a.weight.detach()[keep]
        if attn.wkv_a.bias is not None:
            state[prefix + "wkv_a.bias"] = attn.wkv_a.bias.detach()[keep]
        state[prefix + "wkv_b.weight"] = attn.wkv_b.weight.detach()[:, :new]
    new_config = config.replace(kv_lora_rank=ranks[0] if len(set(ranks)) == 1 else ranks)
    truncated = build_model(new_config, {k: v.contiguous() for k, v in state.items()}, device=model.device)
    return truncated
