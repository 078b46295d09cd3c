"""Several linear layers that read the same input, run as one matmul (an inference transform).

At batch 1 a decode step is a chain of matrix-vector products, and the small ones
(the GQA key/value projections, MLA's latent down-projection: a few MB each) run far
below the memory bandwidth: launch latency and too few blocks to fill the GPU. Reading
them together with the query projection as one wider matrix removes those small
products (measured in docs/e2e.md).

``FusedLinears`` concatenates the weights once and makes each layer's ``weight`` (and
``bias``) a view into the concatenation, so nothing is stored twice, the state dict
is unchanged, and in-place updates (``load_state_dict``, ``copy_``) reach the fused
matmul. Moving or casting the model afterwards (``.to``) breaks the sharing: fuse
again after that (``mlakit.speed.fuse_projections`` is idempotent and checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinears:
    """``linears[i](x)`` for all i through one ``F.linear``; returns the outputs as views."""

    def __init__(self, *linears: nn.Linear) -> None:
        if len({(l.in_features, l.weight.dtype, l.weight.device) for l in linears}) != 1:
            raise ValueError("fused linears need the same input size, dtype and device")
        self.linears = linears
        self.sizes = [l.out_features for l in linears]
        with torch.no_grad():
            self.weight = torch.cat([l.weight for l in linears])  # [sum(out), in]
            self.bias = None
            if any(l.bias is not None for l in linears):
                self.bias = torch.cat([l.bias if l.bias is not None else l.weight.new_zeros(l.out_features)
                                       for l in linears])
            for l, weight, bias in zip(linears, self.weight.split(self.sizes), self._bias_parts()):
                l.weight.data = weight
                if l.bias is not None:
                    l.bias.data = bias

    def _bias_parts(self):
        return self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)

    def is_current(self) -> bool:
        """True while every layer's weight is still the view this object made."""
        weights = self.weight.split(self.sizes)
        return all(l.weight.data_ptr() == w.data_ptr() and l.weight.shape == w.shape and l.weight.dtype == w.dtype
                   and l.weight.device == w.device for l, w in zip(self.linears, weights))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))
