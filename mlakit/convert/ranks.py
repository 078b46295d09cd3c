"""Budgets: KV saving -> values per token per layer -> RoPE dimension + latent ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlakit.errors import MlakitError

RANK_ALLOCATIONS = ("uniform", "adaptive")
DEFAULT_KV_SAVING = 0.5


@dataclass
class Budget:
    values_per_layer: int  # kv_lora_rank + qk_rope_head_dim (mean over layers)
    rope_dim: int

    @property
    def rank(self) -> int:
        return self.values_per_layer - self.rope_dim


MIN_DEFAULT_ROPE_DIM = 32


def default_rope_dim(values_per_layer: int, n_kv_heads: int, head_dim: int) -> int:
    """RoPE dimension used when only a saving is given: a quarter of the budget, but at
    least 32 (unless that is more than half the budget) and at most 64 and all key dims.

    Measured on the default model (docs/convert.md, ablation): below 32 dimensions the
    lost positional information dominates (75% saving: RoPE 24 -> ppl 214, RoPE 32 -> 112,
    RoPE 48 -> 126; 83.3%: 16 -> 423, 32 -> 225), above it the latent is starved."""
    p = max(values_per_layer // 4, min(MIN_DEFAULT_ROPE_DIM, values_per_layer // 2))
    p = min(64, p, n_kv_heads * head_dim)
    return max(2, p - p % 2)


def make_budget(n_kv_heads: int, head_dim: int, kv_saving: float | None = None, kv_lora_rank: int | None = None,
                rope_dim: int | None = None) -> Budget:
    """Check and resolve the user's budget options against the source shape."""
    full = 2 * n_kv_heads * head_dim
    if kv_saving is not None and kv_lora_rank is not None:
        raise MlakitError("give either --kv-saving or --kv-lora-rank (with --rope-dim), not both")
    if rope_dim is not None:
        if rope_dim < 0 or rope_dim % 2:
            raise MlakitError(f"--rope-dim must be even and >= 0, got {rope_dim}")
        if rope_dim > n_kv_heads * head_dim:
            raise MlakitError(f"--rope-dim {rope_dim} exceeds the source's key dimensions "
                              f"({n_kv_heads} KV heads x {head_dim} = {n_kv_heads * head_dim})")
    if kv_lora_rank is not None:
        if rope_dim is None:
            raise MlakitError("--kv-lora-rank needs --rope-dim")
        values = kv_lora_rank + rope_dim
    else:
        if kv_saving is None:
            kv_saving = DEFAULT_KV_SAVING
        if not kv_saving < 1:
            raise MlakitError(f"--kv-saving must be below 1, got {kv_saving}")
        if kv_saving < 0:
            raise MlakitError(f"--kv-saving {kv_saving} asks for a cache larger than the original")
        values = int(round((1 - kv_saving) * full))
        if rope_dim is None:
            rope_dim = default_rope_dim(values, n_kv_heads, head_dim)
    if values > full:
        raise MlakitError(f"budget of {values} values per token per layer is larger than the original cache ({full})")
    if values - rope_dim < 1:
        raise MlakitError(f"budget of {values} values per token per layer is too small to hold the RoPE key "
                          f"({rope_dim}) and a latent of at least 1")
    return Budget(values_per_layer=values, rope_dim=rope_dim)


ROPE_FREQUENCIES = ("free", "deepseek")


def frequency_scores(lams: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[d/2, G]`` score of each (frequency, component) for the shared RoPE key.
    ``lams[l] [d/2, G]``: score energy of each component of layer ``l`` (descending per
    frequency); ``weights[l] [d/2]``: how much a component of that frequency loses when
    it is left unrotated. Each layer's values are normalised to sum 1, so every layer
    counts the same."""
    half, G = lams[0].shape
    score = torch.zeros(half, G, dtype=torch.float64)
    for l, lam in enumerate(lams):
        value = lam * (weights[l][:, None] if weights is not None else 1.0)
        score += value / value.sum().clamp(min=1e-300)
    return score


def select_frequencies(score: torch.Tensor, n_pairs: int, pattern: str = "free") -> list[int]:
    """How many components of each frequency go into the shared RoPE key (one choice for
    all layers: the model has one frequency table), from ``frequency_scores``.

    ``free``: the ``n_pairs`` best (frequency, component) entries; a frequency may be
    used several times. ``deepseek``: one component per frequency, on frequencies
    ``i0, i0 + s, i0 + 2s, ...`` (the best-scoring such progression): DeepSeek's RoPE
    computes ``theta'^(-2k/p) / factor``, which is exactly such a progression of the
    source's frequencies, so the model exports to stock DeepSeek-V3 engines."""
    half, G = score.shape
    if pattern == "free":
        # per frequency the scores are non-increasing in the component index, so a top-k
        # over all (frequency, component) entries always takes a prefix of each frequency
        order = torch.argsort(score.flatten(), descending=True, stable=True)[:n_pairs]
        counts = [0] * half
        for idx in order.tolist():
            counts[idx // G] += 1
        return counts
    if pattern != "deepseek":
        raise MlakitError(f"RoPE frequencies must be one of {ROPE_FREQUENCIES}, got {pattern!r}")
    if n_pairs > half:
        raise MlakitError(f"--rope-frequencies deepseek allows at most {half} rotary pairs (one per source "
                          f"frequency: --rope-dim <= {2 * half}), got {n_pairs}")
    counts = [0] * half
    if n_pairs == 0:
        return counts
    best = score[:, 0]
    candidates = []
    max_step = (half - 1) // (n_pairs - 1) if n_pairs > 1 else 1  # the last index must stay below half
    for step in range(1, max_step + 1):
        for start in range(half - (n_pairs - 1) * step):
            idx = torch.arange(start, start + n_pairs * step, step)
            candidates.append((float(best[idx].sum()), -step, -start, idx))
    _, _, _, idx = max(candidates, key=lambda c: c[:3])
    for i in idx.tolist():
        counts[i] = 1
    return counts


def allocate_ranks(spectra: list[torch.Tensor] | None, rank: int, method: str, max_ranks: list[int],
                   min_rank: int = 1) -> list[int]:
    """Latent rank of every layer; the total is ``rank * n_layers`` either way.

    ``uniform``: every layer gets ``rank``. ``adaptive``: each layer's spectrum (the
    eigenvalues of its error-metric covariance) is normalised to sum 1 and the
    ranks go, one by one, to the largest remaining normalised eigenvalue of any
    layer (the energy-ratio rule of X-EcoMLA, applied jointly)."""
    if method == "uniform":
        return [min(rank, m) for m in max_ranks]
    n = len(spectra)
    if method != "adaptive":
        raise MlakitError(f"rank allocation must be one of {RANK_ALLOCATIONS}, got {method!r}")
    total = rank * n
    base = [min(min_rank, m) for m in max_ranks]
    entries = []
    for l, spec in enumerate(spectra):
        norm = spec / spec.sum().clamp(min=1e-300)
        for k in range(base[l], max_ranks[l]):
            entries.append((float(norm[k]), l))
    entries.sort(key=lambda e: -e[0])
    ranks = list(base)
    for _, l in entries[: max(0, total - sum(base))]:
        ranks[l] += 1
    return ranks
