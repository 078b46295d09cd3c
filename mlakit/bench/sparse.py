"""Sparse rows of decode-attn-v1 (``mlakit bench attention --sparse-topk K``): the top-k
sparse decode (mlakit.kernels.mla_sparse: index pass, torch.topk, gathered attention)
beside the dense kernels on the same cache, and its two kernels alone.

Random data: the selection is of random scores, i.e. scattered rows (the gather's
worst case for locality). Bytes counted: the index pass reads ``r_idx + rope`` values
of every slot, the attention ``rank + rope`` values of each selected one.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch

from mlakit.options import ForwardOptions


def sparse_rows(add: Callable[..., Dict], dense_rows: List[Dict], q_latent: torch.Tensor, q_rope: torch.Tensor,
                cache: torch.Tensor, lengths: torch.Tensor, softmax_scale: float, options: ForwardOptions,
                bench: Callable[[Callable[[], object]], float], graph: Callable | None) -> List[Dict]:
    """Rows for one (batch, context): ``add(batch, context, method, nbytes, ms, note=, rel_err=)``
    makes a row (decode-attn-v1's), ``bench(fn)`` times in ms, ``graph(fn)`` (None: no CUDA
    graphs) returns a replay. Notes give the speed-up over the fastest dense kernel row."""
    from mlakit.kernels import mla_sparse as S

    batch, _, heads, rank = q_latent.shape
    context, width = cache.shape[1], cache.shape[2]
    rope = width - rank
    index_rank = min(options.sparse_index_rank or rank, rank)
    k = S.selection_size(options.sparse_topk, options.sparse_window, options.sparse_sink, context)
    size = cache.element_size()
    index_bytes = batch * context * (index_rank + rope) * size
    attend_bytes = batch * k * width * size
    query_pos = S._query_positions(lengths, 1)

    def decode():
        return S.mla_sparse_decode(q_latent, q_rope, cache, lengths, softmax_scale, rank,
                                   topk=options.sparse_topk, window=options.sparse_window,
                                   sink=options.sparse_sink, index_rank=index_rank)

    chosen = S.select_positions(S.mla_sparse_index(q_latent, q_rope, cache, lengths, rank, index_rank),
                                query_pos, options.sparse_topk, options.sparse_window, options.sparse_sink)
    ref = S.mla_sparse_attend_reference(q_latent, q_rope, cache, chosen, softmax_scale, rank)
    err = float((decode().float() - ref.float()).norm() / ref.float().norm())
    label = f"MLA sparse top-{options.sparse_topk}+{options.sparse_window}w+{options.sparse_sink}s r_idx {index_rank}"
    parts = {
        "index": lambda: S.mla_sparse_index(q_latent, q_rope, cache, lengths, rank, index_rank),
        "index+topk": lambda: S.select_positions(
            S.mla_sparse_index(q_latent, q_rope, cache, lengths, rank, index_rank), query_pos,
            options.sparse_topk, options.sparse_window, options.sparse_sink),
        "attend": lambda: S.mla_sparse_attend(q_latent, q_rope, cache, chosen, softmax_scale, rank),
    }
    part_bytes = {"index": index_bytes, "index+topk": index_bytes, "attend": attend_bytes}

    def best_dense(graphed: bool) -> float | None:
        times = [r["us"] for r in dense_rows if r.get("us") and r["method"].startswith(("MLA Gluon", "MLA Triton"))
                 and ("CUDA graph" in r["method"]) == graphed]
        return min(times) if times else None

    rows = []
    for graphed in ([False, True] if graph is not None else [False]):
        suffix = " (CUDA graph)" if graphed else ""
        ms = bench(graph(decode) if graphed else decode)
        dense = best_dense(graphed)
        note = f"{dense / (ms * 1e3):.2f}x dense kernel" if dense else ""
        rows.append(add(batch, context, label + suffix, index_bytes + attend_bytes, ms, note=note,
                        rel_err=None if graphed else err))
    for name, fn in parts.items():
        rows.append(add(batch, context, f"  sparse {name} only", part_bytes[name], bench(fn)))
    return rows
