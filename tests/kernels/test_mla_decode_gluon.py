"""The Gluon decode kernel for Hopper, checked where no GPU is: it must compile for Hopper.

Gluon has no interpreter, so on a CPU machine the check is the compiler's: the kernel
builds for sm_90a (triton's bundled ptxas), uses wgmma and TMA, fits the 227 KB of
shared memory of one H100/H200 SM and does not spill. Its numbers are checked against the
reference on a GPU (test_kernels_cuda.py::test_mla_decode_gluon_cuda).
"""

import pytest

gluon = pytest.importorskip("mlakit.kernels.mla_decode_gluon")
if not gluon.HAS_GLUON:
    pytest.skip("triton without Gluon's Hopper API", allow_module_level=True)
pytest.importorskip("triton.experimental.gluon._runtime")

HOPPER_SHARED_BYTES = 227 * 1024  # the most one block may opt in to on sm_90


@pytest.mark.parametrize("shape", [
    dict(heads=32, rank=512, rope=64),  # one warpgroup: mla_decode's choice at 32 rows
    dict(heads=32, rank=512, rope=64, num_warps=8),
    dict(heads=64, rank=512, rope=64),  # 64 rows: two warpgroups, the most shared memory
    dict(heads=9, rank=64, rope=32, s_q=3),
    dict(heads=9, rank=128, rope=32, direct=True),
    dict(heads=128, rank=512, rope=64),  # two programs of 64 rows per split
], ids=["decode-attn-v1", "decode-attn-v1-8warps", "64-rows", "converted-small-sq3", "converted-small-one-split", "128-heads"])
def test_compiles_for_hopper(shape):
    report = gluon.compile_report(**shape)
    assert report["wgmma"] > 0 and report["tma"] > 0, report
    assert report["shared_bytes"] <= HOPPER_SHARED_BYTES, report
    if report.get("registers") is not None:  # ptxas ran
        assert report["spill_bytes"] == 0, report


def test_refuses_what_it_does_not_cover():
    import torch

    for kwargs, message in ((dict(heads=32, s_q=1, rank=512, rope=64, dtype=torch.float32), "bf16 or fp16"),
                            (dict(heads=9, s_q=1, rank=48, rope=24, dtype=torch.bfloat16), "power of two"),
                            (dict(heads=9, s_q=1, rank=32, rope=32, dtype=torch.bfloat16), "power of two in \\[64")):
        with pytest.raises(ValueError, match=message):
            gluon.check_shape(**kwargs)
