"""Cache formats (mlakit.quant): quantise / dequantise against float64 math."""

import pytest
import torch

from mlakit.errors import MlakitError
from mlakit.quant import FORMATS, KV_CACHE_DTYPES, cache_format, dequantize, quantize, unpack_int4

QUANTISED = ("fp8", "int8", "int4")


def _group_absmax_fp64(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per-channel absmax of its group, in float64, from a plain loop over groups."""
    x = x.double()
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group):
        block = x[..., start:start + group]
        out[..., start:start + group] = block.abs().amax(-1, keepdim=True)
    return out


def _group_extreme_fp64(x: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Per-channel signed extreme of its group (the larger of max and -min; max on a tie)."""
    x = x.double()
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group):
        block = x[..., start:start + group]
        top, bottom = block.amax(-1, keepdim=True), block.amin(-1, keepdim=True)
        out[..., start:start + group] = torch.where(top >= -bottom, top, bottom)
    return out


def _int4_reference(x: torch.Tensor) -> torch.Tensor:
    """int4 as llama.cpp's q4_0 rounds, in float64: scale = extreme / -8, levels -8..7."""
    scale = (_group_extreme_fp64(x) / -8).float().double()  # stored as float32
    y = torch.where(scale != 0, x.double() / torch.where(scale != 0, scale, 1.0), 0.0)
    q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-8, 7)
    return q * scale


def _random(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    outliers = torch.rand(*shape, generator=gen) < 0.02
    return torch.where(outliers, x * 30, x).to(dtype)


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("channels", [64, 48, 576, 2])  # 48 and 2: a partial last group
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(name, channels, dtype):
    fmt = FORMATS[name]
    x = _random((3, 5, channels), seed=channels, dtype=dtype)
    values, scales = quantize(x, fmt)
    assert values.dtype == fmt.storage_dtype and scales.dtype == torch.float32
    assert values.shape == (3, 5, fmt.stored_channels(channels))
    assert scales.shape == (3, 5, fmt.groups(channels))
    back = dequantize(values, scales, fmt, torch.float64)
    step = _group_absmax_fp64(x, fmt.group_size) / fmt.qmax  # one quantisation step per channel
    err = (back - x.double()).abs()
    if name == "int4":
        # 16 levels: the extreme lands on -8, so a value of the other sign beyond 7.5 steps is
        # clipped to 7 (at most one step off); every other value is within half a step
        torch.testing.assert_close(back, _int4_reference(x), rtol=1e-6, atol=0)
        clipped = (x.double() * -torch.sign(_group_extreme_fp64(x)) / step) > 7.5
        bound = torch.where(clipped, step, step / 2)
    elif name == "fp8":
        # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormals down to 2^-9 of the step
        bound = torch.maximum(x.double().abs() * 2.0 ** -4, step * 2.0 ** -10)
    else:
        bound = step / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all()), float((err - bound).max())
    # the largest magnitude of each group is represented (up to float32 rounding of the scale)
    assert torch.allclose(back.abs().amax(-1), x.double().abs().amax(-1), rtol=1e-5)


@pytest.mark.parametrize("name", QUANTISED)
def test_all_zero_groups_stay_zero_and_finite(name):
    fmt = FORMATS[name]
    x = torch.zeros(2, 4, 128)
    x[0, 0, 70] = 3.0  # one non-zero group among zero ones
    values, scales = quantize(x, fmt)
    back = dequantize(values, scales, fmt)
    assert torch.isfinite(scales).all() and torch.isfinite(back).all()
    assert float(scales[1].abs().max()) == 0.0
    assert torch.equal(back, x)  # 3.0 is absmax of its group: exact; zeros stay zeros


@pytest.mark.parametrize("name", QUANTISED)
def test_extreme_magnitudes(name):
    fmt = FORMATS[name]
    big = torch.finfo(torch.float32).max / 2
    x = torch.tensor([[big, -big] + [1.0] * 62, [1e-30, -1e-30] + [0.0] * 62, [1e20] * 64])  # [3, 64]
    values, scales = quantize(x, fmt)
    back = dequantize(values, scales, fmt, torch.float64)
    assert torch.isfinite(back).all()
    if name == "int4":  # a tie of +big and -big: +big is the extreme (exact), -big is clipped to 7/8 of it
        torch.testing.assert_close(back[:2, :2], x[:2, :2].double() * torch.tensor([1.0, 7 / 8]).double(),
                                   rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(back[:, :2], x[:, :2].double(), rtol=1e-5, atol=0)  # the absmax values
    torch.testing.assert_close(back[2], x[2].double(), rtol=1e-5, atol=0)


def test_int4_packing_is_exact():
    fmt = FORMATS["int4"]
    q = torch.tensor([-8, -6, -1, 0, 1, 2, 6, 7] * 4, dtype=torch.float64)  # 32 channels: one group
    x = q * 0.25  # extreme -2 -> scale 0.25: every value is exactly q * scale
    values, scales = quantize(x[None], fmt)
    expected = [int(q[2 * j] + 8) | (int(q[2 * j + 1] + 8) << 4) for j in range(16)]
    assert values[0].tolist() == expected
    assert float(scales[0, 0]) == 0.25
    assert unpack_int4(values)[0].tolist() == q.long().tolist()
    assert torch.equal(dequantize(values, scales, fmt, torch.float64)[0], x)


def test_int4_uses_sixteen_levels_with_the_sign_of_the_extreme():
    fmt = FORMATS["int4"]
    x = torch.tensor([[8.0, -7.0, 3.0, -3.5] + [0.0] * 28])  # extreme +8: scale -1, 8 -> -8, -7 -> 7
    values, scales = quantize(x, fmt)
    assert float(scales[0, 0]) == -1.0
    assert unpack_int4(values)[0, :4].tolist() == [-8, 7, -3, 4]  # -3.5 / -1 = 3.5: half away from zero
    assert dequantize(values, scales, fmt, torch.float64)[0, :4].tolist() == [8.0, -7.0, 3.0, -4.0]


def test_int8_rounds_half_away_from_zero():
    fmt = FORMATS["int8"]
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 0.49] + [0.0] * 58])  # scale exactly 1
    values, _ = quantize(x, fmt)
    assert values[0, :6].tolist() == [127, 1, -1, 2, -3, 0]


def test_bytes_per_token_counts_scales():
    assert FORMATS["int8"].bytes_per_token(512) == 512 + 8 * 4
    assert FORMATS["fp8"].bytes_per_token(512) == 512 + 8 * 4
    assert FORMATS["int4"].bytes_per_token(512) == 256 + 16 * 4
    assert FORMATS["bf16"].bytes_per_token(576) == 1152
    assert FORMATS["int8"].bytes_per_token(48) == 48 + 4  # a partial group has a scale too


def test_cache_format_names():
    assert set(KV_CACHE_DTYPES) == set(FORMATS)
    assert cache_format(None, torch.bfloat16).storage_dtype == torch.bfloat16
    assert not cache_format("auto", torch.float32).quantized
    assert cache_format("int8") is FORMATS["int8"]
    with pytest.raises(MlakitError, match="unknown kv cache dtype 'q8_0'"):
        cache_format("q8_0")
    with pytest.raises(MlakitError, match="even number of channels"):
        quantize(torch.ones(1, 33), FORMATS["int4"])
