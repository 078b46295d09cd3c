"""Triton kernels vs their PyTorch references on the CPU, through the Triton interpreter.

Triton chooses interpreter or compiler when a kernel is decorated (at import of
mlakit.kernels), and other tests in the session may import the kernels first
in compiled mode, so the cases run in one subprocess started with
TRITON_INTERPRET=1 (see _interpreter_runner.py); each case is reported as its
own test here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlakit.testing import kernel_cases as _cases

pytest.importorskip("triton")
# On a GPU machine the CUDA tests run these cases compiled; the interpreter is for CPU
# boxes (and the triton 3.6 interpreter of the GPU image cannot run the decode kernel).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: see test_kernels_cuda.py")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, str(HERE / "_interpreter_runner.py")],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO),
    )
    assert proc.returncode == 0, f"interpreter runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result):
    assert "error" not in result, result.get("traceback", result["error"])
    assert result["finite"], "kernel left elements unwritten (NaN poison survived) or wrote wrong slots"
    assert result["rel_err"] <= result["tol"], f"relative error {result['rel_err']:.2e} > {result['tol']:.0e}"


@pytest.mark.parametrize("case_id", list(_cases.INTERP_DECODE_CASES))
def test_mla_decode_interpreter(interpreter_results, case_id):
    _check(interpreter_results[f"decode:{case_id}"])


@pytest.mark.parametrize("case_id", list(_cases.INTERP_ROPE_CASES))
def test_rope_append_interpreter(interpreter_results, case_id):
    _check(interpreter_results[f"rope:{case_id}"])


@pytest.mark.parametrize("case_id", list(_cases.INTERP_ROPE_QUANT_CASES))
def test_rope_append_quant_interpreter(interpreter_results, case_id):
    _check(interpreter_results[f"rope_quant:{case_id}"])


@pytest.mark.parametrize("case_id", list(_cases.INTERP_DECODE_QUANT_CASES))
def test_mla_decode_quant_interpreter(interpreter_results, case_id):
    _check(interpreter_results[f"decode_quant:{case_id}"])
