"""QK-norm sources (Qwen3, Gemma 3): the factorisation over the normed queries and keys.

A per-head RMSNorm divides each head's key by its own RMS, a per-token, per-head
scalar: no linear map of the attention input carries it into a latent. But the
cache is written once per token, so the norm can run there: the normed source keys
``k̂ [G d]`` join the input the latent is a linear map of, ``x̄ = [x; q̂; k̂; 1]``
(``calibrate.attention_input``), and queries and keys are linear in ``x̄`` again.
The factorisation then runs unchanged on ``SourceAttention`` (identity maps onto
``q̂``, ``k̂``), and ``split_weights`` turns its maps of ``x̄`` into MLAttention's
``qk_norm`` layout: the source query projection and norm plus a per-head map
``wq_map``, and the latent as ``wkv_a x + wkv_a_key k̂``. Nothing runs per cached
token at attention time, so the absorbed path and its kernels stay as they are.
docs/convert.md ("QK-norm") compares it with folding the norm into a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class SourceAttention:
    """A GQA layer as the factorisation sees it: ``wq, wk, wv`` affine maps of ``x̄``."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    wq: SimpleNamespace  # .weight [out, in], .bias [out] or None
    wk: SimpleNamespace
    wv: SimpleNamespace
    wo: torch.nn.Linear


def source_attention(attn):
    """``attn`` itself, or for a QK-norm layer its ``SourceAttention`` over ``[x; q̂; k̂]``."""
    if attn.q_norm is None:
        return attn
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    dim = attn.wq.in_features
    n_in = dim + (H + G) * d
    wv = attn.wv.weight.detach().double().cpu()
    select_q = torch.zeros(H * d, n_in, dtype=torch.float64)
    select_q[:, dim:dim + H * d] = torch.eye(H * d, dtype=torch.float64)
    select_k = torch.zeros(G * d, n_in, dtype=torch.float64)
    select_k[:, dim + H * d:] = torch.eye(G * d, dtype=torch.float64)
    values = torch.zeros(G * d, n_in, dtype=torch.float64)
    values[:, :dim] = wv
    bias_v = None if attn.wv.bias is None else attn.wv.bias.detach()
    return SourceAttention(H, G, d, attn.scale, SimpleNamespace(weight=select_q, bias=None),
                           SimpleNamespace(weight=select_k, bias=None), SimpleNamespace(weight=values, bias=bias_v),
                           attn.wo)


def split_weights(attn, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MLAttention ``qk_norm`` weights from ``build_layer``'s maps of ``x̄`` (``out``) and
    the source layer ``attn`` (its query/key projections and norms are kept as they are)."""
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    dim = attn.wq.in_features
    wq = out["wq.weight"]  # [H e, n_in]: head h reads only its own q̂_h
    e = wq.shape[0] // H
    blocks = wq.view(H, e, -1)[:, :, dim:dim + H * d].reshape(H, e, H, d)
    wq_map = torch.stack([blocks[h, :, h] for h in range(H)])  # [H, e, d]
    wkv_a = out["wkv_a.weight"]  # [r + p, n_in]
    weights = {
        "wq_map": wq_map, "wkv_a.weight": wkv_a[:, :dim], "wkv_a.bias": out["wkv_a.bias"],
        "wkv_a_key.weight": wkv_a[:, dim + H * d:], "wkv_b.weight": out["wkv_b.weight"],
        "q_head_norm.weight": attn.q_norm.weight.detach(), "k_head_norm.weight": attn.k_norm.weight.detach(),
    }
    for name in ("wq", "wk"):
        linear = getattr(attn, name)
        weights[f"{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            weights[f"{name}.bias"] = linear.bias.detach()
    return weights
