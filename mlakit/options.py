"""How a forward pass runs, as data the caller passes in (modules hold weights, not modes).

``Transformer.forward(tokens, positions, cache, options)`` hands one frozen
``ForwardOptions`` down through every block into attention. The engine prefills with
``ForwardOptions(mla_path="naive")`` and decodes with ``ForwardOptions(mla_path="absorbed")``;
healing trains with the default; nothing is set on a module and nothing needs resetting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MLA_PATHS = ("naive", "absorbed")


@dataclass(frozen=True)
class ForwardOptions:
    # MLA only: "naive" decompresses per-head keys and values and runs ordinary attention;
    # "absorbed" folds the up-projections into the query and the output and attends over
    # the latent itself (what decode wants: the cache is read once per sequence).
    mla_path: str = "naive"
    # With a cache, MLA writes through the fused rope_append kernel and absorbed attention
    # runs mla_decode (Triton/Gluon on CUDA, their PyTorch references elsewhere); False
    # keeps the plain PyTorch path (a reference for the kernels).
    kernels: bool = True
    # The KV cache's format (mlakit.quant: bf16 | fp16 | fp8 | int8 | int4; None: the model's
    # dtype). A forward without a cache (evaluation windows, healing) then attends over the
    # keys and values exactly as that cache would store them, the window's own tokens
    # included, with gradients passed straight through the rounding; with a cache, the cache
    # itself holds that format (Transformer.new_cache(..., kv_cache_dtype=)).
    kv_cache_dtype: str | None = None
    quantize_rope: bool = False  # MLA: quantise the shared RoPE key too (default: kept 16-bit)
    # MLA top-k sparse attention (docs/sparse.md): each query attends to the ``sparse_topk``
    # cache slots of best index score, plus the first ``sparse_sink`` and the last
    # ``sparse_window`` up to itself. The index is the score over the latent's first
    # ``sparse_index_rank`` channels (None: all) plus the RoPE key, max over heads.
    # None: dense. Where absorbed attention runs mla_decode this runs the sparse kernels;
    # elsewhere (uncached windows, kernels off) a masked dense computation (the reference).
    sparse_topk: int | None = None
    sparse_window: int = 64
    sparse_sink: int = 4
    sparse_index_rank: int | None = 64
    # MLA runtime rank per sequence (mlakit.elastic): ``[b]`` ints; sequence b keeps its
    # latent's first ``latent_ranks[b]`` channels (the rest are zeroed before the cache),
    # which is ``truncate_latent_rank`` of an elastic checkpoint, per sequence. None: all.
    latent_ranks: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.mla_path not in MLA_PATHS:
            raise ValueError(f"mla_path must be one of {MLA_PATHS}, got {self.mla_path!r}")
        if self.kv_cache_dtype is not None:
            from mlakit.quant import cache_format

            cache_format(self.kv_cache_dtype)  # an unknown name fails here, with the choices
        if self.sparse_topk is not None and self.sparse_topk < 1:
            raise ValueError(f"sparse_topk must be >= 1 (or None: dense), got {self.sparse_topk}")
        if self.sparse_window < 0 or self.sparse_sink < 0:
            raise ValueError(f"sparse_window and sparse_sink must be >= 0, got {self.sparse_window}, "
                             f"{self.sparse_sink}")
        if self.sparse_index_rank is not None and self.sparse_index_rank < 1:
            raise ValueError(f"sparse_index_rank must be >= 1 (or None: all channels), got {self.sparse_index_rank}")

    @property
    def sparse(self) -> bool:
        return self.sparse_topk is not None

    @classmethod
    def for_cache(cls, choice: str | None, **fields) -> "ForwardOptions":
        """The options of a ``--kv-cache-dtype`` choice (``mlakit.quant.KV_CACHE_CHOICES``, e.g.
        ``int4+rope``: an int4 latent and RoPE key; None: the model's dtype)."""
        if choice is None:
            return cls(**fields)
        from mlakit.quant import split_cache_choice

        name, rope = split_cache_choice(choice)
        return cls(kv_cache_dtype=name, quantize_rope=rope, **fields)

    def replace(self, **changes) -> "ForwardOptions":
        from dataclasses import replace

        return replace(self, **changes)


DEFAULT = ForwardOptions()
NAIVE = DEFAULT
ABSORBED = ForwardOptions(mla_path="absorbed")
