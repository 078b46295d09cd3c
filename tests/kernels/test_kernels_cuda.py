"""Triton kernels vs their PyTorch references on a CUDA GPU (skipped without one)."""

import pytest
import torch

from mlakit.testing import kernel_cases as _cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(result):
    assert result["finite"], "kernel left elements unwritten (NaN poison survived) or wrote wrong slots"
    assert result["rel_err"] <= result["tol"], f"relative error {result['rel_err']:.2e} > {result['tol']:.0e}"


@pytest.mark.parametrize("case_id", list(_cases.CUDA_DECODE_CASES))
def test_mla_decode_cuda(case_id):
    pytest.importorskip("triton")
    _check(_cases.run_decode_case(_cases.CUDA_DECODE_CASES[case_id], device="cuda"))


@pytest.mark.parametrize("case_id", list(_cases.CUDA_ROPE_CASES))
def test_rope_append_cuda(case_id):
    pytest.importorskip("triton")
    _check(_cases.run_rope_case(_cases.CUDA_ROPE_CASES[case_id], device="cuda"))


@pytest.mark.parametrize("case_id", list(_cases.CUDA_ROPE_QUANT_CASES))
def test_rope_append_quant_cuda(case_id):
    pytest.importorskip("triton")
    result = _cases.run_rope_quant_case(_cases.CUDA_ROPE_QUANT_CASES[case_id], device="cuda")
    _check(result)
    assert result["steps_apart"] <= 1.0 + 1e-6


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case_id", list(_cases.CUDA_DECODE_QUANT_CASES))
def test_mla_decode_quant_cuda(case_id, seed):
    """The quantised-latent kernel on fresh inputs (fp8 runs the reference before sm_89)."""
    pytest.importorskip("triton")
    _check(_cases.run_decode_quant_case(_cases.CUDA_DECODE_QUANT_CASES[case_id], device="cuda", seed=seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mla_decode_cuda_deterministic_inputs_fresh(seed):
    """Same function on any valid input: fresh seeds, a split count that leaves empty splits."""
    pytest.importorskip("triton")
    case = ("bfloat16", 3, 1, 16, 64, 32, 500, [500, 2, 131], 7)
    _check(_cases.run_decode_case(case, device="cuda", seed=seed))


def _has_gluon_hopper() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    from mlakit.kernels.mla_decode_gluon import HAS_GLUON

    return HAS_GLUON


@pytest.mark.parametrize("num_warps", [4, 8])
@pytest.mark.parametrize("case_id", [k for k, c in _cases.CUDA_DECODE_CASES.items() if _cases.gluon_covers(c)])
def test_mla_decode_gluon_cuda(case_id, num_warps):
    """The Gluon kernel (Hopper only) on every CUDA case it covers, with one warpgroup and two."""
    if not _has_gluon_hopper():
        pytest.skip("needs a Hopper GPU (sm_90) and triton with Gluon")
    _check(_cases.run_decode_case(_cases.CUDA_DECODE_CASES[case_id], device="cuda", backend="gluon",
                                  num_warps=num_warps))


def test_mla_decode_auto_backend_cuda():
    """backend="auto" is the Gluon kernel on Hopper where it applies, the Triton kernel elsewhere."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mlakit.kernels import mla_decode

    hopper = _has_gluon_hopper()
    gen = torch.Generator(device="cpu").manual_seed(0)
    # (heads, rank, rope, kernel auto should take): rank 96 is not a power of two
    for heads, rank, rope, expected in ((32, 512, 64, "gluon" if hopper else "triton"),
                                        (128, 512, 64, "gluon" if hopper else "triton"),
                                        (9, 96, 32, "triton")):
        q_latent = torch.randn(3, 1, heads, rank, generator=gen).to("cuda", torch.bfloat16)
        q_rope = torch.randn(3, 1, heads, rope, generator=gen).to("cuda", torch.bfloat16)
        cache = torch.randn(3, 700, rank + rope, generator=gen).to("cuda", torch.bfloat16)
        lengths = torch.tensor([700, 1, 333], device="cuda")
        outs = {b: mla_decode(q_latent, q_rope, cache, lengths, 0.05, rank, backend=b) for b in ("auto", "triton")}
        if expected == "gluon":
            outs["gluon"] = mla_decode(q_latent, q_rope, cache, lengths, 0.05, rank, backend="gluon")
            # the two kernels round differently; both are close to each other
            assert _cases.rel_err(outs["gluon"], outs["triton"]) < 1e-2
        assert torch.equal(outs["auto"], outs[expected]), (heads, rank, expected)
