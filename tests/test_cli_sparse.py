"""`--sparse-topk` on generate/eval and `--runtime-rank auto`, as a user runs them (a tiny
converted byte-level llama); the rank rule itself."""

import json

import pytest

pytest.importorskip("transformers")

from mlakit import ModelConfig, Transformer  # noqa: E402
from mlakit.cli import main  # noqa: E402
from mlakit.elastic import AUTO_FULL_RANK_TOKENS, auto_latent_rank, auto_latent_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _run(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


GEN = ["--prompt", "The quick brown fox jumps over the lazy dog. " * 3, "--max-new-tokens", "12", "--greedy",
       "--device", "cpu", "--json"]


def test_generate_sparse_covering_the_context_is_dense(tiny_converted, capsys):
    _, converted = tiny_converted
    dense = _run(capsys, ["generate", str(converted), *GEN])
    sparse = _run(capsys, ["generate", str(converted), *GEN, "--sparse-topk", "512", "--sparse-index-rank", "4"])
    assert sparse["output_ids"] == dense["output_ids"]
    narrow = _run(capsys, ["generate", str(converted), *GEN, "--sparse-topk", "2", "--sparse-window", "2",
                           "--sparse-sink", "1"])
    assert len(narrow["output_ids"]) == 12


def test_eval_through_the_sparse_path(tiny_converted, capsys):
    _, converted = tiny_converted
    dense = _run(capsys, ["eval", str(converted), "--json", "--device", "cpu"])
    covering = _run(capsys, ["eval", str(converted), "--json", "--device", "cpu", "--sparse-topk", "1024"])
    assert covering["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)  # 512-token windows: every key kept
    narrow = _run(capsys, ["eval", str(converted), "--json", "--device", "cpu", "--sparse-topk", "4",
                           "--sparse-window", "4", "--sparse-sink", "1"])
    assert narrow["ppl"] != pytest.approx(dense["ppl"], rel=1e-4) and narrow["ppl"] > 1


def test_runtime_rank_auto_on_a_short_request_is_full_rank(tiny_converted, capsys):
    _, converted = tiny_converted
    full = _run(capsys, ["generate", str(converted), *GEN])
    auto = _run(capsys, ["generate", str(converted), *GEN, "--runtime-rank", "auto"])
    assert auto["output_ids"] == full["output_ids"] and "(runtime rank 12)" in auto["model"]


@pytest.mark.parametrize("argv,message", [
    (["--sparse-topk", "8"], "needs an MLA model"),
    (["--runtime-rank", "auto"], "needs an MLA model"),
])
def test_sparse_and_auto_rank_need_mla(tiny_converted, capsys, argv, message):
    original, _ = tiny_converted
    assert main(["generate", str(original), *GEN, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--sparse-topk", "0"], "--sparse-topk must be >= 1, got 0"),
    (["--sparse-topk", "4", "--sparse-window", "-1"], "--sparse-window must be >= 0, got -1"),
    (["--sparse-topk", "4", "--sparse-sink", "-2"], "--sparse-sink must be >= 0, got -2"),
    (["--sparse-topk", "4", "--sparse-index-rank", "0"], "--sparse-index-rank must be >= 1, got 0"),
])
def test_bad_sparse_values_are_one_line(tiny_converted, capsys, argv, message):
    """Named by their flags, before the model is loaded."""
    _, converted = tiny_converted
    assert main(["generate", str(converted), *GEN, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_auto_rank_rule():
    config = ModelConfig(vocab_size=11, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                         intermediate_size=16, attention="mla", kv_lora_rank=[64, 48], qk_rope_head_dim=4,
                         qk_nope_head_dim=8, v_head_dim=8, max_seq_len=64)
    model = Transformer(config)
    assert auto_latent_rank(model, 100) == 64 and auto_latent_rank(model, AUTO_FULL_RANK_TOKENS) == 64
    assert auto_latent_rank(model, 2 * AUTO_FULL_RANK_TOKENS) == 32  # half the cache per token at twice the length
    assert auto_latent_rank(model, 3 * AUTO_FULL_RANK_TOKENS) == 16  # 21.3 -> 16 (multiple of 8)
    assert auto_latent_rank(model, 100 * AUTO_FULL_RANK_TOKENS) == 16  # floor: a quarter of full rank
    assert auto_latent_ranks(model, [10, 8192]) == [64, 32]
