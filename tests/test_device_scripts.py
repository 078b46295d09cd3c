"""The GPU scripts in scripts/device/ run their whole code path on the CPU (``--smoke``).

A device session is short, so a script that breaks on the GPU wastes it: these runs catch
what a change breaks in the scripts' own code (their numbers on a tiny CPU model mean
nothing and are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_device_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "device" / name), *args], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ), timeout=900)


def run_script(name: str, *args: str) -> str:
    result = run_device_script(name, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_gen_speed_smoke():
    out = run_script("gen_speed.py", "--smoke", "--profile")
    for table in ("one layer's decode attention", "decode step (graph replay)", "sample_top_p (no sort)",
                  "| span buckets", "| one graph over the whole cache", "profile: 6 compiled decode steps"):
        assert table in out


def test_heal_speed_smoke():
    out = run_script("heal_speed.py", "--smoke")
    assert "| 2 x 32 | 64 |" in out and "| 4 x 32 | 128 |" in out and "out of memory" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs its CUDA cases itself")
def test_kernels_check_correctness_on_the_interpreter():
    """kernels_check's correctness section (the test suite's cases, crossed with dtypes) on the
    interpreter cases; a fresh process, since TRITON_INTERPRET must be set before the kernels load."""
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'scripts/device'); import kernels_check as k; "
            "from mlakit.testing import kernel_cases as c; "
            "r, f = k.check_correctness(c.INTERP_DECODE_CASES, c.INTERP_ROPE_CASES, device='cpu', "
            "dtypes=('float32', 'float16')); print('RESULT', len(r), f)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from mlakit.testing import kernel_cases as cases

    expected = 2 * (len(cases.INTERP_DECODE_CASES) + len(cases.INTERP_ROPE_CASES))
    assert f"RESULT {expected} 0" in result.stdout, result.stdout[-3000:]


def test_heal_check_smoke(tmp_path):
    pytest.importorskip("transformers")
    from mlakit import MlakitError
    from mlakit.evaluate import data_path

    try:
        data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    out = run_script("heal_check.py", "--smoke", "--out", str(tmp_path / "heal"))
    assert out.rstrip().endswith("done")
    assert "| KV saving | values/token/layer | ppl training-free | ppl healed |" in out
    assert "Targets (issue 7):" in out
    assert (tmp_path / "heal" / "heal.json").exists()

    # one change (--shift-windows) from the same converted checkpoint: nothing converted again
    again = run_script("heal_check.py", "--smoke", "--out", str(tmp_path / "shift"), "--from-run",
                       str(tmp_path / "heal"), "--savings", "0.75", "--elastic-minutes", "0", "--shift-windows")
    assert "starting from" in again and "convert at" not in again and "windows shifted per epoch" in again
    assert "tokens from the cache" in again  # the first run's teacher text
    assert again.rstrip().endswith("done")
    first, second = (json.loads((tmp_path / d / "heal.json").read_text()) for d in ("heal", "shift"))
    assert second["rows"]["0.75"]["free"] == first["rows"]["0.75"]["free"]
    assert second["rows"]["0.75"]["heal"]["tokens"] == first["rows"]["0.75"]["heal"]["tokens"]


def test_decode_profile_smoke():
    out = run_script("decode_profile.py", "--smoke")
    assert "decode-e2e-v1: where a decode step goes" in out and "| GQA-2 | 1x64 |" in out and "| MLA 16+8 | 1x64 |" in out


def test_longctx_method_smoke(tmp_path):
    pytest.importorskip("transformers")
    from mlakit import MlakitError
    from mlakit.evaluate import data_path

    try:
        data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    out = run_script("longctx_method.py", "--smoke", "--out", str(tmp_path / "lc"), "--heal-variant", "long")
    assert "| original |" in out and "calibration long |" in out and "healed (long calibration" in out


def test_dist_check_smoke():
    out = run_script("dist_check.py", "--smoke")
    assert "heal-fsdp2-v1" in out and "decode-e2e-v1" in out
    assert "| tiny | 2 | 4 x 64 |" in out and "| mla | 2 |" in out and "error" not in out.lower()


def test_sparse_check_smoke(tmp_path):
    out = run_script("sparse_check.py", "--smoke", "--out", str(tmp_path / "sparse"))
    assert "all correctness cases ok" in out and out.rstrip().endswith("done")
    assert "| batch | context | k | r_idx | dense us | sparse us |" in out
    assert "| batch | context | dense ms/step | sparse ms/step |" in out
    assert json.loads((tmp_path / "sparse" / "sparse.json").read_text())["attention"]


def test_longctx_check_smoke(tmp_path):
    pytest.importorskip("transformers")
    from mlakit import MlakitError, ood
    from mlakit.evaluate import data_path

    try:
        data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    if not ood.available():
        pytest.skip("the ood-smollm2-v1 texts are not here (scripts/fetch_ood_text.py)")
    out = run_script("longctx_check.py", "--smoke", "--out", str(tmp_path / "lc"), "--savings", "0.5", "--heal", "")
    assert out.rstrip().endswith("done")
    assert "| model | KV saving | values/token/layer | wikitext2 ppl (512) | long-window ppl |" in out
    for name in ("| original |", "| MLA 0.5 training-free |", "| MLA 0.5 healed |"):
        assert name in out
    for protocol in ("[wikitext2-smollm2-v1]", "[longctx-smollm2-v1]", "[passkey-v1]", "[ood-smollm2-v1]"):
        assert protocol in out
    results = json.loads((tmp_path / "lc" / "longctx.json").read_text())
    assert set(results["rows"]) == {"original", "MLA 0.5 training-free", "MLA 0.5 healed"}
    rows = results["rows"]
    assert rows["MLA 0.5 training-free"]["kv_values_per_token_layer"] == pytest.approx(
        0.5 * rows["original"]["kv_values_per_token_layer"], rel=0.1)
    again = run_script("longctx_check.py", "--smoke", "--out", str(tmp_path / "lc"), "--savings", "0.5", "--heal", "")
    assert "$ mlakit convert" not in again and "$ mlakit heal" not in again  # every step was done


def test_frontier_check_smoke(tmp_path):
    out = run_script("frontier_check.py", "--smoke", "--work", str(tmp_path / "fr"), "--export", str(tmp_path / "x"),
                     "--cache-dtypes", "bf16,int4", "--latent-dtypes", "int8,int4+rope", "--qat", "int4",
                     "--rotations", "equalize+hadamard")
    assert "kv-frontier-v1" in out and "| original | int4 |" in out
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["frontier.json", "frontier.md", "frontier.png",
                                                                  "steps.json"]
    points = json.loads((tmp_path / "x" / "frontier.json").read_text())["points"]
    assert [(p["model"].rsplit("/", 1)[-1], p["cache"]) for p in points][2:] == [
        ("mla-0.5-equalize-hadamard", "int8"), ("mla-0.5-equalize-hadamard", "int4+rope"),
        ("healed-0.5-equalize-hadamard-int4", "int8"), ("healed-0.5-equalize-hadamard-int4", "int4+rope")]
    again = run_script("frontier_check.py", "--smoke", "--work", str(tmp_path / "fr"), "--steps", "convert,heal",
                       "--qat", "int4", "--rotations", "equalize+hadamard")
    assert "$ mlakit" not in again  # every step's output is there: nothing runs twice


def test_frontier_check_continues_a_heal_cut_short(tmp_path):
    """--heal-minutes counts the teacher text too, so on the GPU a heal may stop before its last
    step (it saves OUT.heal/ and fails the step): the next run continues it with --resume."""
    args = ["--smoke", "--work", str(tmp_path / "fr"), "--steps", "convert,heal", "--qat", "int4"]
    cut = run_device_script("frontier_check.py", *args, "--heal-minutes", "0")
    assert cut.returncode != 0 and "rerun with --resume" in cut.stdout + cut.stderr
    assert (tmp_path / "fr" / "healed-0.5-int4.heal").is_dir() and not (tmp_path / "fr" / "healed-0.5-int4").exists()
    out = run_script("frontier_check.py", *args)
    assert "--resume" in out and (tmp_path / "fr" / "healed-0.5-int4" / "mlakit.json").exists()


def test_family_parity_check_on_the_cpu():
    """The GPU family check's code path on the CPU: mlakit at Gemma-3-270M's attention shape
    (and Qwen3 / Llama at head_dim 256 / 128) against transformers, with a control that must
    disagree."""
    out = run_script("family_parity_check.py", "--device", "cpu", "--quick")
    assert out.rstrip().endswith("PASS")
    assert "| gemma3 270m attention | 300 | 4 |" in out and "control: another seed" in out


def test_quant_gluon_bench_smoke():
    """The bench's code path on the CPU: the Triton quantised kernel's reference check runs, and
    the Gluon kernel's refusal off Hopper is reported per row without stopping the others."""
    out = run_script("quant_gluon_bench.py", "--smoke")
    assert "decode-attn-v1" in out and "| batch x ctx | format |" in out, out
    assert out.count("needs a Hopper GPU") >= 3 and all(f"| {f} |" in out for f in ("int8", "fp8", "int4")), out
