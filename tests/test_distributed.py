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


def torchrun_mlakit(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m mlakit ARGS`` (CPU, gloo); its exit status must be 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "mlakit", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_generate_tensor_parallel_prints_what_one_process_prints(tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m mlakit generate MODEL --tensor-parallel --greedy`: rank 0
    alone prints, the tokens one process gives."""
    pytest.importorskip("transformers")
    import json

    from mlakit.cli import main
    from mlakit.testing.models import save_tiny_with_tokenizer

    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 2)
    args = ["generate", str(path), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--greedy",
            "--json", "--device", "cpu"]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out)
    proc = torchrun_mlakit(*args, "--tensor-parallel")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["output_ids"] == one["output_ids"]
    assert len(one["output_ids"]) == 12


def test_a_rank_leaves_with_its_output_flushed_and_without_finalisation():
    """``parallel.leave``: what was printed (unflushed, to a pipe) arrives, the exit status is
    the command's, and the interpreter's finalisation (where gloo's worker threads could abort
    the process) does not run: an atexit handler stays silent. ``python -m mlakit`` leaves so
    only in a process that joined a job (``parallel.joined``)."""
    code = ("import atexit, sys; from mlakit import parallel; atexit.register(print, 'finalised'); "
            "print('rank output', end=''); sys.stderr.write('a line'); parallel.leave(3)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "rank output", "a line")
    from mlakit import parallel

    assert not parallel.joined()  # this (one) process never joined a job: it exits as usual


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


def test_tensor_parallel_bench_models_give_one_process_logits(tmp_path):
    """The variants `mlakit bench e2e --tensor-parallel` times (tiny preset: GQA-2, MLA 32+8, MHA, built
    with the same seed on each rank and split before the engine) are one process's models."""
    two = torchrun("bench", str(tmp_path / "bench.pt"))
    one = cases.bench_logits()
    assert sorted(two) == sorted(one) and len(one) == 6
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-5), key


def test_torchrun_bench_e2e_tensor_parallel_writes_rank_zeros_rows(tmp_path):
    """`torchrun --nproc-per-node 2 -m mlakit bench e2e --tensor-parallel`: one table (rank 0's), rows per rank
    with the world size; GQA's cache per rank is half one process's, MLA's latent is replicated; MQA (one KV
    head) is skipped, and so are transformers and the largest-batch search, each with a note."""
    import json

    from mlakit.bench.variants import build_random_model, make_variants, resolve_shape

    path = tmp_path / "tp.json"
    proc = torchrun_mlakit("bench", "e2e", "--preset", "tiny", "--device", "cpu", "--grid", "1x16,2x32",
                           "--steps", "1", "--warmup", "1", "--variants", "original,mla,mqa", "--prefill-tokens", "16",
                           "--no-progress", "--tensor-parallel", "--json", str(path))
    headers = [line for line in proc.stdout.splitlines() if line.startswith("decode-e2e-v1 on CPU")]
    assert len(headers) == 1 and "tensor parallel: world size 2" in headers[0]
    result = json.loads(path.read_text())
    assert result["tensor_parallel"]["world_size"] == 2 and result["tensor_parallel"]["backend"] == "gloo"
    original, (rank, rope), _ = resolve_shape(None, "tiny")
    one_process = {v.name: build_random_model(v.config, torch.device("cpu"), torch.float32).new_cache(1, 1)
                   .bytes_per_token() for v in make_variants(original, rank, rope, ("original", "mla", "mqa"))}
    decode = [r for r in result["rows"] if r["phase"] == "decode"]
    assert {r["variant"] for r in decode} == set(one_process)
    for row in decode:
        if row["variant"] == "MQA":
            assert row["status"] == "skipped" and "1 KV heads do not split" in row["note"]
            continue
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["tensor_parallel"] == 2
        assert row["cache_bytes_per_rank"] == row["batch"] * row["context"] * row["kv_bytes_per_token"]
        if row["variant"].startswith("MLA"):
            assert row["kv_bytes_per_token"] == one_process[row["variant"]]
            assert row["note"].startswith("TP 2: the latent cache is replicated on each rank")
        else:
            assert 2 * row["kv_bytes_per_token"] == one_process[row["variant"]]
            assert row["note"].startswith("TP 2: 1 of 2 KV heads cached per rank")
    prefill = [r for r in result["rows"] if r["phase"] == "prefill"]
    assert len(prefill) == 3 and all(r["status"] == "ok" and r["tensor_parallel"] == 2 for r in prefill)
    assert result["max_batch"] == [] and not any(r["phase"].startswith("hf-") for r in result["rows"])
    notes = " ".join(result["notes"])
    assert "transformers baseline: not run under --tensor-parallel" in notes
    assert "largest-batch search: not run under --tensor-parallel" in notes


def test_bench_e2e_tensor_parallel_needs_torchrun(capsys, monkeypatch):
    from mlakit.cli import main

    monkeypatch.delenv("RANK", raising=False)
    assert main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--tensor-parallel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torchrun --nproc-per-node N -m mlakit bench e2e" in err
