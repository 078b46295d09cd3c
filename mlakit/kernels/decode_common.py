"""What every MLA decode kernel shares: Triton's availability, the launch configuration, the
split-KV partials and their merge kernel, the argument checks and the PyTorch reference.

``mla_decode`` (the dispatcher), ``mla_decode_gluon`` (Hopper), ``mla_decode_quant`` (a
quantised latent) and ``rope_append`` import from here; nothing here imports them, so the
dispatch runs one way: mla_decode -> {Triton, Gluon, quantised} -> decode_common.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: without it everything falls back to the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    HAS_TRITON = False

# Triton decides between compiling and interpreting when a kernel is *decorated*
# (at import of this module), so the mode is read once here and dispatch follows it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------
# Argument checks shared by the decode kernels (dense, quantised, sparse), their references
# and the quantised cache append
# ---------------------------------------------------------------------------


def check_queries(q_latent, q_rope, kv_lora_rank, allow_fp64=False) -> int:
    """``q_latent [batch, s_q, heads, kv_lora_rank]`` and ``q_rope [batch, s_q, heads, rope_dim]``
    of one supported dtype (float64 only for the references); returns rope_dim."""
    if q_latent.dim() != 4:
        raise ValueError(f"q_latent must be [batch, s_q, heads, kv_lora_rank], got shape {tuple(q_latent.shape)}")
    if q_rope.dim() != 4:
        raise ValueError(f"q_rope must be [batch, s_q, heads, rope_dim], got shape {tuple(q_rope.shape)}")
    batch, s_q, heads, rank = q_latent.shape
    if rank != kv_lora_rank:
        raise ValueError(f"q_latent last dim {rank} != kv_lora_rank {kv_lora_rank}")
    if tuple(q_rope.shape[:3]) != (batch, s_q, heads):
        raise ValueError(f"q_rope {tuple(q_rope.shape)} must share [batch, s_q, heads] with q_latent {tuple(q_latent.shape)}")
    supported = SUPPORTED_DTYPES + ((torch.float64,) if allow_fp64 else ())
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope)):
        if t.dtype not in supported:
            raise TypeError(f"{name} dtype {t.dtype} not supported ({', '.join(str(d)[6:] for d in supported)})")
    if q_rope.dtype != q_latent.dtype:
        raise TypeError(f"q_latent ({q_latent.dtype}) and q_rope ({q_rope.dtype}) must share one dtype")
    return q_rope.shape[3]


def check_latent_cache(kv_cache, q_latent, q_rope, kv_lora_rank) -> None:
    """The packed cache ``[max_batch >= batch, max_len, kv_lora_rank + rope_dim]`` in the queries' dtype."""
    if kv_cache.dim() != 3:
        raise ValueError(
            f"kv_cache must be [max_batch, max_len, kv_lora_rank + rope_dim], got shape {tuple(kv_cache.shape)}"
        )
    rope_dim = q_rope.shape[3]
    if kv_cache.shape[2] != kv_lora_rank + rope_dim:
        raise ValueError(
            f"kv_cache last dim {kv_cache.shape[2]} != kv_lora_rank {kv_lora_rank} + rope_dim {rope_dim}"
        )
    check_capacity(kv_cache, q_latent.shape[0])
    if kv_cache.dtype != q_latent.dtype:
        raise TypeError(
            f"q_latent ({q_latent.dtype}), q_rope ({q_rope.dtype}) and kv_cache ({kv_cache.dtype}) must share one dtype"
        )


def check_quant_buffers(fmt, rank: int, rope_dim: int, values, scales, rope, rope_scales, rope_name: str) -> None:
    """The buffers of a quantised latent cache in format ``fmt`` (``mlakit.quant``): ``values``
    and ``scales`` of the latent, the RoPE key ``rope`` (16-bit, or quantised with ``rope_scales``),
    all ``[max_batch, max_len, *]`` alike."""
    expect = [("values", values, fmt.stored_channels(rank), fmt.storage_dtype),
              ("scales", scales, fmt.groups(rank), fmt.scale_dtype)]
    if rope_scales is None:
        expect.append((rope_name, rope, rope_dim, None))
    else:
        expect += [(rope_name, rope, fmt.stored_channels(rope_dim), fmt.storage_dtype),
                   ("rope_scales", rope_scales, fmt.groups(rope_dim), fmt.scale_dtype)]
    for name, t, channels, dtype in expect:
        if t.dim() != 3 or t.shape[:2] != values.shape[:2] or t.shape[2] != channels:
            raise ValueError(f"{name} must be [max_batch, max_len, {channels}] like values "
                             f"{tuple(values.shape[:2])}, got {tuple(t.shape)}")
        if (t.dtype != dtype) if dtype is not None else not t.is_floating_point():
            raise TypeError(f"{name} must be {dtype or 'floating point'}, got {t.dtype}")


def check_capacity(cache, batch: int, name: str = "kv_cache") -> None:
    if cache.shape[0] < batch:
        raise ValueError(f"{name} holds {cache.shape[0]} sequences, fewer than batch {batch}")


def check_lengths(lengths, batch: int) -> None:
    """``lengths [batch]``, int32 or int64."""
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [batch], got shape {tuple(lengths.shape)}")
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths has {lengths.shape[0]} entries, batch is {batch}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"lengths must be int32 or int64, got {lengths.dtype}")


def check_one_device(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")


def check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=False) -> int:
    """Validate shapes/dtypes/devices of a decode over the packed cache; return rope_dim.
    float64 only for the reference."""
    rope_dim = check_queries(q_latent, q_rope, kv_lora_rank, allow_fp64)
    check_latent_cache(kv_cache, q_latent, q_rope, kv_lora_rank)
    check_lengths(lengths, q_latent.shape[0])
    check_one_device(q_latent, q_rope, kv_cache, lengths)
    return rope_dim


# ---------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------


def mla_decode_reference(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """Plain PyTorch absorbed MLA decode (fp32 math; fp64 for fp64 inputs), same contract as ``mla_decode``.

    Query i of the s_q-token chunk of sequence b sees cache slots
    [0, lengths[b] - s_q + i].  Rows that see no slot (lengths[b] < s_q) give 0.
    """
    check_decode_args(q_latent, q_rope, kv_cache, lengths, kv_lora_rank, allow_fp64=True)
    batch, s_q, _, rank = q_latent.shape
    math_dtype = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    cache = kv_cache[:batch].to(math_dtype)  # [b, L, r + p]
    latent, k_rope = cache[..., :rank], cache[..., rank:]  # [b, L, r], [b, L, p]
    scores = torch.einsum("bshr,blr->bshl", q_latent.to(math_dtype), latent)
    scores = scores + torch.einsum("bshp,blp->bshl", q_rope.to(math_dtype), k_rope)
    scores = scores * softmax_scale  # [b, s, h, L]

    slots = torch.arange(cache.shape[1], device=cache.device)  # [L]
    last_visible = lengths.to(cache.device).long()[:, None] - s_q + torch.arange(s_q, device=cache.device)  # [b, s]
    visible = slots[None, None, :] <= last_visible[:, :, None]  # [b, s, L]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.einsum("bshl,blr->bshr", probs, latent)
    return out.to(q_latent.dtype)


# ---------------------------------------------------------------------------
# The merge of split-KV partials
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _mla_decode_combine_kernel(
        part_out_ptr, part_lse_ptr, out_ptr,
        num_splits,
        num_heads,
        num_rows,
        stride_pb, stride_pm, stride_ps,
        stride_ob, stride_os, stride_oh,
        RANK: tl.constexpr,
        BLOCK_SPLITS: tl.constexpr,  # next_pow2(num_splits)
        BLOCK_RC: tl.constexpr,  # slice of the rank handled by one program
        WAIT_PRIOR: tl.constexpr,  # launched early (programmatic dependent launch): wait for the split kernel
    ):
        # Grid: (rank slices, rows, batch).  out = sum_s w_s * part_out_s with
        # w_s = exp2(lse_s - max) / sum(...): the usual flash-decoding merge.
        if WAIT_PRIOR:
            tl.extra.cuda.gdc_wait()  # the partials are complete and visible past this point
        pid_rc = tl.program_id(0)
        row = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_SPLITS)
        offs_r = pid_rc * BLOCK_RC + tl.arange(0, BLOCK_RC)
        s_mask = offs_s < num_splits
        r_mask = offs_r < RANK

        part_row = pid_b * stride_pb + row * stride_pm
        lse = tl.load(part_lse_ptr + (pid_b * num_rows + row) * num_splits + offs_s, mask=s_mask, other=float("-inf"))
        lse_max = tl.max(lse, 0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # row that saw no slot -> output 0
        weights = tl.exp2(lse - lse_max)  # [BLOCK_SPLITS], 0 for empty splits
        total = tl.sum(weights, 0)
        weights = weights / tl.where(total == 0.0, 1.0, total)

        parts = tl.load(
            part_out_ptr + part_row + offs_s[:, None] * stride_ps + offs_r[None, :],
            mask=s_mask[:, None] & r_mask[None, :], other=0.0,
        )  # [BLOCK_SPLITS, BLOCK_RC]
        merged = tl.sum(parts * weights[:, None], 0)  # [BLOCK_RC]
        tok = row // num_heads
        head = row % num_heads
        tl.store(out_ptr + pid_b * stride_ob + tok * stride_os + head * stride_oh + offs_r,
                 merged.to(out_ptr.dtype.element_ty), mask=r_mask)


# ---------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=1024)  # decode calls repeat the same shapes: keep host overhead low
def default_config(batch: int, s_q: int, heads: int, rank: int, rope_dim: int, max_len: int,
                   device: torch.device, dtype: torch.dtype) -> dict:
    """Block sizes, warps, stages and split count for one call (tuned by a sweep on an H200, see docs/kernels.md)."""
    rows = s_q * heads
    # fp32 (tests only) runs the dots on FMA units with operands in registers: keep tiles small.
    block_h = min(32 if dtype == torch.float32 else 64, max(16, triton.next_power_of_2(rows)))
    block_r = max(16, triton.next_power_of_2(rank))
    row_blocks = triton.cdiv(rows, block_h)
    # Measured on an H200 (docs/kernels.md, sweep of 2026-11): latency, not bandwidth,
    # limits these tiles, so what helps is more cache bytes in flight per SM: 3 stages,
    # and two resident programs per SM (occupancy 2) where the tiles allow it.
    if dtype == torch.float32:
        block_n, num_warps, num_stages, occupancy = (16 if block_r >= 256 else 32), 4, 1, 1
    elif block_r >= 256 and block_h <= 32:
        # 32 heads x rank 512: 112 KB shared memory, two programs per SM.
        block_n, num_warps, num_stages, occupancy = 32, 4, 3, 2
    elif block_r >= 256:
        # 64-row blocks (>= 64 heads): wgmma-sized tiles, one program per SM.
        block_n, num_warps, num_stages, occupancy = 64, 8, 2, 1
    else:
        # small ranks (converted small models): small tiles, long key blocks.
        block_n, num_warps, num_stages, occupancy = 128, 4, 3, 2
    if device.type == "cuda":
        sms = num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 4  # interpreter: a few splits so that the combine pass gets exercised
    # Flash-decoding: split the KV so that the programs fill the SMs in whole waves.
    # Rounding *down* matters: 16 sequences x 9 splits = 144 programs on 132 SMs would
    # need a second, nearly empty wave.  More splits than SMs only add combine work.
    programs = batch * row_blocks
    num_splits = max(1, min(occupancy * sms // programs, triton.cdiv(max_len, block_n), sms))
    return dict(block_h=block_h, block_n=block_n, num_warps=num_warps, num_stages=num_stages, num_splits=num_splits)


# The compiled kernels of the last launch (for diagnostics: registers, spills, shared memory).
LAST_COMPILED: dict = {}


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def split_partials(batch: int, rows: int, num_splits: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-KV partials: ``part_out [batch, rows, splits, rank]`` and ``part_lse [batch, rows,
    splits]``, both fp32 and contiguous (their traffic stays mostly in L2: a few MB)."""
    return (torch.empty((batch, rows, num_splits, rank), dtype=torch.float32, device=device),
            torch.empty((batch, rows, num_splits), dtype=torch.float32, device=device))


def merge_partials(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, early_launch: bool = False) -> None:
    """``out [batch, s_q, heads, rank]`` from the splits' partials (``split_partials``' layout).

    ``early_launch``: programmatic dependent launch (Hopper): the merge grid is set up while
    the split kernel still runs (from its ``griddepcontrol.launch_dependents`` on) and waits
    in ``gdc_wait`` for its results, which hides this launch's latency."""
    batch, rows, num_splits, rank = part_out.shape
    block_splits = max(2, triton.next_power_of_2(num_splits))
    # Keep one program's tile at <= 4096 fp32 values (no register spills).
    block_rc = max(16, min(max(16, triton.next_power_of_2(rank)), 4096 // block_splits))
    LAST_COMPILED["combine"] = _mla_decode_combine_kernel[(triton.cdiv(rank, block_rc), rows, batch)](
        part_out, part_lse, out,
        num_splits, out.shape[2], rows,
        *part_out.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        RANK=rank,
        BLOCK_SPLITS=block_splits, BLOCK_RC=block_rc, WAIT_PRIOR=early_launch,
        num_warps=4, **({"launch_pdl": True} if early_launch else {}),
    )


