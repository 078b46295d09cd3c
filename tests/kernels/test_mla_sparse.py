"""Top-k sparse MLA decode: the references against plain dense attention (float64), the
selection rule, and the Triton kernels against the references under the interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlakit.kernels import mla_decode_reference
from mlakit.kernels import mla_sparse as S
from mlakit.testing.sparse_cases import SPARSE_CASES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _inputs(b=2, s=1, h=4, r=32, p=16, max_len=50, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, h, r, generator=gen, dtype=dtype), torch.randn(b, s, h, p, generator=gen, dtype=dtype),
            torch.randn(b, max_len, r + p, generator=gen, dtype=dtype))


def test_index_reference_is_max_over_heads_of_truncated_logits():
    q_latent, q_rope, kv = _inputs()
    lengths = torch.tensor([50, 7])
    scores = S.mla_sparse_index_reference(q_latent, q_rope, kv, lengths, 32, 8)
    for b, n in ((0, 49), (1, 3)):
        expect = max(float(q_latent[b, 0, h, :8] @ kv[b, n, :8] + q_rope[b, 0, h] @ kv[b, n, 32:]) for h in range(4))
        assert scores[b, 0, n].item() == pytest.approx(expect, rel=1e-12)
    assert torch.isinf(scores[1, 0, 7:]).all() and torch.isfinite(scores[1, 0, :7]).all()


def test_selection_forces_sink_and_window_and_keeps_the_best():
    scores = torch.tensor([[[5.0, -1.0, 3.0, 9.0, 0.0, 1.0, 2.0, float("-inf")]]])  # query at position 6
    chosen = S.select_positions(scores, torch.tensor([[6]]), topk=2, window=2, sink=1)
    assert sorted(chosen[0, 0].tolist()) == [0, 2, 3, 5, 6]  # sink 0, window 5-6, best 3 and 2
    # fewer visible slots than k: every visible one, the rest -1
    short = S.select_positions(scores, torch.tensor([[6]]), topk=20, window=0, sink=0)
    assert short.shape[-1] == 8 and sorted(short[0, 0].tolist()) == [-1, 0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("s", [1, 3])
def test_sparse_equals_dense_when_k_covers_the_context(s):
    q_latent, q_rope, kv = _inputs(s=s)
    lengths = torch.tensor([50, s])
    dense = mla_decode_reference(q_latent, q_rope, kv, lengths, 0.2, 32)
    sparse = S.mla_sparse_decode(q_latent, q_rope, kv, lengths, 0.2, 32, topk=50, index_rank=4, kernels=False)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)


def test_sparse_error_shrinks_as_k_grows():
    # keys with a few strong slots (what trained attention looks like): top-k finds them first
    q_latent, q_rope, kv = _inputs(b=1, h=4, max_len=400, seed=1)
    kv[0, ::37] *= 4
    lengths = torch.tensor([400])
    dense = mla_decode_reference(q_latent, q_rope, kv, lengths, 0.3, 32)
    errors = []
    for k in (8, 32, 128, 400):
        sparse = S.mla_sparse_decode(q_latent, q_rope, kv, lengths, 0.3, 32, topk=k, window=4, sink=2,
                                     index_rank=32, kernels=False)
        errors.append(float((sparse - dense).norm() / dense.norm()))
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-12 and errors[0] > 1e-3, errors


def test_attend_reference_rejects_bad_indices():
    q_latent, q_rope, kv = _inputs()
    with pytest.raises(ValueError, match="indices"):
        S.mla_sparse_attend_reference(q_latent, q_rope, kv, torch.zeros(2, 2, 3, dtype=torch.int32), 0.1, 32)
    with pytest.raises(TypeError, match="int32 or int64"):
        S.mla_sparse_attend_reference(q_latent, q_rope, kv, torch.zeros(2, 1, 3), 0.1, 32)


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the kernels run compiled there (scripts/device/sparse_check.py)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, str(HERE / "_sparse_runner.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, f"sparse runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", [*SPARSE_CASES, "model-decode"])
def test_sparse_kernels_interpreter(interpreter_results, case_id):
    result = interpreter_results[case_id]
    assert "error" not in result, result.get("traceback", result["error"])
    assert result["index_same_mask"], "the index kernel masked other slots than the reference"
    assert result["index_err"] <= result["tol"], result
    assert result["finite"] and result["rel_err"] <= result["tol"], result
