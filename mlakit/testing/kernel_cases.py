"""The kernels' correctness cases and the comparison logic, shared by the test suite (the
interpreter runner, tests/kernels/_interpreter_runner.py, and the CUDA tests) and
scripts/device/kernels_check.py.

Kept free of pytest and of any mlakit.kernels import at module level: Triton picks
interpreter or compiler when the kernels are decorated, so a process decides on
TRITON_INTERPRET before a case first runs, not when it imports this module.
"""

from __future__ import annotations

import math

DTYPE_TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}

# Tiny shapes for the CPU interpreter: every required feature appears at least once.
# id: (dtype, batch, s_q, heads, rank, rope, max_len, lengths, num_splits or None)
INTERP_DECODE_CASES = {
    "f32-h9-r48-p24-ragged-len1": ("float32", 2, 1, 9, 48, 24, 40, [37, 1], None),
    "f32-h16-r64-p32-sq3-split2": ("float32", 3, 3, 16, 64, 32, 70, [70, 3, 45], 2),
    "f32-h1-r16-p0-nosplit": ("float32", 1, 1, 1, 16, 0, 20, [20], 1),
    "f32-h16-r64-p0-split3": ("float32", 2, 1, 16, 64, 0, 33, [33, 17], 3),
    "f32-h1-r16-p24-sq3-len-eq-sq": ("float32", 2, 3, 1, 16, 24, 9, [3, 8], 2),
    "f16-h9-r48-p24": ("float16", 2, 1, 9, 48, 24, 40, [40, 23], None),
    "bf16-h9-r64-p32-sq3": ("bfloat16", 2, 3, 9, 64, 32, 50, [50, 4], None),
}

# id: (dtype, batch, s, rank, rope, max_len, norm[, per_token]); per_token: cos/sin [b, s, p/2]
# (what the model passes) instead of [max_pos, p/2] tables
INTERP_ROPE_CASES = {
    "f32-r48-p24-norm": ("float32", 2, 3, 48, 24, 10, True),
    "f32-r48-p24-norm-per-token": ("float32", 2, 3, 48, 24, 10, True, True),
    "bf16-r64-p32-per-token": ("bfloat16", 3, 1, 64, 32, 7, False, True),
    "f32-r64-p0": ("float32", 3, 1, 64, 0, 6, False),
    "f32-r16-p32": ("float32", 2, 2, 16, 32, 8, False),
    "bf16-r64-p32-norm": ("bfloat16", 2, 1, 64, 32, 5, True),
    "f16-r48-p24": ("float16", 1, 4, 48, 24, 12, False),
}

# CUDA: larger shapes, incl. the decode-attn-v1 one (scripts/device/kernels_check.py runs
# these too, each in bf16, fp16 and fp32).
CUDA_DECODE_CASES = dict(INTERP_DECODE_CASES)
CUDA_DECODE_CASES.update({
    "bf16-h32-r512-p64-ragged": ("bfloat16", 4, 1, 32, 512, 64, 1000, [1000, 999, 64, 5], None),
    "bf16-h32-r512-p64-sq2-split3": ("bfloat16", 2, 2, 32, 512, 64, 700, [700, 333], 3),
    "f16-h128-r512-p64": ("float16", 2, 1, 128, 512, 64, 513, [513, 200], None),
    "bf16-h32-r512-p64-long": ("bfloat16", 1, 1, 32, 512, 64, 32768, [32768], None),
    "bf16-h9-r128-p32-sq4": ("bfloat16", 5, 4, 9, 128, 32, 2048, [2048, 4, 1000, 1999, 77], None),
    "f32-h32-r512-p64": ("float32", 2, 1, 32, 512, 64, 300, [300, 129], None),
    "bf16-h1-r16-p0-len1": ("bfloat16", 1, 1, 1, 16, 0, 17, [1], None),
    "bf16-h16-r64-p32-len1": ("bfloat16", 3, 1, 16, 64, 32, 300, [300, 1, 129], None),
    "bf16-h16-r64-p32-sq3-split4": ("bfloat16", 3, 3, 16, 64, 32, 300, [300, 3, 129], 4),
    "bf16-h9-r96-p24-sq3-nosplit": ("bfloat16", 2, 3, 9, 96, 24, 257, [257, 70], 1),
    "f16-h128-r512-p64-nosplit": ("float16", 2, 1, 128, 512, 64, 513, [513, 200], 1),
    "bf16-h32-r512-p64-ragged-nosplit": ("bfloat16", 3, 1, 32, 512, 64, 1000, [1000, 1, 130], 1),
    "bf16-h16-r64-p32-sq3-nosplit": ("bfloat16", 3, 3, 16, 64, 32, 300, [300, 3, 129], 1),
})
CUDA_ROPE_CASES = dict(INTERP_ROPE_CASES)
CUDA_ROPE_CASES.update({
    "bf16-r512-p64-norm-b128": ("bfloat16", 128, 1, 512, 64, 256, True),
    "bf16-r512-p64-norm-b4": ("bfloat16", 4, 1, 512, 64, 64, True),
    "bf16-r96-p32": ("bfloat16", 2, 3, 96, 32, 16, False),
})


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gluon_covers(case) -> bool:
    """Whether the Gluon kernel (mlakit.kernels.mla_decode_gluon) takes this case's shape and dtype."""
    import torch

    from mlakit.kernels.mla_decode_gluon import check_shape

    dtype_name, batch, s_q, heads, rank, rope, max_len, lengths, splits = case
    try:
        check_shape(heads, s_q, rank, rope, getattr(torch, dtype_name))
    except ValueError:
        return False
    return True


def run_decode_case(case, device="cpu", seed=0, backend="triton", **gluon_kwargs) -> dict:
    """One kernel vs reference on fresh random inputs: ``backend`` "triton" (the case's split
    count as its config), "gluon" (mla_decode_gluon with the split count and ``gluon_kwargs``)
    or "auto" (mla_decode's own pick). The cache holds NaN past every sequence's length (a
    kernel must not let unused slots reach the output)."""
    import torch

    from mlakit.kernels import mla_decode, mla_decode_reference

    dtype_name, batch, s_q, heads, rank, rope, max_len, lengths, splits = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q_latent, q_rope = rnd(batch, s_q, heads, rank), rnd(batch, s_q, heads, rope)
    kv_cache = rnd(batch + 1, max_len, rank + rope)  # one spare row: the kernel must use row b only
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    unused = torch.arange(max_len, device=device)[None, :] >= torch.cat([lens, lens.new_zeros(1)])[:, None]
    clean = kv_cache.masked_fill(unused[..., None], 0.0)
    kv_cache.masked_fill_(unused[..., None], float("nan"))
    scale = 1.0 / math.sqrt(rank + rope)
    out = torch.full((batch, s_q, heads, rank), float("nan"), dtype=dtype, device=device)  # poison
    if backend == "gluon":
        from mlakit.kernels.mla_decode import mla_decode_gluon

        mla_decode_gluon(q_latent, q_rope, kv_cache, lens, scale, rank, out=out, num_splits=splits, **gluon_kwargs)
    else:
        config = {"num_splits": splits} if splits and backend == "triton" else None
        mla_decode(q_latent, q_rope, kv_cache, lens, scale, rank, out=out, config=config, backend=backend)
    ref = mla_decode_reference(q_latent.float(), q_rope.float(), clean.float(), lens, scale, rank)
    return {"rel_err": rel_err(out, ref), "finite": bool(torch.isfinite(out).all()), "tol": DTYPE_TOL[dtype_name]}


def run_rope_case(case, device="cpu", seed=0) -> dict:
    import torch

    from mlakit.kernels import rope_append, rope_append_reference

    dtype_name, batch, seq, rank, rope, max_len, norm, *per_token = case
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latent = torch.randn(batch, seq, rank, generator=gen).to(device=device, dtype=dtype)
    k_rope = torch.randn(batch, seq, rope, generator=gen).to(device=device, dtype=dtype)
    # distinct positions per sequence; the first token of sequence 0 is padding (-1): skipped
    positions = torch.stack([torch.randperm(max_len, generator=gen)[:seq] for _ in range(batch)]).to(device)
    positions[0, 0] = -1
    cos = torch.randn(max_len, rope // 2, generator=gen).to(device)
    sin = torch.randn(max_len, rope // 2, generator=gen).to(device)
    if per_token and per_token[0]:
        cos, sin = torch.randn(batch, seq, rope // 2, generator=gen).to(device), torch.randn(
            batch, seq, rope // 2, generator=gen).to(device)
    weight = torch.randn(rank, generator=gen).to(device) if norm else None
    cache = torch.full((batch + 1, max_len, rank + rope), float("nan"), dtype=dtype, device=device)  # poison
    cache_ref = cache.clone()
    rope_append(latent, k_rope, cache, positions, cos, sin, weight)
    rope_append_reference(latent, k_rope, cache_ref, positions, cos, sin, weight)
    written = ~torch.isnan(cache_ref)
    return {
        "rel_err": rel_err(cache[written], cache_ref[written]),
        "finite": bool((torch.isnan(cache) == ~written).all()),  # wrote exactly the reference's slots
        "tol": DTYPE_TOL[dtype_name],
    }


# Quantise on write (rope_append_quant). id: (format, dtype, batch, s, rank, rope, max_len, norm, per_token[,
# quantise the RoPE key too: turned by cache_turn where the format stores it turned])
INTERP_ROPE_QUANT_CASES = {
    "int8-f32-r48-p24-quant-rope": ("int8", "float32", 2, 3, 48, 24, 10, True, False, True),  # a partial group
    "int4-bf16-r64-p64-quant-rope": ("int4", "bfloat16", 2, 3, 64, 64, 9, True, True, True),
    "int4-f32-r48-p16-quant-rope": ("int4", "float32", 1, 4, 48, 16, 12, False, False, True),  # key < one group
    "fp8-f16-r64-p32-quant-rope": ("fp8", "float16", 2, 2, 64, 32, 8, False, True, True),  # fp8: not turned
    "int8-f32-r48-p24-norm": ("int8", "float32", 2, 3, 48, 24, 10, True, False),  # a partial group
    "int8-bf16-r128-p32-per-token": ("int8", "bfloat16", 3, 1, 128, 32, 7, False, True),
    "fp8-f32-r64-p32-norm": ("fp8", "float32", 2, 2, 64, 32, 8, True, True),
    "fp8-f16-r96-p0": ("fp8", "float16", 2, 2, 96, 0, 6, False, False),
    "int4-bf16-r64-p32-norm": ("int4", "bfloat16", 2, 3, 64, 32, 9, True, True),
    "int4-f32-r48-p16": ("int4", "float32", 1, 4, 48, 16, 12, False, False),
}
CUDA_ROPE_QUANT_CASES = dict(INTERP_ROPE_QUANT_CASES)
CUDA_ROPE_QUANT_CASES.update({
    "int8-bf16-r512-p64-norm-b128": ("int8", "bfloat16", 128, 1, 512, 64, 256, True, True),
    "fp8-bf16-r512-p64-norm-b4": ("fp8", "bfloat16", 4, 1, 512, 64, 64, True, True),
    "int4-bf16-r512-p64-norm-b16": ("int4", "bfloat16", 16, 2, 512, 64, 64, True, True),
    "int8-bf16-r512-p64-norm-b64-quant-rope": ("int8", "bfloat16", 64, 1, 512, 64, 128, True, True, True),
    "int4-bf16-r512-p64-norm-b16-quant-rope": ("int4", "bfloat16", 16, 2, 512, 64, 64, True, True, True),
    "fp8-bf16-r512-p64-norm-b4-quant-rope": ("fp8", "bfloat16", 4, 1, 512, 64, 64, True, True, True),
})

# a value no quantiser writes: int8 never stores -128, fp8 NaN. int4 may write any byte (all 16
# levels), so its poison only tells the slots apart together with the scales (NaN until written)
_UNWRITTEN = {"int8": -128, "int4": 0}


def run_rope_quant_case(case, device="cpu", seed=0) -> dict:
    """rope_append_quant vs its reference on fresh inputs, into poisoned buffers: the same slots
    written, dequantised rows within float32 rounding (no value more than one step apart)."""
    import torch

    from mlakit.kernels import rope_append_quant, rope_append_quant_reference
    from mlakit.quant import FORMATS, cache_turn, dequantize, turn_width

    fmt_name, dtype_name, batch, seq, rank, rope, max_len, norm, per_token, *more = case
    quant_rope = bool(more and more[0])
    fmt, dtype = FORMATS[fmt_name], getattr(torch, dtype_name)
    turn = cache_turn(rope, device, turn_width(dtype)) if quant_rope and fmt.stores_turned else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latent = (torch.randn(batch, seq, rank, generator=gen) * 3).to(device=device, dtype=dtype)
    k_rope = torch.randn(batch, seq, rope, generator=gen).to(device=device, dtype=dtype)
    positions = torch.stack([torch.randperm(max_len, generator=gen)[:seq] for _ in range(batch)]).to(device)
    positions[0, 0] = -1  # padding: skipped
    angles = (batch, seq) if per_token else (max_len,)
    cos = torch.randn(*angles, rope // 2, generator=gen).to(device)
    sin = torch.randn(*angles, rope // 2, generator=gen).to(device)
    weight = torch.randn(rank, generator=gen).to(device) if norm else None

    def buffers():
        values = torch.empty(batch + 1, max_len, fmt.stored_channels(rank), device=device, dtype=fmt.storage_dtype)
        if fmt_name == "fp8":
            values.view(torch.uint8).fill_(0x7F)  # NaN
        else:
            values.fill_(_UNWRITTEN[fmt_name])
    def quantised(channels):  # values and scales of `channels` per row, poisoned
        values = torch.empty(batch + 1, max_len, fmt.stored_channels(channels), device=device,
                             dtype=fmt.storage_dtype)
        if fmt_name == "fp8":
            values.view(torch.uint8).fill_(0x7F)  # NaN
        else:
            values.fill_(_UNWRITTEN[fmt_name])
        return values, torch.full((batch + 1, max_len, fmt.groups(channels)), float("nan"), device=device)

    def buffers():
        values, scales = quantised(rank)
        if quant_rope:
            rope_cache, rope_scales = quantised(rope)
        else:
            rope_cache = torch.full((batch + 1, max_len, rope), float("nan"), device=device, dtype=dtype)
            rope_scales = None
        return values, scales, rope_cache, rope_scales

    out, ref = buffers(), buffers()
    rope_append_quant(latent, k_rope, *out[:3], positions, cos, sin, fmt_name, weight, rope_scales=out[3],
                      rope_turn=turn)
    rope_append_quant_reference(latent, k_rope, *ref[:3], positions, cos, sin, fmt_name, weight,
                                rope_scales=ref[3], rope_turn=turn)

    def poisoned(values):
        return torch.isnan(values.float()) if fmt_name == "fp8" else values == _UNWRITTEN[fmt_name]

    pairs = [(poisoned(out[0]), poisoned(ref[0])), (torch.isnan(out[1]), torch.isnan(ref[1]))]
    pairs += ([(poisoned(out[2]), poisoned(ref[2])), (torch.isnan(out[3]), torch.isnan(ref[3]))] if quant_rope
              else [(torch.isnan(out[2]), torch.isnan(ref[2]))])
    same_slots = all(bool(torch.equal(a, b)) for a, b in pairs)
    written = ~torch.isnan(ref[1][..., 0])  # [B, L]

    def compare(got_values, got_scales, want_values, want_scales, channels):
        """(steps apart at most, relative error) of two quantised row sets, dequantised."""
        got = dequantize(got_values[written], got_scales[written], fmt, torch.float64)
        want = dequantize(want_values[written], want_scales[written], fmt, torch.float64)
        # a step is |scale|: int4's scale is negative where its group's extreme is positive (q4_0's levels)
        step = want_scales[written].double().abs().repeat_interleave(fmt.group_size, -1)[:, :channels]
        return float(((got - want).abs() / step.clamp_min(1e-30)).max()), rel_err(got, want)

    steps_apart, err = compare(out[0], out[1], ref[0], ref[1], rank)
    if quant_rope and rope:
        rope_steps, rope_err = compare(out[2], out[3], ref[2], ref[3], rope)
        steps_apart, err = max(steps_apart, rope_steps), max(err, rope_err)
    err = err if steps_apart <= 1.0 + 1e-6 else float("inf")
    if rope and not quant_rope:
        err = max(err, rel_err(out[2][written], ref[2][written]))
    return {"rel_err": err, "finite": same_slots, "tol": 1e-2, "steps_apart": steps_apart}


# Decode over a quantised latent. id: (format, dtype, batch, s_q, heads, rank, rope, max_len, lengths, splits,
# quantise the RoPE key too)
INTERP_DECODE_QUANT_CASES = {
    "int8-f32-h9-r48-p24-ragged": ("int8", "float32", 2, 1, 9, 48, 24, 40, [37, 1], None, False),
    "int8-bf16-h16-r64-p32-sq3-split2": ("int8", "bfloat16", 3, 3, 16, 64, 32, 70, [70, 3, 45], 2, False),
    "fp8-f16-h9-r64-p32": ("fp8", "float16", 2, 1, 9, 64, 32, 40, [40, 23], None, False),
    "fp8-bf16-h1-r128-p0-split3": ("fp8", "bfloat16", 2, 1, 1, 128, 0, 33, [33, 17], 3, False),
    "int4-f32-h16-r64-p32-split2": ("int4", "float32", 2, 2, 16, 64, 32, 50, [50, 2], 2, False),
    "int4-bf16-h9-r64-p32-nosplit": ("int4", "bfloat16", 2, 1, 9, 64, 32, 40, [40, 9], 1, False),
    "int8-f32-h4-r64-p64-quant-rope": ("int8", "float32", 2, 1, 4, 64, 64, 30, [30, 11], None, True),
}
CUDA_DECODE_QUANT_CASES = dict(INTERP_DECODE_QUANT_CASES)
CUDA_DECODE_QUANT_CASES.update({
    "int8-bf16-h32-r512-p64-ragged": ("int8", "bfloat16", 4, 1, 32, 512, 64, 1000, [1000, 999, 64, 5], None, False),
    "fp8-bf16-h32-r512-p64-ragged": ("fp8", "bfloat16", 4, 1, 32, 512, 64, 1000, [1000, 999, 64, 5], None, False),
    "int4-bf16-h32-r512-p64-ragged": ("int4", "bfloat16", 4, 1, 32, 512, 64, 1000, [1000, 999, 64, 5], None, False),
    "int8-f16-h128-r512-p64": ("int8", "float16", 2, 1, 128, 512, 64, 513, [513, 200], None, False),
    "fp8-bf16-h32-r512-p64-long": ("fp8", "bfloat16", 1, 1, 32, 512, 64, 32768, [32768], None, False),
    "int8-bf16-h32-r512-p64-sq2-split3": ("int8", "bfloat16", 2, 2, 32, 512, 64, 700, [700, 333], 3, False),
    "fp8-bf16-h16-r512-p64-quant-rope": ("fp8", "bfloat16", 2, 1, 16, 512, 64, 300, [300, 129], None, True),
})


def run_decode_quant_case(case, device="cpu", seed=0) -> dict:
    """mla_decode (quantised cache) vs the quantised reference on fresh inputs; the cache holds NaN
    scales (and NaN fp8 values) past every sequence's length, the output starts as NaN."""
    import torch

    from mlakit.kernels import mla_decode, mla_decode_quant_reference
    from mlakit.quant import FORMATS, quantize

    fmt_name, dtype_name, batch, s_q, heads, rank, rope, max_len, lengths, splits, quant_rope = case
    fmt, dtype = FORMATS[fmt_name], getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q_latent, q_rope = rnd(batch, s_q, heads, rank), rnd(batch, s_q, heads, rope)
    values, scales = quantize(rnd(batch + 1, max_len, rank), fmt)  # one spare row: only rows < batch are read
    k_rope = rnd(batch + 1, max_len, rope)
    rope_scales = None
    if quant_rope:
        k_rope, rope_scales = quantize(k_rope, fmt)
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    unused = torch.arange(max_len, device=device)[None, :] >= torch.cat([lens, lens.new_zeros(1)])[:, None]
    ref = mla_decode_quant_reference(q_latent.float(), q_rope.float(), values, scales, k_rope, lens,
                                     1.0 / math.sqrt(rank + rope), rank, fmt, rope_scales=rope_scales)
    scales.masked_fill_(unused[..., None], float("nan"))  # poison: a kernel must not read them
    if rope_scales is not None:
        rope_scales.masked_fill_(unused[..., None], float("nan"))
    if fmt_name == "fp8":
        values.view(torch.uint8).masked_fill_(unused[..., None], 0x7F)
    if not quant_rope and rope:
        k_rope.masked_fill_(unused[..., None], float("nan"))
    out = torch.full((batch, s_q, heads, rank), float("nan"), dtype=dtype, device=device)
    mla_decode(q_latent, q_rope, values, lens, 1.0 / math.sqrt(rank + rope), rank, out=out,
               config={"num_splits": splits} if splits else None, kv_scales=scales, k_rope=k_rope,
               kv_format=fmt_name, rope_scales=rope_scales)
    return {"rel_err": rel_err(out, ref), "finite": bool(torch.isfinite(out).all()), "tol": DTYPE_TOL[dtype_name]}
