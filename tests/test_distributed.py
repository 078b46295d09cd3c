"""Several processes on the CPU (gloo): FSDP2 healing and tensor-parallel decode equal one process.

Each test starts ``torchrun --nproc-per-node 2`` on ``tests/distributed/worker.py`` (tiny random
models, built the same way in both processes and here) and compares what rank 0 writes with the
same run in this process: parameters after healing steps within float32 rounding, greedy tokens
exactly, logits within rounding (the all-reduces sum the ranks' partial products in another order).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "distributed"))

import cases  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> dict:
    out = Path(args[1])
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", str(REPO / "tests" / "distributed" / "worker.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return torch.load(out, weights_only=True)


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp2_healing_on_two_processes_equals_one(tmp_path):
    """Three steps (AdamW moments, clipping, hidden-state matching): each rank reads half of every
    global batch; the parameters end where one process's do."""
    two = torchrun("heal", str(tmp_path / "two.pt"))
    one = cases.heal_run()
    start = cases.heal_models()[0].state_dict()
    moved = _max_difference(one["params"], {k: v for k, v in start.items()})
    assert moved > 1e-3  # the steps moved the parameters far more than the tolerance below
    assert one["rows"] == [4] * cases.HEAL_STEPS and two["rows"] == [2] * cases.HEAL_STEPS  # half a batch per rank
    assert _max_difference(two["params"], one["params"]) < 2e-5
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)  # logged: the global batch's loss
    assert two["val"] == pytest.approx(one["val"], rel=1e-5)


def test_a_state_saved_by_two_processes_resumes_on_one(tmp_path):
    state_dir = tmp_path / "state"
    first = torchrun("heal", str(tmp_path / "first.pt"), str(state_dir))
    assert first["step"] == 1 and (state_dir / "state.safetensors").exists()
    resumed = cases.heal_run(state_dir=state_dir, resume=True)
    straight = cases.heal_run()
    assert resumed["step"] == cases.HEAL_STEPS
    assert _max_difference(resumed["params"], straight["params"]) < 2e-5
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)


def test_a_state_saved_by_one_process_resumes_on_two(tmp_path):
    state_dir = tmp_path / "state"
    cases.heal_run(state_dir=state_dir, stop_after_first_step=True)
    resumed = torchrun("heal-resume", str(tmp_path / "resumed.pt"), str(state_dir))
    straight = cases.heal_run()
    assert resumed["step"] == cases.HEAL_STEPS
    assert _max_difference(resumed["params"], straight["params"]) < 2e-5


@pytest.mark.parametrize("model", sorted(cases.MODELS))
def test_tensor_parallel_greedy_decode_equals_one_process(model, tmp_path):
    two = torchrun(model, str(tmp_path / "tp.pt"))
    one = cases.greedy_run(model)
    assert two["tokens"] == one["tokens"]
    for key in ("prefill", "decode"):
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-5), key


def test_torchrun_generate_tensor_parallel_prints_what_one_process_prints(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m mlakit generate MODEL --tensor-parallel --greedy`: rank 0
    alone prints, the tokens one process gives."""
    pytest.importorskip("transformers")
    import json

    from convert.helpers import save_tiny_with_tokenizer
    from mlakit.cli import main

    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 2)
    args = ["generate", str(path), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--greedy",
            "--json", "--device", "cpu"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "mlakit", *args,
                           "--tensor-parallel"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["output_ids"] == one["output_ids"]
    assert len(one["output_ids"]) == 12


def test_tensor_parallel_needs_torchrun_and_even_splits(capsys, monkeypatch):
    from mlakit.cli import main
    from mlakit.errors import MlakitError
    from mlakit.parallel import decode_plan

    monkeypatch.delenv("RANK", raising=False)
    assert main(["generate", "default", "--prompt", "x", "--tensor-parallel", "--device", "cpu"]) == 2
    assert "torchrun --nproc-per-node N" in capsys.readouterr().err
    model = cases.random_model(cases.gqa_config())  # 4 query heads, 2 KV heads
    with pytest.raises(MlakitError, match="KV heads do not split"):
        decode_plan(model, 4)
