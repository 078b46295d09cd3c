"""`mlakit convert` / `--sweep` / `eval` on a tiny byte-level model, as a user runs them."""

import json

import pytest

pytest.importorskip("transformers")

from mlakit import evaluate as ev  # noqa: E402
from mlakit.cli import main  # noqa: E402
from mlakit.errors import MlakitError  # noqa: E402
from mlakit.testing.models import save_tiny_with_tokenizer  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    try:
        ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 2, max_position_embeddings=512)
    return path


def test_convert_then_info_eval_generate(tiny, tmp_path, capsys):
    out = tmp_path / "mla"
    assert main(["convert", str(tiny), "-o", str(out), "--kv-saving", "0.5", "--calib-tokens", "2048",
                 "--rank-allocation", "adaptive", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["values_per_token_layer"] == 32 and summary["kv_saving"] == 0.5
    assert summary["calib_tokens"] == 2048
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attention"] == "MLA" and info["kv_values_per_token"] == 3 * 32
    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_values_per_token_layer"] == 32 and result["ppl"] > 1
    assert main(["generate", str(out), "--prompt", "Hi", "--max-new-tokens", "4", "--greedy", "--device", "cpu",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_ids"]) == 4
    # an existing OUT is never replaced silently
    assert main(["convert", str(tiny), "-o", str(out), "--calib-tokens", "512"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # nothing left behind


@pytest.mark.parametrize("argv,message", [
    (["--kv-saving", "-0.5"], "larger than the original"),
    (["--kv-lora-rank", "1", "--rope-dim", "0", "--calib-tokens", "99999"], "calibration tokens"),
    (["--kv-saving", "0.999"], "too small to hold the RoPE key"),
    ([], "give -o OUT"),
])
def test_bad_convert_input_is_one_line(tiny, tmp_path, argv, message, capsys):
    extra = [] if message == "give -o OUT" else ["-o", str(tmp_path / "x")]
    assert main(["convert", str(tiny), *extra, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mlakit: error:")
    assert not (tmp_path / "x").exists()


def test_converting_an_mla_model_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "mla"
    assert main(["convert", str(tiny), "-o", str(out), "--calib-tokens", "512"]) == 0
    capsys.readouterr()
    assert main(["convert", str(out), "-o", str(tmp_path / "again"), "--calib-tokens", "512"]) == 2
    assert "already an MLA" in capsys.readouterr().err


def test_sweep_writes_table_and_plot(tiny, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["convert", str(tiny), "--sweep", "0.75", "--report", str(report), "--calib-tokens", "512"]) == 0
    table = (report / "sweep.md").read_text()
    assert "wikitext2-smollm2-v1" in table and "ppl (uniform)" in table and "ppl (adaptive)" in table
    assert "| 75.0% | 16 |" in table
    assert (report / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((report / "sweep.json").read_text())
    assert len(data["rows"]) == 2 and all(r["ppl"] > 1 for r in data["rows"])


def test_latent_rotation_converts_to_the_same_function(tiny, tmp_path, capsys):
    """``--latent-rotation equalize+hadamard`` changes the latent's basis, not the model: its
    logits are those of the plain conversion (same calibration, same factorisation)."""
    import torch

    from mlakit.loading import load

    outs = {}
    for kind in ("none", "equalize+hadamard"):
        outs[kind] = tmp_path / kind
        assert main(["convert", str(tiny), "-o", str(outs[kind]), "--calib-tokens", "1024", "--latent-rotation", kind,
                     "--json"]) == 0
    tokens = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, rotated = (load(str(outs[k])).model(tokens) for k in ("none", "equalize+hadamard"))
    assert float((rotated - plain).norm() / plain.norm()) <= 1e-5
    weights = [load(str(outs[k])).model.layers[0].attention.wkv_b.weight for k in ("none", "equalize+hadamard")]
    assert not torch.allclose(*weights)  # the basis did change
