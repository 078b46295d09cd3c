"""decode-attn-v1: one attention layer, one new token per sequence, on one GPU.

Implements the protocol of PROTOCOL.md (section decode-attn-v1): in one process
on one GPU, first the copy-bandwidth ceiling (device-to-device copy of 2 GiB,
bytes read + written), then for each (batch, context) of the grid:

    SDPA MHA / GQA-8 / MQA   torch scaled_dot_product_attention, bf16, head_dim 128
    MLA einsum               absorbed MLA on the latent cache in plain PyTorch
    FlashMLA                 DeepSeek's kernel (dense bf16), when ``flash_mla`` imports
    MLA Gluon                mlakit.kernels.mla_decode's pick on Hopper (mla_decode_gluon.py)
    MLA Triton               mlakit.kernels.mla_decode with backend="triton"

Each row: median microseconds (triton.testing.do_bench: CUDA events, L2 flushed
between runs), cache bytes read / time (GB/s), ratio to the copy bandwidth, and
the speed-up over GQA-8 SDPA.  Random normal data, never zeros.

GQA/MQA are timed two ways: ``enable_gqa=True`` (query [b, heads, 1, d]) and
"folded", where the query heads of one KV group become the query-length axis
([b, kv_heads, group, d] against [b, kv_heads, L, d]) -- exactly grouped-query
attention for one new token.  Speed-ups are against the faster of the two.

"(CUDA graph)" rows time the replay of a captured graph of the same call: the
GPU time without Python launch overhead (what a graph-captured decode step
pays).  The plain rows include whatever launch overhead the host adds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mlakit.bench.args import parse_grid
from mlakit.bench.report import fmt
from mlakit.bench.timing import capture_cuda_graph, device_name, do_bench_ms, measure_copy_gbps

PROTOCOL = "decode-attn-v1"
DEFAULT_GRID: Tuple[Tuple[int, int], ...] = ((1, 32768), (16, 8192), (64, 4096), (128, 8192))
FLASH_MLA_PAGE = 64  # FlashMLA's paged-cache block size
Bench = Callable[[Callable[[], object]], float]  # fn -> median ms


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def mla_einsum_decode(q_latent, q_rope, latent, k_rope, softmax_scale):
    """Absorbed MLA decode in plain PyTorch (bf16 matmuls, fp32 softmax). One new token.

    q_latent [b, h, r], q_rope [b, h, p], latent [b, L, r], k_rope [b, L, p] -> [b, h, r]
    """
    scores = torch.einsum("bhr,blr->bhl", q_latent, latent)
    scores = scores + torch.einsum("bhp,blp->bhl", q_rope, k_rope)
    probs = torch.softmax(scores.float() * softmax_scale, dim=-1).to(latent.dtype)
    return torch.einsum("bhl,blr->bhr", probs, latent)


def _flash_mla_runner(q_latent, q_rope, cache, softmax_scale, rank):
    """Build a FlashMLA (dense bf16, legacy SM90 kernel) call on our cache, or None if unavailable."""
    try:
        import flash_mla  # noqa: F401
        from flash_mla import flash_mla_with_kvcache, get_mla_metadata
    except Exception:  # not installed / does not load
        return None, "flash_mla not importable"
    batch, max_len, width = cache.shape
    if max_len % FLASH_MLA_PAGE:
        return None, f"context not a multiple of {FLASH_MLA_PAGE}"
    q = torch.cat([q_latent, q_rope], dim=-1)[:, None]  # [b, 1, h, r + p]
    blocks_per_seq = max_len // FLASH_MLA_PAGE
    # Our contiguous cache is a paged cache whose pages are in order.
    k_cache = cache.view(batch * blocks_per_seq, FLASH_MLA_PAGE, 1, width)
    block_table = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=cache.device).view(batch, blocks_per_seq)
    seqlens = torch.full((batch,), max_len, dtype=torch.int32, device=cache.device)
    sched, _ = get_mla_metadata()

    def run():
        out, _lse = flash_mla_with_kvcache(
            q, k_cache, block_table, seqlens, rank, sched,
            softmax_scale=softmax_scale, causal=False, use_legacy=True,
        )
        return out[:, 0]  # [b, h, r]

    try:
        run()
        torch.cuda.synchronize()
    except Exception as exc:  # e.g. an unsupported head count
        return None, f"FlashMLA failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return run, ""


class _Rows:
    """The rows of one run: every row carries the protocol, GPU, copy bandwidth and head count."""

    def __init__(self, base: Dict, copy_gbps: float, log: Callable[[str], None]) -> None:
        self.base, self.copy_gbps, self.log = base, copy_gbps, log
        self.rows: List[Dict] = []

    def add(self, batch, context, method, nbytes, ms, flops=None, note="", rel_err=None) -> Dict:
        row = dict(self.base, batch=batch, context=context, method=method, cache_mb=nbytes / 1e6)
        if ms is None:
            row.update(us=None, gbps=None, pct_copy=None, note=note)
        else:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(us=ms * 1e3, gbps=gbps, pct_copy=100 * gbps / self.copy_gbps, note=note)
            if flops is not None:
                row["tflops"] = flops / (ms * 1e-3) / 1e12
        if rel_err is not None:
            row["rel_err"] = rel_err
        self.rows.append(row)
        self.log(f"  b={batch:<4d} ctx={context:<6d} {method:<22s} "
                 + (f"{row['us']:9.1f} us {row['gbps']:7.0f} GB/s {row['pct_copy']:5.1f}%" if ms else note))
        return row


def _sdpa_rows(rows: _Rows, bench: Bench, batch: int, context: int, heads: int, head_dim: int,
               kv_head_counts: Sequence[int], dev: torch.device, dtype: torch.dtype) -> List[Dict]:
    """SDPA MHA / GQA / MQA, each with ``enable_gqa`` and (where groups exist) folded."""
    group_rows = []
    q = torch.randn(batch, heads, 1, head_dim, dtype=dtype, device=dev)
    for kv_heads in kv_head_counts:
        group = heads // kv_heads
        name = "SDPA MHA" if kv_heads == heads else ("SDPA MQA" if kv_heads == 1 else f"SDPA GQA-{kv_heads}")
        try:
            k = torch.randn(batch, kv_heads, context, head_dim, dtype=dtype, device=dev)
            v = torch.randn_like(k)
        except torch.OutOfMemoryError:
            group_rows.append(rows.add(batch, context, name, 0, None, note="out of memory"))
            continue
        nbytes = k.numel() * k.element_size() * 2
        flops = 4 * batch * heads * context * head_dim

        def sdpa(q=q, k=k, v=v, gqa=kv_heads != heads):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

        group_rows.append(rows.add(batch, context, name, nbytes, bench(sdpa), flops))
        if group > 1:
            q_folded = q.view(batch, kv_heads, group, head_dim)  # heads of a group -> query length

            def sdpa_folded(q_folded=q_folded, k=k, v=v):
                return torch.nn.functional.scaled_dot_product_attention(q_folded, k, v)

            group_rows.append(rows.add(batch, context, name + " folded", nbytes, bench(sdpa_folded), flops))
        del k, v
    del q
    torch.cuda.empty_cache()
    return group_rows


def _mla_rows(rows: _Rows, bench: Bench, batch: int, context: int, heads: int, rank: int, rope: int,
              dev: torch.device, dtype: torch.dtype, include_baselines: bool, include_flash_mla: bool,
              mla_config: Optional[dict], cuda_graphs: bool) -> List[Dict]:
    """MLA on the latent cache: einsum (the reference of the others' rel err), FlashMLA,
    and mlakit's kernels (the one mla_decode picks by itself, Gluon on Hopper, and Triton)."""
    from mlakit.kernels import mla_decode, mla_decode_gluon

    group_rows = []
    cache = torch.randn(batch, context, rank + rope, dtype=dtype, device=dev)  # [b, L, r + p]
    q_latent = torch.randn(batch, heads, rank, dtype=dtype, device=dev)  # [b, h, r]
    q_rope = torch.randn(batch, heads, rope, dtype=dtype, device=dev)  # [b, h, p]
    # Absorbed queries have grown by the up-projection; a realistic scale keeps the softmax non-degenerate.
    softmax_scale = 1.0 / math.sqrt(rank + rope)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=dev)
    nbytes = cache.numel() * cache.element_size()
    flops = 2 * batch * heads * context * (rank + rope) + 2 * batch * heads * context * rank
    latent, k_rope = cache[..., :rank], cache[..., rank:]

    def einsum_fn():
        return mla_einsum_decode(q_latent, q_rope, latent, k_rope, softmax_scale)

    ref = None
    if include_baselines:
        try:
            ref = einsum_fn()
            group_rows.append(rows.add(batch, context, "MLA einsum (PyTorch)", nbytes, bench(einsum_fn), flops))
        except torch.OutOfMemoryError:
            group_rows.append(rows.add(batch, context, "MLA einsum (PyTorch)", nbytes, None, note="out of memory"))
        torch.cuda.empty_cache()

    if include_flash_mla:
        run, why = _flash_mla_runner(q_latent, q_rope, cache, softmax_scale, rank)
        if run is None:
            group_rows.append(rows.add(batch, context, "FlashMLA", nbytes, None, note=why))
        else:
            err = _rel_err(run(), ref) if ref is not None else None
            group_rows.append(rows.add(batch, context, "FlashMLA", nbytes, bench(run), flops, rel_err=err))
            if cuda_graphs:
                group_rows.append(rows.add(batch, context, "FlashMLA (CUDA graph)", nbytes,
                                           bench(capture_cuda_graph(run)), flops))

    q4_latent, q4_rope = q_latent[:, None], q_rope[:, None]  # [b, 1, h, *]
    out = torch.empty_like(q4_latent)
    backends = ["triton"]
    if mla_config is None and mla_decode_gluon.applies(q4_latent, cache, rope):
        backends.insert(0, "gluon")
    for backend in backends:
        name = {"gluon": "MLA Gluon", "triton": "MLA Triton"}[backend]

        def kernel_fn(backend=backend):
            return mla_decode(q4_latent, q4_rope, cache, lengths, softmax_scale, rank, out=out,
                              config=mla_config if backend == "triton" else None, backend=backend)

        kernel_fn()
        err = _rel_err(out[:, 0], ref) if ref is not None else None
        group_rows.append(rows.add(batch, context, f"{name} (mlakit)", nbytes, bench(kernel_fn), flops, rel_err=err))
        if cuda_graphs:
            group_rows.append(rows.add(batch, context, f"{name} (CUDA graph)", nbytes,
                                       bench(capture_cuda_graph(kernel_fn)), flops))
    del cache, q_latent, q_rope, out, ref, latent, k_rope
    torch.cuda.empty_cache()
    return group_rows


def _sparse_group_rows(rows: _Rows, bench: Bench, dense_rows: List[Dict], batch: int, context: int, heads: int,
                       rank: int, rope: int, dev, dtype, sparse, cuda_graphs: bool) -> List[Dict]:
    """Top-k sparse decode rows (mlakit.bench.sparse) beside the dense ones, on fresh random inputs."""
    from mlakit.bench.sparse import sparse_rows

    cache = torch.randn(batch, context, rank + rope, dtype=dtype, device=dev)  # [b, L, r + p]
    q_latent = torch.randn(batch, 1, heads, rank, dtype=dtype, device=dev)
    q_rope = torch.randn(batch, 1, heads, rope, dtype=dtype, device=dev)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=dev)
    out = sparse_rows(rows.add, dense_rows, q_latent, q_rope, cache, lengths, 1.0 / math.sqrt(rank + rope), sparse,
                      bench, capture_cuda_graph if cuda_graphs else None)
    del cache, q_latent, q_rope
    torch.cuda.empty_cache()
    return out


def run_attention_bench(
    grid: Sequence[Tuple[int, int]] = DEFAULT_GRID,
    heads: int = 32,
    head_dim: int = 128,
    kv_lora_rank: int = 512,
    rope_dim: int = 64,
    kv_head_counts: Optional[Sequence[int]] = None,
    device: str = "cuda",
    include_baselines: bool = True,
    include_flash_mla: bool = True,
    mla_config: Optional[dict] = None,
    cuda_graphs: bool = True,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    copy_bytes: int = 2 << 30,
    log: Optional[Callable[[str], None]] = None,
    sparse=None,
) -> List[Dict]:
    """Run decode-attn-v1 and return one dict per (row, method), the copy ceiling first.
    ``sparse`` (a ForwardOptions with ``sparse_topk``) adds the sparse rows (mlakit.bench.sparse)."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{PROTOCOL} needs a CUDA GPU")
    dev = torch.device(device)
    gpu = device_name(dev)
    dtype = torch.bfloat16
    log = log or (lambda msg: None)
    if kv_head_counts is None:
        kv_head_counts = [k for k in (heads, 8, 1) if heads % k == 0]
    kv_head_counts = list(dict.fromkeys(kv_head_counts))

    def bench(fn: Callable[[], object]) -> float:
        return do_bench_ms(fn, warmup_ms, rep_ms)

    copy_gbps = measure_copy_gbps(dev, copy_bytes, warmup_ms, rep_ms)
    log(f"copy bandwidth {copy_gbps:.0f} GB/s on {gpu}")
    rows = _Rows(dict(protocol=PROTOCOL, gpu=gpu, copy_gbps=copy_gbps, heads=heads), copy_gbps, log)
    rows.rows.append(dict(rows.base, batch=0, context=0, method=f"copy {copy_bytes / 2**30:g} GiB D2D",
                          cache_mb=copy_bytes / 1e6, us=2 * copy_bytes / copy_gbps / 1e3,
                          gbps=copy_gbps, pct_copy=100.0))
    for batch, context in grid:
        group_rows = []
        if include_baselines:
            group_rows += _sdpa_rows(rows, bench, batch, context, heads, head_dim, kv_head_counts, dev, dtype)
        group_rows += _mla_rows(rows, bench, batch, context, heads, kv_lora_rank, rope_dim, dev, dtype,
                                include_baselines, include_flash_mla, mla_config, cuda_graphs)
        if sparse is not None:
            group_rows += _sparse_group_rows(rows, bench, group_rows, batch, context, heads, kv_lora_rank, rope_dim,
                                             dev, dtype, sparse, cuda_graphs)
        # Speed-ups against the faster of the two GQA-8 formulations.
        gqa8 = [r["us"] for r in group_rows if r["method"].startswith("SDPA GQA-8") and r.get("us")]
        for r in group_rows:
            if gqa8 and r.get("us"):
                r["speedup_vs_gqa8"] = min(gqa8) / r["us"]
    return rows.rows


def format_table(rows: List[Dict]) -> str:
    """Markdown table of run_attention_bench rows, headed by protocol, GPU and copy bandwidth."""
    if not rows:
        return "(no rows)"
    head = rows[0]
    lines = [
        f"{head['protocol']} on {head['gpu']} (copy {head['copy_gbps']:.0f} GB/s, {head['heads']} query heads)",
        "",
        "| batch | context | method | cache MB | us | GB/s | % copy | vs GQA-8 | TFLOP/s | rel err | note |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch'] or ''} | {r['context'] or ''} | {r['method']} | {r['cache_mb']:.0f} | {fmt(r.get('us'), '.1f')} "
            f"| {fmt(r.get('gbps'), '.0f')} | {fmt(r.get('pct_copy'), '.1f')} | {fmt(r.get('speedup_vs_gqa8'), '.2f')} "
            f"| {fmt(r.get('tflops'), '.1f')} | {fmt(r.get('rel_err'), '.1e')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def register(subparsers) -> argparse.ArgumentParser:
    """Add ``attention`` to the ``mlakit bench`` benchmarks (``mlakit.bench.cli.run_from_args`` runs it)."""
    parser = subparsers.add_parser(
        "attention", help="decode-attn-v1: one attention layer, MHA/GQA/MQA (SDPA) vs MLA kernels",
        description="decode-attn-v1: decode time of one attention layer per (batch, context), "
                    "GB/s of cache read and the ratio to the copy bandwidth, on one CUDA GPU. Rows: MHA, "
                    "GQA and MQA through SDPA, MLA in plain PyTorch, FlashMLA (when importable), and "
                    "mlakit's MLA kernels (Gluon on Hopper beside Triton), eager and as a CUDA graph.")
    parser.add_argument("--grid", type=parse_grid, default=list(DEFAULT_GRID),
                        help="comma-separated BATCHxCONTEXT pairs (default: the protocol grid 1x32768,16x8192,64x4096,128x8192)")
    parser.add_argument("--shape", default="32,512,64",
                        help="HEADS,KV_LORA_RANK,ROPE_DIM of the MLA layer (default 32,512,64; a converted SmolLM2: 9,64,32)")
    parser.add_argument("--head-dim", type=int, default=128, help="head_dim of the SDPA baselines (default 128)")
    parser.add_argument("--kv-heads", default=None, help="comma-separated KV head counts of the SDPA baselines (default: HEADS,8,1 where they divide HEADS)")
    parser.add_argument("--no-baselines", action="store_true", help="skip SDPA and einsum rows")
    parser.add_argument("--no-flash-mla", action="store_true", help="skip FlashMLA even if importable")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (ms)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--sparse-topk", type=int, default=None, metavar="K",
                        help="add rows of top-K sparse MLA decode (docs/sparse.md) beside the dense kernels")
    parser.add_argument("--sparse-window", type=int, default=64, help="with --sparse-topk: recent slots always kept")
    parser.add_argument("--sparse-sink", type=int, default=4, help="with --sparse-topk: first slots always kept")
    parser.add_argument("--sparse-index-rank", type=int, default=64,
                        help="with --sparse-topk: latent channels of the index (plus the RoPE key)")
    return parser


def _sparse_options(args: argparse.Namespace):
    if getattr(args, "sparse_topk", None) is None:
        return None
    from mlakit.options import ForwardOptions

    return ForwardOptions(sparse_topk=args.sparse_topk, sparse_window=args.sparse_window,
                          sparse_sink=args.sparse_sink, sparse_index_rank=args.sparse_index_rank)


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit.errors import MlakitError

    if not torch.cuda.is_available():
        raise MlakitError(f"{PROTOCOL} times GPU kernels and needs a CUDA GPU")
    try:
        heads, rank, rope = (int(x) for x in args.shape.split(","))
    except ValueError:
        raise MlakitError(f"--shape must be HEADS,KV_LORA_RANK,ROPE_DIM, got {args.shape!r}") from None
    kv_heads = [int(x) for x in args.kv_heads.split(",")] if args.kv_heads else None
    rows = run_attention_bench(
        grid=args.grid, heads=heads, head_dim=args.head_dim, kv_lora_rank=rank, rope_dim=rope,
        kv_head_counts=kv_heads, include_baselines=not args.no_baselines,
        include_flash_mla=not args.no_flash_mla, rep_ms=args.rep_ms,
        log=lambda msg: print(msg, file=sys.stderr, flush=True), sparse=_sparse_options(args),
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0
