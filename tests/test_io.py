"""mlakit.io: the atomic writer, the output lock, stale temporaries, pickle-free state."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mlakit.errors import MlakitError
from mlakit.io import atomic_dir, atomic_file, load_tree, output_lock, save_tree, scratch_dir

REPO = Path(__file__).resolve().parents[1]


def siblings(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}."))


def test_dir_replaced_whole_and_old_removed_after(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(MlakitError, match="already exists"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("new")
        assert (out / "a").read_text() == "old"  # the old output stays until the new one is complete
    assert sorted(os.listdir(out)) == ["b"] and siblings(out) == []


def test_failure_inside_leaves_old_output_and_no_temporaries(tmp_path):
    out = tmp_path / "out.bin"
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(out, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and siblings(out) == []


def test_kind_mismatch_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(MlakitError, match="is a file, but the output is a directory"):
        with atomic_dir(tmp_path / "f", overwrite=True):
            pass
    with pytest.raises(MlakitError, match="is a directory, but the output is a file"):
        with atomic_file(tmp_path / "d", overwrite=True):
            pass
    assert (tmp_path / "f").read_text() == "x" and (tmp_path / "d").is_dir()


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out):
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").exists()


def test_second_writer_fails_fast_while_the_lock_is_held(tmp_path):
    out = tmp_path / "out"
    code = f"from mlakit.io import atomic_dir\nwith atomic_dir({str(out)!r}):\n    pass\n"
    with output_lock(out):
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        assert time.perf_counter() - start < 30
    assert r.returncode == 1 and "being written by another mlakit process" in r.stderr
    assert not out.exists() and siblings(out) == []  # the lock file goes with its holder


def test_lock_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("1")
    assert (out / "x").exists() and siblings(out) == []


def _writer(out: Path, overwrite: bool) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from mlakit.io import atomic_dir
        with atomic_dir({str(out)!r}, overwrite={overwrite}) as tmp:
            (tmp / "part").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_sigkill_mid_write_leaves_old_output_and_next_run_cleans(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    proc = _writer(out, overwrite=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "v").read_text() == "1"  # untouched
    assert any(n.startswith(".out.tmp-") for n in siblings(out))  # what the killed run left
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and siblings(out) == []


def test_sigint_mid_write_removes_the_temporary(tmp_path):
    out = tmp_path / "out"
    proc = _writer(out, overwrite=False)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert not out.exists() and siblings(out) == []


def test_interrupted_replacement_restores_the_old_output(tmp_path):
    # a writer killed between moving the old output aside and renaming the new one in
    out = tmp_path / "out"
    old = tmp_path / ".out.old-123-abcd"
    old.mkdir()
    (old / "v").write_text("old")
    new = tmp_path / ".out.tmp-xyz"
    new.mkdir()
    with output_lock(out):
        pass
    assert (out / "v").read_text() == "old" and siblings(out) == []


def test_scratch_dirs_of_killed_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    code = textwrap.dedent("""
        import time
        from mlakit.io import scratch_dir
        with scratch_dir("convert") as d:
            print(d, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    left = Path(proc.stdout.readline().strip())
    with scratch_dir("convert") as mine:  # the live one is not touched
        assert left.exists() and mine != left
    proc.kill()
    proc.wait()
    assert left.exists()
    with scratch_dir("convert"):
        assert not left.exists()
    assert list(tmp_path.glob("mlakit-convert-*")) == []


def test_tree_round_trip_without_pickle(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], betas=(0.9, 0.95))
    optimizer.param_groups[0]["params"][0].grad = torch.randn(3, 2)
    optimizer.step()
    state = {"step": 3, "optimizer": optimizer.state_dict(), "log": {"kl": [0.5, float("nan")], "rank": [None, 4]},
             "params": {"w": torch.arange(6.0).view(2, 3)}, "pair": (1, "a"), "weird": {"__tensor__": "x"}}
    save_tree(state, tmp_path / "s.safetensors")
    back = load_tree(tmp_path / "s.safetensors")
    assert back["step"] == 3 and back["pair"] == (1, "a") and back["weird"] == {"__tensor__": "x"}
    assert torch.equal(back["params"]["w"], state["params"]["w"])
    assert back["log"]["rank"] == [None, 4] and back["log"]["kl"][1] != back["log"]["kl"][1]
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))])
    restored.load_state_dict(back["optimizer"])  # int keys and tuples survive
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


# seeded, and ids without the bytes: every pytest-xdist worker collects the same tests
@pytest.mark.parametrize("content", [b"", b"\x00" * 7, random.Random(0).randbytes(300)],
                         ids=["empty", "zeros", "random"])
def test_damaged_state_file_is_one_error(tmp_path, content):
    (tmp_path / "s.safetensors").write_bytes(content)
    with pytest.raises(MlakitError, match="s.safetensors is not a readable mlakit state file"):
        load_tree(tmp_path / "s.safetensors")
