"""The Gluon decode kernel over a quantised latent cache (mlakit/kernels/mla_decode_quant_gluon.py).

Offline (no GPU): every format compiles for sm_90a (triton's bundled ptxas), with wgmma and TMA
in its PTX, within the 227 KB of shared memory of one H100/H200 block, without spills. On a
Hopper GPU: its output against ``mla_decode_quant_reference`` on random caches poisoned past
every length (NaN scales, fp8 NaN values, NaN RoPE keys), ragged lengths, one split and several.
"""

import math

import pytest
import torch

qg = pytest.importorskip("mlakit.kernels.mla_decode_quant_gluon")
if not qg.HAS_GLUON:
    pytest.skip("triton without Gluon's Hopper API", allow_module_level=True)

HOPPER_SHARED_BYTES = 232448  # 227 KB: the most one block may opt in to on sm_90
FORMATS = ("int8", "fp8", "int4")


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2])


@pytest.mark.parametrize("variant", [
    dict(s_q=1),  # decode-attn-v1: 32 rows, one warpgroup, partials
    dict(s_q=1, direct=True),  # one split writes the output itself
    dict(s_q=2),  # 64 rows: two warpgroups (int8/fp8: one RoPE stage, shared memory)
    dict(s_q=2, direct=True),
    dict(s_q=1, num_warps=8),  # 32 rows over two warpgroups (a tuning choice for the GPU run)
    dict(s_q=1, overlap=True),  # the score dot pass by pass
    dict(s_q=2, overlap=True),
], ids=["sq1-split", "sq1-direct", "sq2-split", "sq2-direct", "sq1-8warps", "sq1-overlap", "sq2-overlap"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiles_for_hopper(fmt, variant):
    pytest.importorskip("triton.experimental.gluon._runtime")
    report = qg.compile_report(fmt, heads=32, rank=512, rope=64, **variant)
    assert report["wgmma"] > 0 and report["tma"] > 0, report
    assert report["shared_bytes"] <= HOPPER_SHARED_BYTES, report
    if report.get("registers") is None:
        pytest.skip("no ptxas in this triton: registers and spills not checked")
    if variant.get("overlap"):
        return  # experimental: the in-flight score accumulator spills 250-360 B on triton 3.6 (measured by the bench)
    if _triton_version() < (3, 7):  # the GPU machine's triton (3.6): no spill at all
        assert report["spill_bytes"] == 0, report
    else:
        # triton 3.9's codegen leaves a few values live across the loop at the 255-register
        # cap (one 4-byte reload per tile, the rest before and after the loop): tolerated
        assert report["spill_bytes"] <= 64, report


def test_smaller_rank_compiles():
    pytest.importorskip("triton.experimental.gluon._runtime")
    for fmt, rank in (("int8", 256), ("int4", 128)):
        report = qg.compile_report(fmt, heads=16, rank=rank, rope=32)
        assert report["wgmma"] > 0 and report["shared_bytes"] <= HOPPER_SHARED_BYTES, (fmt, report)


def test_shared_budget():
    """The module docstring's numbers: two stages fit at 32 rows; at 64 rows int8/fp8 take one RoPE stage."""
    kb = 1024
    assert qg.shared_bytes("int8", 512, 64, 32) == 188 * kb
    assert qg.shared_bytes("int4", 512, 64, 32) == 160 * kb
    assert qg.shared_bytes("int8", 512, 64, 64) == 228 * kb
    assert qg.shared_bytes("int8", 512, 64, 64, 2, 1) == 220 * kb
    assert qg.gluon_quant_config("int8", 1, 2, 32, 512, 64, 4096, 132)["rope_stages"] == 1
    assert qg.gluon_quant_config("int4", 1, 2, 32, 512, 64, 4096, 132)["rope_stages"] == 2


def test_refuses_what_it_does_not_cover():
    for args, message in ((("int8", 32, 1, 512, 64, torch.float32), "bf16 or fp16"),
                          (("int8", 32, 1, 128, 64, torch.bfloat16), "TMA needs"),  # 2 scales: 8-byte rows
                          (("int4", 32, 1, 64, 64, torch.bfloat16), "TMA needs"),
                          (("int8", 32, 1, 96, 64, torch.bfloat16), "power of two"),
                          (("bf16", 32, 1, 512, 64, torch.bfloat16), "int8, fp8 or int4")):
        with pytest.raises(ValueError, match=message):
            qg.check_shape(*args)
    q = torch.zeros(1, 1, 32, 512, dtype=torch.bfloat16)
    assert "quantised RoPE key" in qg.unsupported(q, q, q, q, "int8", rope_scales=q)
    assert "Hopper" in qg.unsupported(q, q, q, q, "int8")


# --- on a Hopper GPU ---------------------------------------------------------------------------

def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU (sm_90)")


# (batch, s_q, heads, max_len, lengths, splits or None for gluon_quant_config's choice)
GPU_CASES = {
    "h32-ragged": (4, 1, 32, 1000, [1000, 999, 64, 5], None),
    "h32-ragged-one-split": (3, 1, 32, 1000, [1000, 1, 130], 1),
    "h32-sq2-split3": (2, 2, 32, 700, [700, 333], 3),
    "h32-sq2-one-split": (2, 2, 32, 300, [300, 2], 1),
    "h32-len1-split4": (2, 1, 32, 200, [1, 200], 4),
    "h16-long": (1, 1, 16, 8192, [8191], None),
}


def _run_case(fmt_name, dtype, case, seed=0, **overrides):
    from mlakit.kernels import mla_decode_quant_reference
    from mlakit.quant import FORMATS as ALL_FORMATS
    from mlakit.quant import quantize

    batch, s_q, heads, max_len, lengths, splits = case
    rank, rope = 512, 64
    fmt = ALL_FORMATS[fmt_name]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)

    q_latent, q_rope = rnd(batch, s_q, heads, rank), rnd(batch, s_q, heads, rope)
    values, scales = quantize(rnd(batch + 1, max_len, rank), fmt)  # one spare row: only rows < batch are read
    k_rope = rnd(batch + 1, max_len, rope)
    lens = torch.tensor(lengths, dtype=torch.int64, device="cuda")
    scale = 1.0 / math.sqrt(rank + rope)
    ref = mla_decode_quant_reference(q_latent.float(), q_rope.float(), values, scales, k_rope, lens, scale, rank, fmt)
    unused = torch.arange(max_len, device="cuda")[None, :] >= torch.cat([lens, lens.new_zeros(1)])[:, None]
    scales.masked_fill_(unused[..., None], float("nan"))  # poison: nothing past a length may reach the output
    if fmt_name == "fp8":
        values.view(torch.uint8).masked_fill_(unused[..., None], 0x7F)  # e4m3 NaN
    k_rope.masked_fill_(unused[..., None], float("nan"))
    out = torch.full((batch, s_q, heads, rank), float("nan"), dtype=dtype, device="cuda")
    config = {}
    if splits:
        config["num_splits"] = splits
    config.update(overrides)
    qg.mla_decode_quant_gluon(q_latent, q_rope, values, scales, k_rope, lens, scale, rank, fmt, out=out,
                              config=config or None)
    torch.cuda.synchronize()
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return rel, bool(torch.isfinite(out).all())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case_id", list(GPU_CASES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference_cuda(fmt, case_id, dtype):
    _needs_hopper()
    rel, finite = _run_case(fmt, dtype, GPU_CASES[case_id])
    assert finite, "NaN in the output: a poisoned slot reached it, or an element was not written"
    assert rel <= 1e-2, f"relative error {rel:.2e}"  # the dequantised latent is rounded to 16 bits


@pytest.mark.cuda
@pytest.mark.parametrize("overrides", [dict(num_warps=8), dict(overlap=True), dict(overlap=True, num_warps=8)],
                         ids=["8warps", "overlap", "overlap-8warps"])
@pytest.mark.parametrize("case_id", ["h32-ragged", "h32-sq2-split3", "h32-ragged-one-split"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_other_configs_cuda(fmt, case_id, overrides):
    """The configs the bench compares: two warpgroups at 32 rows, the score dot pass by pass."""
    _needs_hopper()
    if GPU_CASES[case_id][1] * GPU_CASES[case_id][2] > 32 and overrides.get("num_warps") == 8:
        pytest.skip("64 rows take two warpgroups anyway")
    rel, finite = _run_case(fmt, torch.bfloat16, GPU_CASES[case_id], **overrides)
    assert finite and rel <= 1e-2, rel


@pytest.mark.cuda
def test_wrapper_checks_and_refuses_cuda():
    _needs_hopper()
    from mlakit.quant import FORMATS as ALL_FORMATS
    from mlakit.quant import quantize

    fmt = ALL_FORMATS["int8"]
    q = torch.randn(1, 1, 32, 512, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(1, 1, 32, 64, device="cuda", dtype=torch.bfloat16)
    values, scales = quantize(torch.randn(1, 64, 512, device="cuda"), fmt)
    k_rope, rope_scales = quantize(torch.randn(1, 64, 64, device="cuda"), fmt)
    lens = torch.tensor([64], device="cuda")
    with pytest.raises(ValueError, match="quantised RoPE key"):
        qg.mla_decode_quant_gluon(q, qr, values, scales, k_rope, lens, 0.1, 512, fmt, rope_scales=rope_scales)
    with pytest.raises((ValueError, TypeError)):  # _check_args: a RoPE key that is not 16-bit
        qg.mla_decode_quant_gluon(q, qr, values, scales, k_rope, lens, 0.1, 512, fmt)
