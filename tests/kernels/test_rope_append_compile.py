"""The fused rope_append kernels compile for Hopper (sm_90a) on a machine without a GPU.

The interpreter (test_kernels_interpreter.py) checks their numbers but never runs Triton's
compiler, which alone rejects some programs; this compiles every cache flavour."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")


@pytest.mark.parametrize("fmt,rope,quant_rope", [
    (None, 64, False), ("int8", 64, False), ("int8", 64, True), ("int4", 64, True), ("fp8", 64, True),
    ("int4", 16, True),  # a key shorter than one group
], ids=["bf16", "int8", "int8+rope", "int4+rope", "fp8+rope", "int4+rope-p16"])
def test_compiles_for_hopper(fmt, rope, quant_rope):
    from mlakit.kernels.rope_append import compile_report

    report = compile_report(fmt, rank=512, rope=rope, quant_rope=quant_rope)
    assert report["ptx_lines"] > 100, report
    assert report["shared_bytes"] <= 227 * 1024, report
