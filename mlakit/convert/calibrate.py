"""Calibration: per-layer statistics of the source model on the protocol's calibration tokens.

The hidden states of all calibration tokens are pushed through the source model one
layer at a time (memory: one model + the hidden states ``[n_tokens, dim]`` + one
layer's work), collecting for every layer

- ``sigma``: ``E[x̄ x̄ᵀ]`` of the attention input ``x̄ = [attention_norm(h); 1]`` (float64,
  ``[dim + 1, dim + 1]``). Every query, key and value is an affine map of ``x``, so all
  the second moments the factorisation needs follow from it. With QK-norm the per-head
  normed queries and keys join the input, ``x̄ = [x; q̂; k̂; 1]`` (``attention_input``): queries
  and keys are then linear in ``x̄`` again;
- ``dist``: per query head, the attention mass at each query-key distance
  ``[n_heads, seq_len]`` (used to estimate how much RoPE rotation a key dimension
  really needs).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mlakit.model import Transformer
from mlakit.rope import apply_rope


@dataclass
class LayerStats:
    sigma: torch.Tensor  # [in + 1, in + 1] float64, E[x̄ x̄ᵀ] (in: dim, + (H + G) head_dim with QK-norm)
    dist: torch.Tensor  # [n_heads, seq_len] float64, attention mass per distance (rows sum to 1)
    tokens: int
    # [G or 1, dim + 1, dim + 1]: E[x̃ x̃ᵀ] of the attention-averaged inputs, per KV group (one
    # matrix for all heads when G (dim+1)^2 is large, to keep memory near one model)
    sigma_attn: torch.Tensor | None = None


def attention_input(attn, x: torch.Tensor) -> torch.Tensor:
    """``x̄ [n, in + 1]`` float64 of ``x [..., dim]``: ``[x; 1]``, or ``[x; q̂; k̂; 1]`` for a
    QK-norm layer (``q̂ [H d]``, ``k̂ [G d]``: normed per head, before RoPE)."""
    parts = [x]
    if attn.q_norm is not None:
        q, k = attn.queries_keys(attn.wq(x), attn.wk(x))
        parts += [q.flatten(-2), k.flatten(-2)]
    return F.pad(torch.cat(parts, -1).reshape(-1, sum(t.shape[-1] for t in parts)).double(), (0, 1), value=1.0)


def _attention_stats(attn, x: torch.Tensor, xa: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[h, L]`` attention mass at distance 0..L-1 of a GQA layer on ``x [b, L, dim]`` (causal),
    and ``[G, dim+1, dim+1]``: second moments of the attention-averaged inputs
    ``x̃_h = Σ_j p_hj x̄_j`` (what each head's value path really sees), summed per KV group."""
    b, length, _ = x.shape
    q, k = attn.queries_keys(attn.wq(x), attn.wk(x))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)
    scores = torch.einsum("bshd,blhd->bhsl", q, k) * attn.scale  # [b, h, L, L]
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)  # causal (and the layer's window)
    pos = torch.arange(length, device=x.device)
    offset = (pos[:, None] - pos[None, :]).clamp(min=0)  # [L, L] distance of key j from query i
    hist = torch.zeros(b, attn.n_heads, length, dtype=probs.dtype, device=x.device)
    hist.scatter_add_(-1, offset.reshape(1, 1, -1).expand(b, attn.n_heads, -1), probs.reshape(b, attn.n_heads, -1))
    group = attn.n_heads // attn.n_kv_heads
    sigma_attn = torch.zeros(attn.n_kv_heads, xa.shape[-1], xa.shape[-1], dtype=torch.float64, device=x.device)
    xa = xa.view(b, length, -1).to(probs.dtype)
    for h in range(attn.n_heads):
        xt = (probs[:, h] @ xa).reshape(-1, xa.shape[-1])  # [b * L, dim + 1]
        sigma_attn[h // group] += (xt.T @ xt).double()
    return hist.sum(0).double(), sigma_attn


class LayerStore:
    """Per-layer analysis objects (dataclasses of tensors), in memory or — with a
    directory — on disk as ``{prefix}{layer}.pt``, so that only the layer being worked
    on is in memory (for an 8B model one layer's statistics are ~0.2 GB, all layers' ~7 GB)."""

    def __init__(self, directory: str | Path | None = None, prefix: str = "layer"):
        self.directory = Path(directory) if directory is not None else None
        self.prefix = prefix
        self._items: list[Any] = []

    def append(self, item: Any) -> None:
        if self.directory is None:
            self._items.append(item)
            return
        path = self.directory / f"{self.prefix}{len(self._items)}.pt"
        # the fields, not the object: read back with weights_only=True (tensors and plain values),
        # so a file planted in the spill directory cannot run code; the class is kept here
        torch.save({f.name: getattr(item, f.name) for f in fields(item)}, path)
        self._items.append((path, type(item)))

    def __getitem__(self, index: int) -> Any:
        item = self._items[index]
        if self.directory is None:
            return item
        path, cls = item
        return cls(**torch.load(path, weights_only=True))

    def __len__(self) -> int:
        return len(self._items)


PER_GROUP_LIMIT = 1 << 22  # elements of G (dim+1)^2 above which the KV groups share one matrix


def _shrink(sigma_attn: torch.Tensor) -> torch.Tensor:
    if sigma_attn.numel() > PER_GROUP_LIMIT:
        sigma_attn = sigma_attn.mean(0, keepdim=True)
    return sigma_attn.float().cpu()


@torch.inference_mode()
def calibrate(model: Transformer, tokens: torch.Tensor, seq_len: int = 512, batch_size: int = 4,
              progress: bool = True, store: LayerStore | None = None) -> LayerStore:
    """Statistics of every layer of the GQA-family ``model`` on ``tokens [n]`` cut into
    sequences of ``seq_len`` (each from position 0), layer by layer, appended to ``store``."""
    from tqdm.auto import tqdm

    config = model.config
    device = model.device
    n_seq = tokens.numel() // seq_len
    if n_seq == 0:
        seq_len, n_seq = tokens.numel(), 1
    seqs = tokens[: n_seq * seq_len].view(n_seq, seq_len).to(device)
    hidden = [model.embed(seqs[i:i + batch_size]) for i in range(0, n_seq, batch_size)]
    positions = torch.arange(seq_len, device=device)[None]
    # explicit masks [1, s, s] (the statistics need them), shared by every window
    inputs = model.layer_inputs(seqs[:1], positions=positions)
    stats = store if store is not None else LayerStore()
    bar = tqdm(total=config.n_layers * len(hidden), desc="calibrate", unit="chunk", disable=not progress)
    for i, layer in enumerate(model.layers):
        cos, sin, mask = inputs.per_layer[i]
        n_in = config.dim + 1 + (config.n_heads + config.n_kv_heads) * config.head_dim * config.qk_norm
        sigma = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        dist = torch.zeros(config.n_heads, seq_len, dtype=torch.float64, device=device)
        sigma_attn = torch.zeros(config.n_kv_heads, n_in, n_in, dtype=torch.float64, device=device)
        for j, h in enumerate(hidden):
            x = layer.attention_norm(h)
            xa = attention_input(layer.attention, x)  # [n, in + 1]
            sigma += xa.T @ xa
            d_hist, s_attn = _attention_stats(layer.attention, x, xa, cos, sin, mask)
            dist += d_hist
            sigma_attn += s_attn
            hidden[j] = model.run_layers(h, inputs, layers=range(i, i + 1))  # the model's own layer loop
            bar.update(1)
        n = n_seq * seq_len
        stats.append(LayerStats(sigma=(sigma / n).cpu(), dist=(dist / dist.sum(-1, keepdim=True)).cpu(), tokens=n,
                                sigma_attn=_shrink(sigma_attn / (n * (config.n_heads // config.n_kv_heads)))))
    bar.close()
    return stats
