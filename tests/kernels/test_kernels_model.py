"""The model's absorbed decode path through the kernel gives the same greedy output
as the plain einsum path (issue 5, integration)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _run(device: str, interpret: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(HERE / "_model_greedy.py"), device], env=env,
                          capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(results: dict) -> None:
    fp32, bf16 = results["torch.float32"], results["torch.bfloat16"]
    assert fp32["triton"], "the kernel did not run"
    assert fp32["with_kernel"] == fp32["plain"]
    assert fp32["logits_rel_err"] <= 1e-4
    assert bf16["logits_rel_err"] <= 2e-2
    assert len(bf16["with_kernel"][0]) == 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check is for CPU boxes; CUDA runs the kernel")
def test_greedy_same_with_and_without_kernel_interpreter():
    pytest.importorskip("triton")
    _check(_run("cpu", interpret=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_same_with_and_without_kernel_cuda():
    results = _run("cuda", interpret=False)
    _check(results)
    from mlakit.kernels.mla_decode_gluon import HAS_GLUON

    gluon_expected = HAS_GLUON and torch.cuda.get_device_capability()[0] == 9
    for key in ("torch.bfloat16-rank64", "torch.float16-rank64"):  # the Gluon kernel on Hopper
        assert results[key]["gluon"] == gluon_expected, key
        assert results[key]["logits_rel_err"] <= 2e-2, (key, results[key]["logits_rel_err"])
        assert len(results[key]["with_kernel"][0]) == 10
