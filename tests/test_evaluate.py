"""`mlakit eval`: the protocol's perplexity, against a direct transformers computation."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from mlakit import evaluate as ev  # noqa: E402
from mlakit.cli import main  # noqa: E402
from mlakit.errors import MlakitError  # noqa: E402
from mlakit.testing.models import save_tiny_with_tokenizer  # noqa: E402


def _data_or_skip():
    try:
        return ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text (shared/data/wikitext-2-raw/wiki.test.raw) is not here")


def reference_ppl(hf_model, tokenizer, path) -> float:
    """The protocol written out independently: transformers' forward pass, float64 NLL sum."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    windows = ids[131072:131072 + 40 * 512].view(40, 512)
    total = 0.0
    with torch.no_grad():
        for w in windows.split(8):
            logits = hf_model(w).logits[:, :-1].double()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    return math.exp(total / (40 * 511))


def test_eval_matches_transformers_on_a_tiny_model(tmp_path, capsys):
    path_text = _data_or_skip()
    hf, path = save_tiny_with_tokenizer(tmp_path, "qwen2", 2, max_position_embeddings=512)
    expected = reference_ppl(hf, _tok(path), path_text)
    assert main(["eval", str(path), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "wikitext2-smollm2-v1"
    assert out["tokens"] == 40 * 511
    assert out["kv_values_per_token_layer"] == 2 * 2 * 16
    assert out["kv_saving"] == pytest.approx(1 - 64 / 384)
    assert out["ppl"] == pytest.approx(expected, rel=1e-5)


def test_gemma3_models_go_by_the_gemma_protocol_names_and_their_own_cache(tmp_path, capsys):
    """A Gemma 3 model is measured on the same text and ranges through its own tokenizer:
    the protocol is wikitext2-gemma3-270m-v1, and its KV saving counts against its own
    K/V cache (1 head x 32 x 2 here), before and after conversion."""
    path_text = _data_or_skip()
    hf, path = save_tiny_with_tokenizer(tmp_path, "gemma3", 1, max_position_embeddings=512)
    expected = reference_ppl(hf, _tok(path), path_text)
    assert main(["eval", str(path), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["protocol"], out["kv_values_per_token_layer"], out["kv_saving"]) == ("wikitext2-gemma3-270m-v1", 64, 0)
    assert out["ppl"] == pytest.approx(expected, rel=1e-5)
    mla = tmp_path / "mla"
    assert main(["convert", str(path), "-o", str(mla), "--kv-saving", "0.5", "--calib-tokens", "2048",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", str(mla), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["protocol"], out["kv_values_per_token_layer"], out["kv_saving"]) == ("wikitext2-gemma3-270m-v1", 32,
                                                                                     0.5)


def test_other_families_keep_the_default_protocol_names():
    from mlakit.config import preset

    for arch in ("llama", "qwen3", "mistral"):
        config = preset("smollm2-135m").replace(arch=arch)
        assert ev.protocol_name(ev.LONG_PROTOCOL, config) == "longctx-smollm2-v1"
        assert ev.kv_figures(config) == (384, 30 * 384, 0)
    gemma = preset("smollm2-135m").replace(arch="gemma3", n_kv_heads=1, head_dim=256)
    assert ev.protocol_name(ev.LONG_PROTOCOL, gemma) == "longctx-gemma3-270m-v1"


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_calibration_and_evaluation_ranges_do_not_overlap():
    assert ev.CALIB_RANGE[1] <= ev.EVAL_START
    tokens = torch.arange(200_000)
    windows = ev.eval_windows(tokens)
    assert windows.shape == (40, 512) and int(windows[0, 0]) == 131072 and int(windows[-1, -1]) == 151551


def test_too_short_text_is_explained():
    with pytest.raises(MlakitError, match="fewer than"):
        ev.eval_windows(torch.arange(1000))


def test_bad_calibration_size_is_explained():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [0] * 40000})()

    _data_or_skip()
    with pytest.raises(MlakitError, match="calibration tokens"):
        ev.calibration_tokens(Tok(), 40000)


@pytest.mark.slow
def test_default_model_scores_the_protocol_value(capsys):
    """PROTOCOL.md: the original default model scores 29.60 (transformers' forward pass)."""
    pytest.importorskip("gguf")
    _data_or_skip()
    assert main(["eval", "default", "--json", "--device", "cpu", "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == pytest.approx(29.60, rel=1e-3)
    assert out["kv_values_per_token_layer"] == 384 and out["kv_saving"] == 0


def test_each_tokenizer_gets_its_own_ids_of_the_text():
    """A text's ids are kept per tokenizer object, and the entry goes with it: tokenizers
    made one after another (CPython hands a freed object's address to the next, which an
    id() key could not tell apart: CI once scored the default model on a test's byte ids)
    each get their own ids."""
    _data_or_skip()

    class Constant:
        def __init__(self, token):
            self.token = token

        def __call__(self, text, add_special_tokens=False):
            return type("Encoding", (), {"input_ids": [self.token] * len(text.split())})()

    for token in range(6):
        tokenizer = Constant(token)
        assert set(ev.protocol_tokens(tokenizer)[:1000].tolist()) == {token}
        del tokenizer


def test_eval_kv_cache_dtype_with_rope_rounds_the_rope_key_too(tmp_path, capsys):
    """``--kv-cache-dtype int4+rope`` is an int4 latent and an int4 RoPE key: the CLI's figure is
    ``evaluate`` with those options spelled out, and not the latent-only int4 figure."""
    from mlakit import ModelConfig, Transformer
    from mlakit.loading import load, save_checkpoint
    from mlakit.options import ForwardOptions
    from mlakit.testing.models import byte_tokenizer

    _data_or_skip()
    config = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                         intermediate_size=48, max_seq_len=512, attention="mla", kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    path = save_checkpoint(Transformer(config).init_random(seed=0, std=0.3), tmp_path / "mla", byte_tokenizer())
    figures = {}
    for choice in ("int4", "int4+rope"):
        assert main(["eval", str(path), "--json", "--device", "cpu", "--kv-cache-dtype", choice]) == 0
        figures[choice] = json.loads(capsys.readouterr().out)["ppl"]
    spelled_out = ForwardOptions(kv_cache_dtype="int4", quantize_rope=True)
    assert ForwardOptions.for_cache("int4+rope") == spelled_out and ForwardOptions.for_cache(None) == ForwardOptions()
    expected = ev.evaluate(load(path), progress=False, options=spelled_out).ppl
    assert figures["int4+rope"] == pytest.approx(expected, rel=1e-6)
    assert figures["int4+rope"] != pytest.approx(figures["int4"], rel=1e-4)
