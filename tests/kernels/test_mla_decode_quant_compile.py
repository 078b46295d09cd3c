"""The quantised-latent decode kernel compiles for Hopper (sm_90a) on a machine without a GPU.

Its numbers are checked in the interpreter (test_kernels_interpreter.py) and on a GPU
(test_kernels_cuda.py::test_mla_decode_quant_cuda); this checks what the compiler says.
"""

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

HOPPER_SHARED_BYTES = 227 * 1024


@pytest.mark.parametrize("fmt,shape", [
    ("int8", dict(heads=32, rank=512, rope=64)),  # decode-attn-v1
    ("fp8", dict(heads=32, rank=512, rope=64)),
    ("int4", dict(heads=32, rank=512, rope=64)),
    ("int8", dict(heads=9, rank=64, rope=32, s_q=3)),  # a converted small model
], ids=["int8-decode-attn-v1", "fp8-decode-attn-v1", "int4-decode-attn-v1", "int8-converted-small-sq3"])
def test_compiles_for_hopper(fmt, shape):
    from mlakit.kernels.mla_decode_quant import compile_report

    report = compile_report(fmt, **shape)
    assert report["shared_bytes"] <= HOPPER_SHARED_BYTES, report
    if shape["rank"] <= 128 and report.get("registers") is not None:
        assert report["spill_bytes"] == 0, report  # rank 512 spills today: see mla_decode_quant's docstring
