"""Quantised caches (mlakit.cache.QuantLatentCache / QuantKVCache) against mlakit.quant's reference."""

import pytest
import torch

from mlakit.cache import KVCache, LatentCache, ModelCache, QuantKVCache, QuantLatentCache, make_layer_cache
from mlakit.config import ModelConfig
from mlakit.quant import FORMATS, dequantize, fake_quantize_turned, quantize, cache_turn

QUANTISED = ("fp8", "int8", "int4")


def _mla_config(rank=64, rope=16, layers=2):
    return ModelConfig(dim=64, n_layers=layers, n_heads=4, n_kv_heads=4, head_dim=16, vocab_size=32,
                       intermediate_size=128, max_seq_len=64, attention="mla", kv_lora_rank=rank, qk_rope_head_dim=rope,
                       qk_nope_head_dim=16, v_head_dim=16)


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("quantize_rope", [False, True])
def test_latent_cache_update_reads_back_the_quantised_rows(name, quantize_rope):
    fmt = FORMATS[name]
    cache = QuantLatentCache(3, 12, 64, 16, name, dtype=torch.float32, quantize_rope=quantize_rope)
    plain = LatentCache(3, 12, 64, 16)
    gen = torch.Generator().manual_seed(0)
    for positions in (torch.arange(5)[None].repeat(2, 1), torch.tensor([[5], [5]])):  # prefill, then one step
        latent, k_rope = torch.randn(2, positions.shape[1], 64, generator=gen), torch.randn(2, positions.shape[1], 16,
                                                                                            generator=gen)
        cache.update(latent, k_rope, positions)
        rows = cache.dequantized(latent.shape[0])
        plain.update(latent, k_rope, positions)
    assert rows.shape == (2, 12, 80) and rows.dtype == torch.float32
    assert cache.lengths.tolist() == [6, 6, 0]
    exact = plain.kv[:2, :6]  # what an unquantised cache holds
    want_latent = dequantize(*quantize(exact[..., :64], fmt), fmt)
    # an integer-format RoPE key is stored turned, and read back turned back
    turn = cache_turn(16) if fmt.stores_turned else torch.eye(16)
    want_rope = dequantize(*quantize(exact[..., 64:] @ turn, fmt), fmt) @ turn.T if quantize_rope else exact[..., 64:]
    got = cache.dequantized(2, 6)
    torch.testing.assert_close(got, torch.cat([want_latent, want_rope], -1), rtol=0, atol=0)
    torch.testing.assert_close(rows[:, :6], got, rtol=0, atol=0)
    values, scales, k_rope_buf, rope_scales = cache.kernel_operands(2)
    assert values.dtype == fmt.storage_dtype and scales.shape == (2, 12, fmt.groups(64))
    assert (rope_scales is not None) == quantize_rope


@pytest.mark.parametrize("name", QUANTISED)
def test_latent_cache_append_rotated_matches_update_of_the_reference_rows(name):
    from mlakit.kernels import rope_append_reference

    gen = torch.Generator().manual_seed(1)
    latent, k_rope = torch.randn(2, 3, 64, generator=gen), torch.randn(2, 3, 16, generator=gen)
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])
    cos, sin = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    weight = torch.randn(64, generator=gen)
    exact = torch.zeros(2, 10, 80)
    rope_append_reference(latent, k_rope, exact, positions, cos, sin, weight, 1e-6)
    cache = QuantLatentCache(2, 10, 64, 16, name)
    rows = cache.append_rotated(latent, k_rope, positions, cos, sin, weight, 1e-6)
    fmt = FORMATS[name]
    want = torch.cat([dequantize(*quantize(exact[..., :64], fmt), fmt), exact[..., 64:]], -1)
    written = torch.zeros(2, 10, dtype=torch.bool)
    written[0, :3] = written[1, 4:7] = True
    torch.testing.assert_close(rows[written], want[written], rtol=1e-6, atol=1e-6)
    assert cache.lengths.tolist() == [3, 7]


@pytest.mark.parametrize("name", QUANTISED)
def test_kv_cache_update_reads_back_the_quantised_heads(name):
    """Keys and values read back as rounded; in an integer format rounded turned (``cache_turn``)
    and turned back, fp8 as they are."""
    fmt = FORMATS[name]
    turn = cache_turn(32) if fmt.stores_turned else torch.eye(32)
    cache, plain = QuantKVCache(2, 8, 3, 32, name, dtype=torch.bfloat16), KVCache(2, 8, 3, 32)
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 4, 3, 32, generator=gen), torch.randn(2, 4, 3, 32, generator=gen)
    positions = torch.arange(4)[None].repeat(2, 1)
    cache.update(k, v, positions)
    k_out, v_out = cache.dequantized(k.shape[0])
    plain.update(k, v, positions)
    assert k_out.shape == (2, 3, 8, 32) and k_out.dtype == torch.bfloat16
    for got, exact in zip(cache.dequantized(2, 4), (plain.k[:, :, :4], plain.v[:, :, :4])):
        want = dequantize(*quantize(exact @ turn, fmt), fmt) @ turn.T
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)
    assert cache.bytes_per_token() == 2 * 3 * fmt.bytes_per_token(32)


def test_bytes_per_token_count_scales():
    config = _mla_config(rank=512, rope=64, layers=1)
    assert ModelCache(config, 1, 1, dtype=torch.bfloat16).bytes_per_token() == 1152
    assert ModelCache(config, 1, 1, dtype=torch.bfloat16, kv_cache_dtype="int8").bytes_per_token() == 672
    assert ModelCache(config, 1, 1, dtype=torch.bfloat16, kv_cache_dtype="fp8").bytes_per_token() == 672
    assert ModelCache(config, 1, 1, dtype=torch.bfloat16, kv_cache_dtype="int4").bytes_per_token() == 448
    quant_rope = ModelCache(config, 1, 1, dtype=torch.bfloat16, kv_cache_dtype="int8", quantize_rope=True)
    assert quant_rope.bytes_per_token() == 512 + 32 + 64 + 4
    assert ModelCache(config, 1, 1, dtype=torch.float32, kv_cache_dtype="fp16").bytes_per_token() == 1152


def test_make_layer_cache_formats_and_default():
    mla, gqa = _mla_config(), ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                                          vocab_size=32, intermediate_size=128, max_seq_len=64)
    assert isinstance(make_layer_cache(mla, 0, 1, 4, torch.float32, None), LatentCache)  # today's call
    assert make_layer_cache(mla, 0, 1, 4, torch.float32, None, "bf16").kv.dtype == torch.bfloat16
    assert isinstance(make_layer_cache(mla, 0, 1, 4, torch.float32, None, "int4"), QuantLatentCache)
    assert isinstance(make_layer_cache(gqa, 0, 1, 4, torch.float32, None, "fp8"), QuantKVCache)
    assert make_layer_cache(gqa, 0, 1, 4, torch.bfloat16, None, "auto").k.dtype == torch.bfloat16
    assert ModelCache(mla, 1, 4).format.name == "auto"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantised_rope_write_under_graph_capture_writes_the_same_bytes(name, monkeypatch):
    """With the RoPE key quantised the write runs the reference, whose boolean row mask a CUDA
    graph cannot capture; under capture (every position in range: a decode step) it writes
    every row instead. Measured on an H200: the mask broke the capture of every +rope format."""
    import importlib

    from mlakit.quant import cache_format

    ra = importlib.import_module("mlakit.kernels.rope_append")  # the module (the package exports its function)

    fmt = cache_format(name)
    g = torch.Generator().manual_seed(3)
    latent, k_rope = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 16, generator=g)
    positions = torch.tensor([[5], [9]])
    cos, sin = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)

    def write():
        bufs = [torch.zeros(2, 32, fmt.stored_channels(64), dtype=fmt.storage_dtype),
                torch.zeros(2, 32, fmt.groups(64)), torch.zeros(2, 32, fmt.stored_channels(16), dtype=fmt.storage_dtype),
                torch.zeros(2, 32, fmt.groups(16))]
        ra.rope_append_quant_reference(latent, k_rope, *bufs[:3], positions, cos, sin, fmt, rope_scales=bufs[3])
        return bufs

    plain = write()
    monkeypatch.setattr(ra, "_capturing", lambda t: True)
    captured = write()
    for a, b in zip(plain, captured):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a,
                           b.view(torch.uint8) if b.dtype != torch.float32 else b)
    assert plain[1][0, 5].abs().sum() > 0 and plain[1][1, 9].abs().sum() > 0  # the rows were written


def test_rope_key_turn_is_a_fixed_orthogonal_matrix():
    turn = cache_turn(48, dtype=torch.float64)
    torch.testing.assert_close(turn @ turn.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(turn, cache_turn(48, dtype=torch.float64))
    assert turn.abs().max() < 0.7  # a mixing matrix: no channel stays mostly itself


def test_rope_key_turn_is_made_once_and_traces_as_a_constant():
    """Asked for in every layer of every forward, the turn is one shared tensor per (dim, device,
    dtype), and the cacheless rounding of a RoPE key compiles as one graph: the seeded draw
    (which torch.compile cannot trace) happens once, outside, instead of in each forward."""
    assert cache_turn(40) is cache_turn(40, "cpu", torch.float32)
    torch.testing.assert_close(cache_turn(40, dtype=torch.float64).float(), cache_turn(40), rtol=0, atol=0)

    def rounded(k):
        return fake_quantize_turned(k * 2.0, "int4")

    k = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(7))
    eager = rounded(k)
    explained = torch._dynamo.explain(rounded)(k)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    turn = cache_turn(40)
    expect = dequantize(*quantize((k * 2.0) @ turn, FORMATS["int4"]), FORMATS["int4"], torch.float32) @ turn.T
    torch.testing.assert_close(eager, expect, rtol=0, atol=1e-6)


def test_a_rope_key_turn_first_asked_for_inside_a_compiled_function():
    """The draw happens outside the graph even when the first request for a turn comes from
    code torch.compile traces (a width no eager call has asked for yet)."""
    from mlakit import quant

    quant._CACHE_TURNS.pop((36, torch.device("cpu"), torch.float32), None)
    k = torch.randn(2, 5, 36, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(lambda x: fake_quantize_turned(x, "int8"), backend="eager")
    got = compiled(k)
    turn = cache_turn(36)
    expect = dequantize(*quantize(k @ turn, FORMATS["int8"]), FORMATS["int8"], torch.float32) @ turn.T
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    assert cache_turn(36) is turn


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_turned_rope_key_keeps_scores_and_rounds_the_small_channels_better(name):
    """RoPE keys carry their energy in a few frequency pairs, which set an integer group's one
    step. Stored turned, the scores the decode kernel computes (turned query . stored key)
    equal the query against the key read back, and the scores of the small channels (those
    the large pair leaves) are closer to exact than with the key rounded unturned (float64)."""
    gen = torch.Generator().manual_seed(5)
    scale = torch.ones(48, dtype=torch.float64)
    scale[[0, 24, 20, 44]] = 6.0  # two strong pairs (rotate_half: channels i and i + 24), in both groups of 32
    k = torch.randn(1, 64, 48, generator=gen, dtype=torch.float64) * scale
    q = torch.randn(1, 1, 4, 48, generator=gen, dtype=torch.float64)  # [b, s, h, p]
    cache = QuantLatentCache(1, 64, 32, 48, name, dtype=torch.float64, quantize_rope=True)
    cache.update(torch.randn(1, 64, 32, generator=gen, dtype=torch.float64), k, torch.arange(64)[None])
    fmt = FORMATS[name]
    stored = dequantize(cache.k_rope[:1], cache.rope_scales[:1], fmt, torch.float64)  # as the kernel reads it
    kernel_scores = torch.einsum("bshp,blp->bshl", cache.rope_query(q), stored)
    read_back = cache.dequantized(1)[..., 32:]
    torch.testing.assert_close(kernel_scores, torch.einsum("bshp,blp->bshl", q, read_back), rtol=1e-9, atol=1e-9)
    small = scale == 1.0  # scores over the small channels: the query there, the key read back
    exact = torch.einsum("bshp,blp->bshl", q[..., small], k[..., small])
    unturned = dequantize(*quantize(k, fmt), fmt, torch.float64)

    def error(key):
        return float((torch.einsum("bshp,blp->bshl", q[..., small], key[..., small]) - exact).norm() / exact.norm())

    assert error(read_back) < 0.7 * error(unturned), (error(read_back), error(unturned))


def test_the_originals_turned_cache_gives_attention_what_reading_it_back_gives():
    """GQA attention reads an integer cache as stored (keys and values turned) with the query
    turned alike and its output turned back; that equals attention over the keys and values read
    back (float64), and its keys score the small channels closer to exact than unturned rounding."""
    gen = torch.Generator().manual_seed(8)
    scale = torch.ones(64, dtype=torch.float64)
    scale[[3, 35, 10, 42]] = 6.0  # two strong RoPE pairs (channels i and i + 32)
    k = torch.randn(1, 40, 2, 64, generator=gen, dtype=torch.float64) * scale  # [b, s, kv_h, d]
    v = torch.randn(1, 40, 2, 64, generator=gen, dtype=torch.float64)
    q = torch.randn(1, 2, 1, 64, generator=gen, dtype=torch.float64)  # [b, kv_h, 1, d]
    cache = QuantKVCache(1, 40, 2, 64, "int4", dtype=torch.float64)
    cache.update(k, v, torch.arange(40)[None])
    k_stored, v_stored = cache.dequantized(1, turned_back=False)
    k_back, v_back = cache.dequantized(1)
    turn = cache.turn

    def attend(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v

    as_stored = attend(q @ turn, k_stored, v_stored) @ turn.T
    torch.testing.assert_close(as_stored, attend(q, k_back, v_back), rtol=1e-9, atol=1e-9)
    small = scale == 1.0
    exact = q[..., small] @ k.transpose(1, 2)[..., small].transpose(-1, -2)

    def error(key):  # key [b, kv_h, L, d]
        return float((q[..., small] @ key[..., small].transpose(-1, -2) - exact).norm() / exact.norm())

    unturned = dequantize(*quantize(k, FORMATS["int4"]), FORMATS["int4"], torch.float64).transpose(1, 2)
    assert error(k_back) < 0.7 * error(unturned), (error(k_back), error(unturned))


def test_fp8_rope_key_is_stored_as_it_is():
    """fp8 rounds each value relative to itself: its RoPE key is not turned (docs/protocols.md)."""
    k = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(6))
    cache = QuantLatentCache(1, 4, 32, 16, "fp8", quantize_rope=True)
    cache.update(torch.randn(1, 4, 32), k, torch.arange(4)[None])
    assert cache.rope_turn is None and torch.equal(cache.rope_query(k), k)
    fp8 = FORMATS["fp8"]
    torch.testing.assert_close(cache.dequantized(1)[..., 32:], dequantize(*quantize(k, fp8), fp8), rtol=0, atol=0)
