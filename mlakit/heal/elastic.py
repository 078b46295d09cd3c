"""Elastic latent rank: one MLA checkpoint, several cache sizes.

The converter orders every layer's latent dimensions by importance (PCA eigenvalue
order), so keeping the first ``R`` latent channels is the best rank-``R`` cache the
layer can have without refitting. ``truncate_latent_rank`` does that for real (a
smaller model); ``LatentMask`` does it by zeroing channels ``[R, r)`` of the ``wkv_a``
output, which is the same computation (the zeroed channels multiply the dropped
columns of ``wkv_b``) without rebuilding the model: training samples one rank per
step (Matryoshka-style) through the mask, so the first channels learn to carry the
most.

Layout of one MLA layer (see ``mlakit.attention.MLAttention``):
  wkv_a.weight  [r + p, dim]      rows [:r] the latent, rows [r:] the shared RoPE key
  wkv_b.weight  [h (nope + v), r]  one column per latent channel
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from mlakit.attention import MLAttention
from mlakit.elastic import check_elastic_model, truncated_ranks
from mlakit.errors import MlakitError
from mlakit.model import Transformer


class LatentMask:
    """Forward hooks on every ``wkv_a`` that zero latent channels ``[rank, r_l)``.

    ``mask.rank = R`` makes the model compute exactly what ``truncate_latent_rank(model, R)``
    computes; ``mask.rank = None`` (or any ``R >= r_l``) leaves a layer untouched.
    Use as a context manager or call ``remove()``.

    Friendly to ``torch.compile`` of the blocks: every layer shares one hook, and the
    channels to drop sit in a boolean buffer of each ``wkv_a`` that a new rank rewrites
    in place, so changing the rank never recompiles (only on/off is a guard)."""

    BUFFER = "latent_drop"

    def __init__(self, model: Transformer) -> None:
        check_elastic_model(model, "elastic-rank training")
        self._rank: int | None = None
        self._active = False  # what the hook reads (a bool: compiled graphs guard on it, never on the rank)
        self._modules: list[tuple[torch.nn.Module, int]] = []
        self._handles = []
        hook = self._hook  # one function object for every layer (one compiled graph for all blocks)
        for layer in model.layers:
            attn = layer.attention
            assert isinstance(attn, MLAttention)
            r, p = attn.kv_lora_rank, attn.rope_dim
            attn.wkv_a.register_buffer(self.BUFFER, torch.zeros(r + p, dtype=torch.bool,
                                                                device=attn.wkv_a.weight.device), persistent=False)
            self._modules.append((attn.wkv_a, r))
            self._handles.append(attn.wkv_a.register_forward_hook(hook))

    @property
    def rank(self) -> int | None:
        return self._rank

    @rank.setter
    def rank(self, value: int | None) -> None:
        self._rank = value
        self._active = value is not None
        if value is None:
            return
        for module, r in self._modules:
            drop = getattr(module, self.BUFFER)
            channel = torch.arange(drop.numel(), device=drop.device)
            drop.copy_((channel >= value) & (channel < r))  # latent channels [R, r); the RoPE ones stay

    def _hook(self, module, inputs, out: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        return out.masked_fill(getattr(module, self.BUFFER), 0)  # [..., r + p]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, _ in self._modules:
            if hasattr(module, self.BUFFER):
                delattr(module, self.BUFFER)
        self._modules.clear()

    def __enter__(self) -> "LatentMask":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def parse_ranks(text: str) -> list[int]:
    """``"24,48,72"`` -> ``[24, 48, 72]``."""
    try:
        ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise MlakitError(f"--elastic-ranks takes comma-separated integers like 24,48,72, got {text!r}") from None
    if not ranks or ranks[0] < 1:
        raise MlakitError(f"--elastic-ranks must be positive integers, got {text!r}")
    return ranks


def elastic_choices(model: Transformer, ranks: Sequence[int] | None = None,
                    min_fraction: float | None = None) -> list[int] | None:
    """The ranks one training step may sample: the given ones, or every rank from
    ``ceil(min_fraction * r_max)`` to ``r_max`` (``r_max`` the largest layer rank)."""
    if ranks is None and min_fraction is None:
        return None
    if ranks is not None and min_fraction is not None:
        raise MlakitError("give --elastic-ranks or --elastic-min-fraction, not both")
    check_elastic_model(model, "elastic-rank training")
    r_max = max(model.config.kv_lora_ranks())
    if min_fraction is not None:
        if not 0 < min_fraction <= 1:
            raise MlakitError(f"--elastic-min-fraction must be in (0, 1], got {min_fraction}")
        return list(range(max(1, math.ceil(min_fraction * r_max - 1e-9)), r_max + 1))
    too_big = [r for r in ranks if r > r_max]
    if too_big:
        raise MlakitError(f"elastic ranks {too_big} exceed the model's largest latent rank {r_max}")
    return list(ranks)


def sample_rank(choices: Sequence[int], seed: int, step: int, full_share: float | None = None) -> int:
    """The rank of one step: a pure function of (seed, step), so a resumed run
    samples exactly what an uninterrupted one does.

    ``full_share`` None: uniform among ``choices``. Otherwise the full rank (the largest
    choice) with probability ``full_share``, else one of the smaller choices, uniformly."""
    rng = random.Random(seed * 1_000_003 + step)
    if full_share is None:
        return rng.choice(list(choices))
    choices = sorted(choices)
    if len(choices) == 1 or rng.random() < full_share:
        return choices[-1]
    return rng.choice(choices[:-1])
