"""`mlakit heal`, `--runtime-rank` and the refusals, as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mlakit import evaluate as ev  # noqa: E402
from mlakit.cli import main  # noqa: E402
from mlakit.heal.distill import STATE_FILENAME  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FAST = ["--device", "cpu", "--batch-size", "2", "--seq-len", "64", "--no-progress"]


def test_heal_then_eval_at_runtime_ranks(tiny_converted, tmp_path, capsys):
    teacher, student = tiny_converted
    out = tmp_path / "healed"
    capsys.readouterr()
    assert main(["heal", str(student), "--teacher", str(teacher), "-o", str(out), "--tokens", "1k",
                 "--teacher-tokens", "1k", "--gen-batch", "8", "--elastic-ranks", "4,8,12", "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["tokens"] == 8 * 2 * 64 and summary["data"]["source"] == "teacher"
    log = json.loads((out / "heal_log.json").read_text())
    assert len(log["log"]["loss"]) == 8 and set(log["log"]["rank"]) <= {4, 8, 12}
    assert log["data"]["generation"]["tokens_per_second"] > 0 and len(log["log"]["step_seconds"]) == 8
    assert log["tokens_per_second_overall"] > 0
    assert (out / "heal_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "healed.heal").exists()  # the state goes once OUT is written
    assert main(["eval", str(out), "--json", "--device", "cpu", "--runtime-rank", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_values_per_token_layer"] == 8 + 4 and result["ppl"] > 1  # rank 8 + RoPE 4 (was 12 + 4)
    assert main(["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "3", "--greedy", "--device", "cpu",
                 "--runtime-rank", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 3
    # an existing OUT is never replaced silently
    assert main(["heal", str(student), "--teacher", str(teacher), "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["--data", "EVAL"], "evaluation text"),
    (["--data", "EVAL", "--data-range", "120000:140000"], "evaluation text"),
    (["--data-range", "0:100"], "needs --data"),
    (["--train", "mla", "--tokens", "10"], "less than one step"),
    (["--elastic-ranks", "4,99"], "exceed"),
    (["--doc-tokens", "999"], "--doc-tokens must be in"),
])
def test_bad_heal_input_is_one_line(tiny_converted, tmp_path, argv, message, capsys):
    teacher, student = tiny_converted
    argv = [str(ev.data_path()) if a == "EVAL" else a for a in argv]
    assert main(["heal", str(student), "--teacher", str(teacher), "-o", str(tmp_path / "x"), *FAST, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mlakit: error:")
    assert not (tmp_path / "x").exists()


def test_healing_the_original_or_truncating_gqa_is_refused(tiny_converted, tmp_path, capsys):
    teacher, _ = tiny_converted
    assert main(["heal", str(teacher), "--teacher", str(teacher), "-o", str(tmp_path / "x"), *FAST]) == 2
    assert "not an MLA model" in capsys.readouterr().err
    assert main(["eval", str(teacher), "--runtime-rank", "4", "--device", "cpu"]) == 2
    assert "needs an MLA model" in capsys.readouterr().err


def test_stop_and_resume_then_a_subprocess_run(tiny_converted, tmp_path, capsys):
    teacher, student = tiny_converted
    ids = ev.calibration_tokens(AutoTokenizer.from_pretrained(str(teacher)), 4096)
    torch.save(ids, tmp_path / "calib.pt")
    args = ["heal", str(student), "--teacher", str(teacher), "-o", str(tmp_path / "out"), "--tokens", "2k",
            "--data", str(tmp_path / "calib.pt"), "--layerwise-init", "3", "--json", *FAST]
    assert main([*args, "--max-minutes", "0"]) == 3  # stops after one step, state saved
    assert json.loads(capsys.readouterr().out)["step"] == 1 and (tmp_path / "out.heal" / STATE_FILENAME).exists()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["step"] == 16 and summary["layerwise"]["steps"] == 3

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlakit", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    proc = run("heal", "--help")
    assert proc.returncode == 0 and "--elastic-ranks" in proc.stdout and "--layerwise-init" in proc.stdout
    proc = run("heal", str(student), "--teacher", str(teacher), "-o", str(tmp_path / "sub"), "--tokens", "256",
               "--data", str(tmp_path / "calib.pt"), "--train", "mla", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "held-out KL" in proc.stdout and (tmp_path / "sub" / "mlakit.json").exists()

    # 8 windows: too few to hold some out, and the summary says so instead of "nan -> nan"
    capsys.readouterr()
    assert main(["heal", str(student), "--teacher", str(teacher), "-o", str(tmp_path / "few"), "--tokens", "256",
                 "--data", str(tmp_path / "calib.pt"), "--data-range", "0:512", "--train", "mla", *FAST]) == 0
    out = capsys.readouterr().out
    assert "no held-out KL (the text holds fewer than 10 windows" in out and "nan" not in out


def test_new_options_reach_heal_options():
    import argparse

    from mlakit.heal.cli import options_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["heal", "m", "--teacher", "t", "-o", "o", "--compile", "--elastic-ranks", "4,8",
                              "--elastic-full-share", "0.7", "--shift-windows"])
    options, _ = options_from_args(args)
    assert options.compile and options.elastic_full_share == 0.7 and options.elastic_ranks == [4, 8]
    assert options.shift_windows
    defaults, _ = options_from_args(parser.parse_args(["heal", "m", "--teacher", "t", "-o", "o"]))
    assert not defaults.compile and defaults.elastic_full_share == 0.5 and not defaults.shift_windows


def test_out_of_memory_names_the_remedies(monkeypatch, tmp_path, capsys):
    import mlakit.heal.api as heal_api

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB\nmore detail")

    monkeypatch.setattr(heal_api, "heal", out_of_memory)
    for name in ("mla", "src"):  # the arguments are checked before heal is called: they must look like models
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert main(["heal", str(tmp_path / "mla"), "--teacher", str(tmp_path / "src"), "-o", str(tmp_path / "out"),
                 "--batch-size", "64", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "64 x 512" in err and "Tried to allocate 6.00 GiB" in err
    assert "--batch-size" in err and "--gradient-checkpointing" in err


def test_torchrun_heal_on_two_processes_writes_what_one_process_writes(tiny_converted, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m mlakit heal` (gloo, FSDP2): rank 0 alone prints and writes
    OUT, and OUT holds the weights one process writes from the same data (float32 rounding)."""
    import socket

    from mlakit.loading import load

    teacher, student = tiny_converted
    ids = ev.calibration_tokens(AutoTokenizer.from_pretrained(str(teacher)), 4096)
    torch.save(ids, tmp_path / "calib.pt")
    args = ["heal", str(student), "--teacher", str(teacher), "--tokens", "512", "--data", str(tmp_path / "calib.pt"),
            "--train", "all", *FAST]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mlakit", *args,
                           "-o", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and not (tmp_path / "two.heal").exists()
    one, two = (load(str(tmp_path / name)).model.state_dict() for name in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    log = json.loads((tmp_path / "two" / "heal_log.json").read_text())
    assert log["processes"] == 2 and log["step"] == 4
