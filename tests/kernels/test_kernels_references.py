"""The PyTorch references against independent float64 math, weight absorption, argument checks.

These need neither Triton nor a GPU.
"""

import math

import pytest
import torch

from mlakit.kernels import (
    INTERPRET,
    absorb_output,
    absorb_query,
    mla_decode,
    mla_decode_reference,
    rope_append,
    rope_append_reference,
)


def naive_attention_fp64(q_latent, q_rope, kv_cache, lengths, scale, rank):
    """Softmax attention from scratch in float64 over the concatenated key [latent, k_rope]."""
    batch, s_q = q_latent.shape[:2]
    q = torch.cat([q_latent, q_rope], dim=-1).double()  # [b, s, h, r + p]
    keys = kv_cache[:batch].double()  # [b, L, r + p]
    values = keys[..., :rank]  # [b, L, r]
    scores = torch.einsum("bshd,bld->bshl", q, keys) * scale
    slot = torch.arange(keys.shape[1])[None, None, :]  # [1, 1, L]
    last = lengths.long()[:, None, None] - s_q + torch.arange(s_q)[None, :, None]  # [b, s, 1]
    mask = (slot <= last)[:, :, None, :]  # [b, s, 1, L]
    scores = torch.where(mask, scores, torch.tensor(-math.inf, dtype=torch.float64))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bshl,blr->bshr", weights, values)


@pytest.mark.parametrize("batch,s_q,heads,rank,rope,max_len,lengths", [
    (2, 1, 9, 48, 24, 40, [37, 1]),
    (3, 3, 16, 64, 32, 70, [70, 3, 45]),
    (1, 1, 1, 16, 0, 20, [20]),
    (2, 2, 4, 512, 64, 130, [130, 64]),
])
def test_reference_matches_fp64_naive_attention(batch, s_q, heads, rank, rope, max_len, lengths):
    gen = torch.Generator().manual_seed(7)
    q_latent = torch.randn(batch, s_q, heads, rank, generator=gen)
    q_rope = torch.randn(batch, s_q, heads, rope, generator=gen)
    kv_cache = torch.randn(batch + 2, max_len, rank + rope, generator=gen)
    lens = torch.tensor(lengths)
    scale = 1.0 / math.sqrt(rank + rope)
    ref = mla_decode_reference(q_latent, q_rope, kv_cache, lens, scale, rank)
    naive = naive_attention_fp64(q_latent, q_rope, kv_cache, lens, scale, rank)
    assert ref.dtype == torch.float32 and ref.shape == (batch, s_q, heads, rank)
    assert float((ref.double() - naive).norm() / naive.norm()) < 1e-5


def test_absorbed_equals_decompressed_mla():
    """q_nope.(W_uk c) + q_rope.k_rope == absorbed form; W_uv applied after attention == before."""
    gen = torch.Generator().manual_seed(3)
    batch, s_q, heads, nope, rope, rank, v_dim, max_len = 2, 2, 4, 16, 8, 24, 12, 30
    q_nope = torch.randn(batch, s_q, heads, nope, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(batch, s_q, heads, rope, generator=gen, dtype=torch.float64)
    w_uk = torch.randn(heads, nope, rank, generator=gen, dtype=torch.float64) / math.sqrt(rank)
    w_uv = torch.randn(heads, rank, v_dim, generator=gen, dtype=torch.float64) / math.sqrt(rank)
    kv_cache = torch.randn(batch, max_len, rank + rope, generator=gen, dtype=torch.float64)
    lens = torch.tensor([max_len, 11])
    scale = 1.0 / math.sqrt(nope + rope)

    # Decompressed: per-head keys and values, as transformers does it.
    latent, k_rope = kv_cache[..., :rank], kv_cache[..., rank:]
    k_nope = torch.einsum("blr,hdr->blhd", latent, w_uk)  # [b, L, h, nope]
    values = torch.einsum("blr,hrv->blhv", latent, w_uv)  # [b, L, h, v]
    scores = (torch.einsum("bshd,blhd->bshl", q_nope, k_nope)
              + torch.einsum("bshp,blp->bshl", q_rope, k_rope)) * scale
    slot = torch.arange(max_len)[None, None, :]
    last = lens[:, None, None] - s_q + torch.arange(s_q)[None, :, None]
    scores = scores.masked_fill(~(slot <= last)[:, :, None, :], -math.inf)
    expected = torch.einsum("bshl,blhv->bshv", torch.softmax(scores, -1), values)

    q_latent = absorb_query(q_nope, w_uk)  # [b, s, h, r]
    out = absorb_output(mla_decode_reference(q_latent, q_rope, kv_cache, lens, scale, rank), w_uv)
    assert out.shape == expected.shape
    assert float((out - expected).norm() / expected.norm()) < 1e-5


def test_rope_append_reference_formula():
    gen = torch.Generator().manual_seed(5)
    batch, seq, rank, rope, max_len = 2, 2, 8, 6, 7
    latent = torch.randn(batch, seq, rank, generator=gen)
    k_rope = torch.randn(batch, seq, rope, generator=gen)
    positions = torch.tensor([[3, -1], [0, 6]])  # -1: padding, skipped
    cos, sin = torch.randn(max_len, rope // 2, generator=gen), torch.randn(max_len, rope // 2, generator=gen)
    weight = torch.randn(rank, generator=gen)
    cache = torch.full((batch, max_len, rank + rope), float("nan"))
    rope_append_reference(latent, k_rope, cache, positions, cos, sin, weight, norm_eps=1e-6)

    x, k, pos = latent[1, 1], k_rope[1, 1], 6
    normed = x / torch.sqrt((x * x).mean() + 1e-6) * weight
    half = rope // 2
    rotated = torch.cat([k[:half] * cos[pos] - k[half:] * sin[pos], k[half:] * cos[pos] + k[:half] * sin[pos]])
    torch.testing.assert_close(cache[1, 6], torch.cat([normed, rotated]))
    written = ~torch.isnan(cache[..., 0])
    assert written.sum() == 3 and written[0, 3] and written[1, 0] and written[1, 6]


def test_rope_append_per_token_angles_equal_table():
    """cos/sin given per token ([b, s, p/2], what the model passes) == the table rows of the positions."""
    gen = torch.Generator().manual_seed(6)
    batch, seq, rank, rope, max_len = 3, 2, 8, 6, 9
    latent, k_rope = torch.randn(batch, seq, rank, generator=gen), torch.randn(batch, seq, rope, generator=gen)
    positions = torch.tensor([[3, 4], [0, 1], [7, 8]])
    cos, sin = torch.randn(max_len, rope // 2, generator=gen), torch.randn(max_len, rope // 2, generator=gen)
    weight = torch.randn(rank, generator=gen)
    table, per_token = torch.zeros(batch, max_len, rank + rope), torch.zeros(batch, max_len, rank + rope)
    rope_append_reference(latent, k_rope, table, positions, cos, sin, weight)
    rope_append_reference(latent, k_rope, per_token, positions, cos[positions], sin[positions], weight)
    torch.testing.assert_close(per_token, table, rtol=0, atol=0)


@pytest.mark.skipif(INTERPRET, reason="under TRITON_INTERPRET the CPU path is the kernel")
def test_cpu_dispatch_uses_reference():
    gen = torch.Generator().manual_seed(1)
    q_latent, q_rope = torch.randn(1, 1, 2, 16, generator=gen), torch.randn(1, 1, 2, 8, generator=gen)
    kv_cache, lens = torch.randn(1, 5, 24, generator=gen), torch.tensor([4])
    torch.testing.assert_close(mla_decode(q_latent, q_rope, kv_cache, lens, 0.3, 16),
                               mla_decode_reference(q_latent, q_rope, kv_cache, lens, 0.3, 16), rtol=0, atol=0)


def test_absorb_query_is_batched_matmul():
    q_nope, w_uk = torch.randn(2, 3, 4, 5), torch.randn(4, 5, 6)
    expected = torch.stack([q_nope[:, :, h] @ w_uk[h] for h in range(4)], dim=2)
    torch.testing.assert_close(absorb_query(q_nope, w_uk), expected)
    o_latent, w_uv = torch.randn(2, 3, 4, 6), torch.randn(4, 6, 7)
    expected = torch.stack([o_latent[:, :, h] @ w_uv[h] for h in range(4)], dim=2)
    torch.testing.assert_close(absorb_output(o_latent, w_uv), expected)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.update(kv_cache=torch.randn(2, 5, 23)), "kv_cache last dim"),
    (lambda a: a.update(q_rope=torch.randn(2, 1, 3, 8)), "q_rope"),
    (lambda a: a.update(lengths=torch.tensor([4.0, 5.0])), "lengths must be int"),
    (lambda a: a.update(lengths=torch.tensor([4])), "lengths has 1 entries"),
    (lambda a: a.update(q_latent=torch.randn(2, 1, 2, 16, dtype=torch.float64)), "dtype"),
    (lambda a: a.update(kv_cache=torch.randn(1, 5, 24)), "fewer than batch"),
])
def test_mla_decode_argument_errors(mutate, message):
    args = dict(q_latent=torch.randn(2, 1, 2, 16), q_rope=torch.randn(2, 1, 2, 8),
                kv_cache=torch.randn(2, 5, 24), lengths=torch.tensor([4, 5]))
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        mla_decode(args["q_latent"], args["q_rope"], args["kv_cache"], args["lengths"], 0.3, 16)


def test_mla_decode_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        mla_decode(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 8), torch.randn(1, 5, 24), torch.tensor([4]),
                   0.3, 16, backend="cuda")


def test_mla_decode_forced_gluon_says_why_it_cannot_run():
    """backend="gluon" (and mla_decode_gluon) on a CPU tensor: an error, not the reference."""
    from mlakit.kernels.mla_decode import mla_decode_gluon

    args = (torch.randn(1, 1, 2, 64), torch.randn(1, 1, 2, 16), torch.randn(1, 5, 80), torch.tensor([4]), 0.3, 64)
    with pytest.raises(ValueError, match="backend='gluon': needs"):
        mla_decode(*args, backend="gluon")
    with pytest.raises(ValueError, match="backend='gluon': needs"):
        mla_decode_gluon(*args)


def test_rope_append_argument_errors():
    latent, k_rope = torch.randn(2, 1, 16), torch.randn(2, 1, 8)
    cache, positions = torch.randn(2, 5, 24), torch.tensor([[0], [1]])
    cos = sin = torch.randn(5, 4)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_append(latent, k_rope, cache, positions, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="kv_cache last dim"):
        rope_append(latent, k_rope, torch.randn(2, 5, 25), positions, cos, sin)
    with pytest.raises(ValueError, match="norm_weight"):
        rope_append(latent, k_rope, cache, positions, cos, sin, norm_weight=torch.randn(15))


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quant_reference_is_fp64_attention_over_the_dequantised_cache(fmt):
    """mla_decode_quant_reference == float64 attention over dequantize(values, scales); NaN past
    each length (unwritten slots) never reaches the output."""
    from mlakit.kernels import mla_decode_quant_reference
    from mlakit.quant import FORMATS, dequantize, quantize

    gen = torch.Generator().manual_seed(11)
    batch, s_q, heads, rank, rope, max_len, lengths = 2, 2, 4, 64, 32, 20, [20, 7]
    q_latent, q_rope = torch.randn(batch, s_q, heads, rank, generator=gen), torch.randn(batch, s_q, heads, rope,
                                                                                        generator=gen)
    values, scales = quantize(torch.randn(batch, max_len, rank, generator=gen), FORMATS[fmt])
    k_rope = torch.randn(batch, max_len, rope, generator=gen)
    lens = torch.tensor(lengths)
    exact = torch.cat([dequantize(values, scales, FORMATS[fmt], torch.float64), k_rope.double()], -1)
    naive = naive_attention_fp64(q_latent, q_rope, exact, lens, 0.1, rank)
    scales[1, 7:] = float("nan")
    k_rope[1, 7:] = float("nan")
    out = mla_decode_quant_reference(q_latent, q_rope, values, scales, k_rope, lens, 0.1, rank, fmt)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert float((out.double() - naive).norm() / naive.norm()) < 1e-5


def test_rope_quant_check_counts_steps_on_negative_int4_scales(monkeypatch):
    """The kernel check counts how many quantisation steps the kernel's rows lie from the
    reference's. int4's scale is negative where a group's extreme is positive; a check that
    divided by the signed scale read any float32 rounding there as ~1e23 steps (an H200 run
    failed so). A kernel within float32 rounding of the reference must pass the check."""
    import mlakit.kernels as kernels
    from mlakit.kernels import rope_append_quant_reference
    from mlakit.testing import kernel_cases as cases

    def off_by_rounding(latent, *args, **kwargs):  # the reference on inputs one float32 rounding away
        return rope_append_quant_reference(latent * (1 + 2 ** -22), *args, **kwargs)

    monkeypatch.setattr(kernels, "rope_append_quant", off_by_rounding)
    case = cases.INTERP_ROPE_QUANT_CASES["int4-f32-r48-p16"]
    result = cases.run_rope_quant_case(case)
    assert result["finite"] and 0 < result["steps_apart"] <= 1.0 + 1e-6, result
    assert result["rel_err"] <= result["tol"]
