"""Speed features as transforms on a plain model, and every private torch call in one place.

- ``fuse_projections(model)``: projections that read the same input run as one matmul.
- ``compiled_block_call(backend, dynamic)``: regional ``torch.compile`` of one block, passed
  to ``Transformer.forward`` / ``run_layers`` as ``block_fn`` (the engine's decode step and
  healing use the same mechanism; no module is changed).
- ``capture_graph(fn)``: a CUDA graph of a step whose inputs live in static buffers (the
  engine's decode step, the attention benchmark).

Nothing else in mlakit touches ``torch._dynamo`` or ``torch.fx`` internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mlakit.model import Transformer


def fuse_projections(model: Transformer) -> Transformer:
    """Run the projections that read the same input as one matmul each (in place, no
    extra memory; see ``mlakit.fused``): attention ``wq, wk, wv`` (MLA: ``wq`` or
    ``wq_a`` with ``wkv_a``) and the MLP's ``w1, w3``. Idempotent; fuses again where a
    move or cast of the model broke the sharing. For inference: the layers' weights
    become views into the fused ones."""
    from mlakit.attention import GQAttention
    from mlakit.fused import FusedLinears

    for block in model.layers:
        attention, mlp = block.attention, block.feed_forward
        if isinstance(attention, GQAttention):
            groups = [(attention, (attention.wq, attention.wk, attention.wv))]
        else:
            query = attention.wq_a if hasattr(attention, "wq_a") else attention.wq
            groups = [(attention, (query, attention.wkv_a))]
        groups.append((mlp, (mlp.w1, mlp.w3)))
        for module, linears in groups:
            if module.fused_input is None or not module.fused_input.is_current():
                module.fused_input = FusedLinears(*linears)
    return model


# graphs one compiled function may hold: variants of a benchmark (other head counts or ranks),
# blocks of student and teacher, grad on/off, elastic masks, a short last batch, per-layer ranks.
# Past torch's default (8) dynamo silently falls back to eager.
RECOMPILE_LIMIT = 64


def raise_recompile_limit(graphs: int = RECOMPILE_LIMIT) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))
            return


def _call_block(block, x, cos, sin, positions, mask, cache, options):
    return block(x, cos, sin, positions, mask, cache, options)


@functools.lru_cache(maxsize=None)
def compiled_block_call(backend: str = "inductor", dynamic: bool | None = True) -> Callable:
    """``block(x, ...)`` through ``torch.compile``: regional compilation of one block, as a
    ``block_fn`` for ``Transformer.forward`` / ``run_layers``.

    Every block of a model has the same code, so one compiled graph serves them all
    (parameters are graph inputs) and compiling costs one block, not the whole model.
    ``dynamic=True`` (the engine): shapes are symbolic (batch, cache length, weights), so
    engines of other sizes reuse the graph, and positions are tensors, so advancing them
    never recompiles. ``dynamic=None`` (healing: fixed windows): static shapes first, as
    torch does by default. Inside, the element-wise work of a block (norms, RoPE, SiLU,
    residuals, casts) fuses into a few kernels; the MLA kernels run as custom ops
    (``torch.ops.mlakit.*``).
    """
    raise_recompile_limit()
    import torch.fx.experimental._config as fx_config

    import mlakit.kernels  # noqa: F401  (registers the custom ops before tracing)

    compiled = torch.compile(_call_block, backend=backend, dynamic=dynamic)
    if not dynamic:
        return compiled

    def call(block, x, cos, sin, positions, mask, cache, options):
        # Dynamo keeps module tensors (the cache buffers, the weights) static-shaped and
        # equates dims of equal size ("duck shaping", e.g. a length that equals the rank):
        # both would make an engine of another batch or length recompile.
        with torch._dynamo.config.patch(force_parameter_static_shapes=False,
                                        force_nn_module_property_static_shapes=False), \
                fx_config.patch(use_duck_shape=False):
            return compiled(block, x, cos, sin, positions, mask, cache, options)

    return call


def capture_graph(fn: Callable[[], torch.Tensor], pool=None, warmup: int = 2):
    """``(graph, output)``: ``fn()`` captured as a CUDA graph, replayed by ``graph.replay()``
    (which rewrites ``output``). ``fn`` must read its inputs from static buffers. The
    warm-up runs (on a side stream, as capture requires) compile kernels and settle the
    allocator; they must leave state as one more call of ``fn`` would (the engine's step
    writes the same tokens at the same positions again). ``pool``: share the memory pool
    of graphs that never run at the same time (``graph.pool()`` of an earlier one)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output
