"""A forward without a cache sees keys and values as a quantised cache stores them
(``ForwardOptions(kv_cache_dtype=...)``): evaluation through the cache and
quantisation-aware healing."""

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit.options import ForwardOptions
from mlakit.quant import cache_format, dequantize, fake_quantize, quantize


def tiny(attention: str) -> Transformer:
    shape = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=96,
                 max_seq_len=128)
    if attention == "mla":
        shape.update(attention="mla", kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
    return Transformer(ModelConfig(**shape)).init_random(seed=0, std=0.2)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
def test_fake_quantize_is_the_round_trip_with_a_straight_through_gradient(name):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fmt = cache_format(name)
    y = fake_quantize(x, name)
    torch.testing.assert_close(y.detach(), dequantize(*quantize(x.detach(), fmt), fmt), rtol=0, atol=0)
    (y * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(64.0).expand(3, 5, 64))


def test_bf16_format_rounds_to_bf16_and_auto_is_identity():
    x = torch.randn(4, 64, dtype=torch.float64)
    assert torch.equal(fake_quantize(x, "bf16"), x.to(torch.bfloat16).double())
    assert fake_quantize(x, None) is x and fake_quantize(x, "auto") is x


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_quantised_cache_forward_stays_close_and_orders_by_bits(attention, rel_err):
    model = tiny(attention)
    tokens = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)
        err = {name: rel_err(model(tokens, options=ForwardOptions(kv_cache_dtype=name)), ref)
               for name in ("bf16", "int8", "int4")}
    assert 0 < err["bf16"] < err["int8"] <= 0.02 < err["int4"] < 1.0


def test_unknown_cache_dtype_is_refused():
    with pytest.raises(Exception, match="int8"):
        ForwardOptions(kv_cache_dtype="int3")


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("quantize_rope", [False, True])
def test_cacheless_forward_equals_decoding_through_the_quantised_cache(attention, name, quantize_rope, rel_err):
    """What evaluation sees (a window through ``ForwardOptions(kv_cache_dtype=...)``, no cache) is
    what generation computes: a naive prefill into the quantised cache and absorbed decode
    steps reading it (the quantised decode kernel's reference on the CPU)."""
    if attention == "gqa" and quantize_rope:
        pytest.skip("the RoPE-key option is MLA's")
    model = tiny(attention).double()
    tokens = torch.randint(0, 101, (2, 14), generator=torch.Generator().manual_seed(2))
    window = ForwardOptions(kv_cache_dtype=name, quantize_rope=quantize_rope)
    with torch.no_grad():
        ref = model(tokens, options=window)
        cache = model.new_cache(2, 16, kv_cache_dtype=name, quantize_rope=quantize_rope)
        out = [model(tokens[:, :5], cache=cache, options=window)]
        decode = window.replace(mla_path="absorbed")
        out += [model(tokens[:, i:i + 1], torch.full((2, 1), i), cache, decode) for i in range(5, 14)]
    # not bit-equal: the cache rounds its inputs as computed by the fused write (RMSNorm, RoPE), and a
    # value on a rounding edge can land one step apart (1e-7 here, against ~1e-2 of quantisation)
    assert rel_err(torch.cat(out, 1), ref) <= 1e-6
