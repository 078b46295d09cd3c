"""Triton kernels for MLA decode, each with a plain PyTorch reference beside it.

Importing this package never needs Triton: ``HAS_TRITON`` says whether it is
installed, and ``mla_decode`` / ``rope_append`` fall back to their references
when it is not (or when the tensors are on the CPU and ``TRITON_INTERPRET=1``
was not set before import).

On a Hopper GPU ``mla_decode`` runs the decode kernel of ``mlakit.kernels.mla_decode_gluon``
(Gluon: TMA and wgmma) where it applies, the Triton kernel elsewhere (docs/kernels.md).
"""

from mlakit.kernels.decode_common import HAS_TRITON, INTERPRET, mla_decode_reference
from mlakit.kernels.mla_decode import absorb_output, absorb_query, mla_decode
from mlakit.kernels.mla_decode_quant import mla_decode_quant, mla_decode_quant_reference
from mlakit.kernels.rope_append import rope_append, rope_append_quant, rope_append_quant_reference, rope_append_reference

__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "absorb_output",
    "absorb_query",
    "mla_decode",
    "mla_decode_quant",
    "mla_decode_quant_reference",
    "mla_decode_reference",
    "rope_append",
    "rope_append_quant",
    "rope_append_quant_reference",
    "rope_append_reference",
]
