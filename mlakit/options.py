"""How a forward pass runs, as data the caller passes in (modules hold weights, not modes).

``Transformer.forward(tokens, positions, cache, options)`` hands one frozen
``ForwardOptions`` down through every block into attention. The engine prefills with
``ForwardOptions(mla_path="naive")`` and decodes with ``ForwardOptions(mla_path="absorbed")``;
healing trains with the default; nothing is set on a module and nothing needs resetting.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        if self.mla_path not in MLA_PATHS:
            raise ValueError(f"mla_path must be one of {MLA_PATHS}, got {self.mla_path!r}")
        if self.kv_cache_dtype is not None:
            from mlakit.quant import cache_format

            cache_format(self.kv_cache_dtype)  # an unknown name fails here, with the choices

    def replace(self, **changes) -> "ForwardOptions":
        from dataclasses import replace

        return replace(self, **changes)


DEFAULT = ForwardOptions()
NAIVE = DEFAULT
ABSORBED = ForwardOptions(mla_path="absorbed")
