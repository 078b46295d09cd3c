"""ood-smollm2-v1: reading the texts, the window arithmetic against a plain float64
computation, and `mlakit eval --protocol` (parsing, JSON keys, protocol names)."""

import hashlib
import json
import math

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit import evaluate as ev
from mlakit import ood
from mlakit.cli import build_parser, main
from mlakit.errors import MlakitError
from mlakit.loading import LoadedModel

pytestmark = pytest.mark.usefixtures("one_thread")


def texts_or_skip():
    if not ood.available():
        pytest.skip("the ood-smollm2-v1 texts are not here (scripts/fetch_ood_text.py)")
    return ood.ood_dir()


def test_ranges_are_disjoint_and_fit_the_shorter_text():
    assert ood.CALIB_RANGE[1] <= ood.EVAL_START
    windows = ood.eval_windows(torch.arange(39_357))  # alice29.txt in the default model's tokens
    assert windows.shape == (32, 512) and int(windows[0, 0]) == 16384 and int(windows[-1, -1]) == 32767
    with pytest.raises(MlakitError, match="fewer than"):
        ood.eval_windows(torch.arange(30_000))


def test_read_text_normalises_and_checks_the_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert ood.read_text(path) == "one\ntwo\n"
    assert ood.read_text(path, hashlib.sha256(b"one\r\ntwo\r\n").hexdigest()) == "one\ntwo\n"
    with pytest.raises(MlakitError, match="SHA-256"):
        ood.read_text(path, "0" * 64)
    with pytest.raises(MlakitError, match="fetch_ood_text"):
        ood.read_text(tmp_path / "missing.txt")


def test_the_fetched_texts_are_the_protocols(monkeypatch):
    directory = texts_or_skip()
    for spec in ood.TEXTS:
        assert hashlib.sha256((directory / spec.file).read_bytes()).hexdigest() == spec.sha256
    alice = ood.read_text(directory / "alice29.txt")
    assert "ALICE'S ADVENTURES IN WONDERLAND" in alice and "\r" not in alice
    assert "WORKSHOP ON ELECTRONIC TEXTS" in ood.read_text(directory / "lcet10.txt")


def test_ood_ppl_equals_a_plain_computation():
    model = Transformer(ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                                    intermediate_size=96, max_seq_len=128)).init_random(seed=0, std=0.2)
    gen = torch.Generator().manual_seed(2)
    windows = {"a": torch.randint(0, 101, (3, 40), generator=gen), "b": torch.randint(0, 101, (2, 40), generator=gen)}
    result = ood.evaluate_ood(LoadedModel(model, None, "tiny"), batch_size=2, progress=False, windows=windows)
    losses = {}
    with torch.no_grad():
        for name, w in windows.items():
            logp = model(w[:, :-1]).double().log_softmax(-1)
            losses[name] = -logp.gather(-1, w[:, 1:, None]).mean().item()
    assert result.protocol == "ood-smollm2-v1"
    for name, loss in losses.items():
        assert result.texts[name]["nll"] == pytest.approx(loss, rel=1e-5)
        assert result.texts[name]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.texts["a"]["tokens"] == 3 * 39
    assert result.ppl == pytest.approx(math.exp((losses["a"] + losses["b"]) / 2), rel=1e-5)
    assert ood.format_ood(result).startswith("[ood-smollm2-v1] tiny: ppl a ")


# ------------------------------------------------------------------ the CLI
def test_protocol_choices_parse():
    parser = build_parser()
    for choice in ("wikitext2", "longctx", "ood", "all"):
        assert parser.parse_args(["eval", "m", "--protocol", choice]).protocol == choice
    assert parser.parse_args(["eval", "m"]).protocol == "wikitext2"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "m", "--protocol", "wiki"])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from mlakit.testing.models import save_tiny_with_tokenizer

    try:
        ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text (shared/data/wikitext-2-raw/wiki.test.raw) is not here")
    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 2, max_position_embeddings=512)
    return path


def test_eval_all_prints_every_protocol_and_its_json(tiny_checkpoint, capsys, monkeypatch):
    """The protocols shrunk to a tiny byte-level model's reach (its 512 positions; a byte
    tokenizer's filler sentence is 66 tokens, so the passkey's tolerance widens)."""
    from mlakit import passkey

    texts_or_skip()
    monkeypatch.setattr(ev, "LONG_WINDOW_LEN", 256)
    monkeypatch.setattr(passkey, "LENGTHS", (300,))
    monkeypatch.setattr(passkey, "TRIALS", 2)
    monkeypatch.setattr(passkey, "LENGTH_TOLERANCE", 40)
    assert main(["eval", str(tiny_checkpoint), "--protocol", "all", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[wikitext2-smollm2-v1", "[longctx-smollm2-v1", "[passkey-v1",
                                                      "[ood-smollm2-v1"]
    assert main(["eval", str(tiny_checkpoint), "--protocol", "all", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == str(tiny_checkpoint)
    results = out["results"]
    assert list(results) == ["wikitext2-smollm2-v1", "longctx-smollm2-v1", "passkey-v1", "ood-smollm2-v1"]
    assert all(r["protocol"] == name for name, r in results.items())
    long = results["longctx-smollm2-v1"]
    assert long["tokens"] == 5 * 255 and list(long["by_position"]) == ["[1,256)"]
    assert [r["length_target"] for r in results["passkey-v1"]["lengths"]] == [300]
    assert set(results["ood-smollm2-v1"]["texts"]) == {"fiction", "expository"}
    assert results["ood-smollm2-v1"]["texts"]["fiction"]["tokens"] == 32 * 511


def test_eval_wikitext2_json_keeps_its_flat_form(tiny_checkpoint, capsys):
    assert main(["eval", str(tiny_checkpoint), "--protocol", "wikitext2", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "wikitext2-smollm2-v1" and out["tokens"] == 40 * 511


def test_missing_texts_are_one_error_line(tiny_checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLAKIT_OOD_DIR", str(tmp_path / "nowhere"))
    assert main(["eval", str(tiny_checkpoint), "--protocol", "ood", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlakit: error: ") and "fetch_ood_text" in err


def test_calibration_tokens_are_the_start_of_each_text():
    directory = texts_or_skip()
    from mlakit.testing.models import byte_tokenizer

    pytest.importorskip("transformers")
    tokenizer = byte_tokenizer()
    for spec in ood.TEXTS:
        text = ood.read_text(directory / spec.file)
        calib = ood.calibration_tokens(tokenizer, spec.name)
        assert calib.numel() == 8192
        assert tokenizer.decode(calib.tolist()) == text[:8192]  # ASCII text: one byte, one token
    with pytest.raises(MlakitError, match="calibration tokens"):
        ood.calibration_tokens(tokenizer, "fiction", 8193)
