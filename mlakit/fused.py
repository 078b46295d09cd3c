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

Tensor-parallel layers (``mlakit.parallel``: DTensor weights, colwise-split or replicated)
fuse their local shards: the input is the same replicated activation on every rank, so one
local matmul gives each layer's local output, as its own module would with plain outputs.
Such a layer's weight becomes a new DTensor parameter whose local tensor is the view.
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
        self.sizes = [_local(l.weight).shape[0] for l in linears]  # this rank's rows under tensor parallelism
        with torch.no_grad():
            self.weight = torch.cat([_local(l.weight) for l in linears])  # [sum(out), in]
            self.bias = None
            if any(l.bias is not None for l in linears):
                self.bias = torch.cat([_local(l.bias) if l.bias is not None else _local(l.weight).new_zeros(size)
                                       for l, size in zip(linears, self.sizes)])
            for l, weight, bias in zip(linears, self.weight.split(self.sizes), self._bias_parts()):
                _share(l, "weight", weight)
                if l.bias is not None:
                    _share(l, "bias", bias)

    def _bias_parts(self):
        return self.bias.split(self.sizes) if self.bias is not None else [None] * len(self.sizes)

    def is_current(self) -> bool:
        """True while every layer's weight is still the view this object made."""
        weights = self.weight.split(self.sizes)
        locals_ = [_local(l.weight) for l in self.linears]
        return all(mine.data_ptr() == w.data_ptr() and mine.shape == w.shape and mine.dtype == w.dtype
                   and mine.device == w.device for mine, w in zip(locals_, weights))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a tensor-parallel layer's rows on this rank), else ``t``."""
    return t.to_local() if _is_dtensor(t) else t


def _share(linear: nn.Linear, name: str, view: torch.Tensor) -> None:
    """Make ``linear.<name>`` read ``view`` (a slice of the fused tensor) without a copy."""
    param = getattr(linear, name)
    if not _is_dtensor(param):
        param.data = view
        return
    from torch.distributed.tensor import DTensor

    # ``.data =`` would copy into a DTensor's own storage: a new parameter over the view instead
    shared = DTensor.from_local(view, param.device_mesh, param.placements, run_check=False,
                                shape=param.shape, stride=param.stride())
    setattr(linear, name, nn.Parameter(shared, requires_grad=param.requires_grad))
