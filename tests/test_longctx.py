"""longctx-smollm2-v1 and passkey-v1: the window arithmetic against a plain float64
computation, the passkey prompts against the protocol's text, and the passkey's
generations against a full-forward greedy reference (so they run through the engine)."""

import math
import random

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit import evaluate as ev
from mlakit import passkey as pk
from mlakit.engine import Engine
from mlakit.loading import LoadedModel
from mlakit.testing.models import WordTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(attention: str, vocab: int = 101, max_seq_len: int = 512) -> Transformer:
    shape = dict(vocab_size=vocab, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, intermediate_size=96,
                 max_seq_len=max_seq_len)
    if attention == "mla":
        shape.update(attention="mla", kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    return Transformer(ModelConfig(**shape)).init_random(seed=0, std=0.2)


def reference_nll(model, windows) -> torch.Tensor:
    """``[n, L-1]`` NLL of each predicted token, float64 log-softmax, one window at a time."""
    rows = []
    with torch.no_grad():
        for w in windows:
            logp = model(w[None, :-1])[0].double().log_softmax(-1)  # [L-1, vocab]
            rows.append(-logp.gather(-1, w[1:, None])[:, 0])
    return torch.stack(rows)


# ------------------------------------------------------------------ long windows
def test_long_windows_cover_the_evaluation_range():
    windows = ev.long_windows(torch.arange(160_000))
    assert windows.shape == (5, 4096)
    assert int(windows[0, 0]) == 131072 and int(windows[-1, -1]) == 151551
    assert torch.equal(windows.flatten(), ev.eval_windows(torch.arange(160_000)).flatten())  # the same range
    with pytest.raises(ev.MlakitError, match="fewer than"):
        ev.long_windows(torch.arange(150_000))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_long_window_ppl_and_buckets_equal_a_plain_computation(attention):
    model = tiny(attention)
    windows = torch.randint(0, 101, (3, 300), generator=torch.Generator().manual_seed(1))
    result = ev.evaluate_long_window(LoadedModel(model, None, "tiny"), progress=False, windows=windows)
    nll = reference_nll(model, windows)  # [3, 299]
    assert result.protocol == "longctx-smollm2-v1"
    assert result.tokens == 3 * 299 and result.windows == 3 and result.window_len == 300
    assert result.nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    # buckets of the predicted token's position j (column j - 1); the protocol's are cut at the window's end
    assert list(result.by_position) == ["[1,300)"]
    buckets = ev.bucket_losses(ev.position_nll(model, windows, batch_size=2), 3, ((1, 100), (100, 300)))
    assert buckets["[1,100)"]["nll"] == pytest.approx(nll[:, :99].mean().item(), rel=1e-5)
    assert buckets["[100,300)"]["nll"] == pytest.approx(nll[:, 99:].mean().item(), rel=1e-5)
    assert buckets["[100,300)"]["tokens"] == 3 * 200


def test_protocol_buckets_cover_every_predicted_position():
    covered = [j for lo, hi in ev.POSITION_BUCKETS for j in range(lo, hi)]
    assert covered == list(range(1, ev.LONG_WINDOW_LEN))


# ------------------------------------------------------------------ passkey prompts
@pytest.mark.parametrize("length", [200, 333, 1024])
def test_passkey_prompts_follow_the_protocol(length):
    tokenizer = WordTokenizer()
    for trial in range(pk.TRIALS):
        prompt = pk.build_prompt(tokenizer, length, trial)
        assert abs(len(prompt.ids) - length) <= 16
        assert prompt.key == random.Random(trial).randint(10000, 99999)
        assert prompt.ids == tokenizer(prompt.text).input_ids
        text = prompt.text
        assert text.startswith("Below is a long text. Somewhere in it is a secret number.\n")
        assert text.endswith("\nQuestion: what is the secret number?\nAnswer: the secret number is")
        key_sentence = f"Remember this: the secret number is {prompt.key}. "
        assert text.count(key_sentence) == 1
        filler = "The quick brown fox jumps over the lazy dog, and the day goes on. "
        before, after = text.split(key_sentence)
        n_before = before.count(filler)
        assert n_before + after.count(filler) == prompt.repeats
        assert n_before == round(trial / 19 * prompt.repeats)  # depth i/19 of the filler
        assert prompt.depth == pytest.approx(trial / 19)


@pytest.mark.slow
def test_the_default_models_prompt_lengths():
    """With SmolLM2's tokenizer the prompts are 1023 / 4095 / 7679 tokens (as the H200 reading's)."""
    pytest.importorskip("gguf")
    from mlakit.loading import load

    tokenizer = load("default").tokenizer
    for length, expected in ((1024, 1023), (4096, 4095), (7680, 7679)):
        assert len(pk.build_prompt(tokenizer, length, 7).ids) == expected


def test_key_found_reads_the_decoded_digits():
    assert pk.key_found(60494, " 60494.")
    assert not pk.key_found(60494, " 6049")
    assert not pk.key_found(60494, " 6 0 4 9 4")


# ------------------------------------------------------------------ passkey generation
def greedy_full_forward(model, ids, steps):
    """Greedy tokens from the whole sequence's cache-less forward at every step (naive MLA)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))  # default options: naive MLA
    return seq[len(ids):]


def test_passkey_generates_through_the_engine_as_a_full_forward_would(monkeypatch):
    model = tiny("mla", vocab=101, max_seq_len=256)
    tokenizer = WordTokenizer()
    loaded = LoadedModel(model, tokenizer, "tiny mla")
    steps = []
    original_decode = Engine.decode

    def recording_decode(self, *args, **kwargs):
        out = original_decode(self, *args, **kwargs)
        steps.append(self.decode_options.mla_path)
        return out

    monkeypatch.setattr(Engine, "decode", recording_decode)
    row = pk.run_length(loaded, 200, trials=3)
    assert len(steps) == 3 * (pk.NEW_TOKENS - 1)  # after each prefill, 7 cached decode steps
    assert all(path == "absorbed" for path in steps)  # the absorbed MLA decode path
    assert row.trials == 3 and row.length_target == 200
    for trial in range(3):
        prompt = pk.build_prompt(tokenizer, 200, trial, 3)
        expected = tokenizer.decode(greedy_full_forward(model, prompt.ids, pk.NEW_TOKENS))
        assert row.outputs[trial] == expected
        assert row.found[trial] == (str(prompt.key) in expected)
    assert row.successes == sum(row.found) and row.share == row.successes / 3
    assert row.prompt_tokens_min >= 184 and row.prompt_tokens_max <= 216


def test_passkey_result_names_its_protocol():
    model = tiny("gqa", vocab=101, max_seq_len=256)
    result = pk.evaluate_passkey(LoadedModel(model, WordTokenizer(), "tiny"), lengths=(100, 150), trials=2,
                                 progress=False)
    assert result.protocol == "passkey-v1"
    assert [r.length_target for r in result.lengths] == [100, 150]
    assert pk.format_passkey(result).startswith("[passkey-v1] tiny: passkey 100: ")
    d = result.to_dict()
    assert d["lengths"][0]["trials"] == 2 and len(d["lengths"][1]["outputs"]) == 2


def test_passkey_too_long_for_the_model_is_explained():
    model = tiny("gqa", vocab=101, max_seq_len=128)
    with pytest.raises(ev.MlakitError, match="max_seq_len"):
        pk.run_length(LoadedModel(model, WordTokenizer(), "tiny"), 200, trials=1)
