"""Training data: teacher-written text (cached, prompts only from the calibration range) and
the refusal of evaluation data."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from heal.helpers import random_model  # noqa: E402
from mlakit import MlakitError, ModelConfig  # noqa: E402
from mlakit import evaluate as ev  # noqa: E402
from mlakit.heal import data  # noqa: E402
from mlakit.testing.models import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    try:
        ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    return byte_tokenizer()


@pytest.mark.parametrize("span,ok", [(None, False), ("0:131072", True), ("100000:140000", False),
                                     ("151552:", True), ("140000:", False), ("0:32768", True)])
def test_the_protocol_file_needs_a_range_outside_the_evaluation(tokenizer, span, ok):
    if ok:
        windows = data.load_data_file(ev.data_path(), tokenizer, 512, span)
        assert windows.shape[1] == 512 and windows.shape[0] > 0
    else:
        with pytest.raises(MlakitError, match="evaluation"):
            data.load_data_file(ev.data_path(), tokenizer, 512, span)


def test_a_copy_of_the_evaluation_text_is_refused(tokenizer, tmp_path):
    copy = tmp_path / "my_corpus.txt"
    shutil.copy(ev.data_path(), copy)
    with pytest.raises(MlakitError, match="evaluation"):
        data.load_data_file(copy, tokenizer, 512)
    # evaluation-range text inside other text: found by its n-grams
    ids = ev.protocol_tokens(tokenizer)
    mixed = torch.cat([ids[:5000], ids[ev.EVAL_START + 1000:ev.EVAL_START + 6000]])
    torch.save(mixed, tmp_path / "ids.pt")
    with pytest.raises(MlakitError, match="evaluation range"):
        data.load_data_file(tmp_path / "ids.pt", tokenizer, 512)
    assert data.load_data_file(tmp_path / "ids.pt", tokenizer, 512, "0:5000").shape == (9, 512)
    np.save(tmp_path / "calib.npy", ids[:4096].numpy())
    assert torch.equal(data.load_data_file(tmp_path / "calib.npy", tokenizer, 512).reshape(-1), ids[:4096])


def test_other_text_and_bad_ranges(tokenizer, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a tiny model. " * 40)
    assert data.load_data_file(text, tokenizer, 64).shape == (25, 64)
    with pytest.raises(MlakitError, match="fewer than one window"):
        data.load_data_file(text, tokenizer, 4096)
    for bad in ("5", "a:b", "10:5"):
        with pytest.raises(MlakitError, match="data-range"):
            data.parse_range(bad)
    torch.save(torch.tensor([1, 2, 300]), tmp_path / "ids.pt")
    with pytest.raises(MlakitError, match="vocabulary"):
        data.load_data_file(tmp_path / "ids.pt", tokenizer, 2, vocab_size=256)


def test_prompt_snippets_come_only_from_the_calibration_range(tokenizer):
    calib = ev.calibration_tokens(tokenizer)
    options = data.TeacherDataOptions(snippet_fraction=0.5, max_prompt_len=24)
    builtin = {tuple(tokenizer(p, add_special_tokens=False).input_ids[:24]) for p in data.BUILTIN_PROMPTS}
    prompts = data.make_prompts(tokenizer, 200, options, batch_index=3, calib=calib)
    assert prompts == data.make_prompts(tokenizer, 200, options, batch_index=3, calib=calib)
    snippets = [p for p in prompts if tuple(p) not in builtin]
    assert 60 < len(snippets) < 140
    for p in snippets:
        rows = calib.unfold(0, len(p), 1)  # every window of the calibration range
        assert (rows == torch.tensor(p)).all(1).any()


def test_teacher_text_is_generated_once_and_cached(tokenizer, monkeypatch):
    config = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         intermediate_size=32, max_seq_len=128, eos_token_ids=[2])
    teacher = random_model(config, std=0.5)
    options = data.TeacherDataOptions(tokens=300, seq_len=64, batch=6, max_prompt_len=16, seed=1)
    first = data.teacher_data(teacher, tokenizer, options, progress=False, log=lambda *_: None)
    assert first.shape == (5, 64) and first.dtype == torch.long

    def fail(*args):
        raise AssertionError("generated again")

    monkeypatch.setattr(data, "_generate", fail)
    assert torch.equal(data.teacher_data(teacher, tokenizer, options, progress=False, log=lambda *_: None), first)
    for other in (replace(options, seed=2), replace(options, doc_tokens=8)):  # other settings, other cache entry
        with pytest.raises(AssertionError, match="generated again"):
            data.teacher_data(teacher, tokenizer, other, progress=False)


def test_generation_is_timed_and_a_time_limit_cuts_it_short(tokenizer):
    config = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         intermediate_size=32, max_seq_len=128, eos_token_ids=[2])
    teacher = random_model(config, std=0.5)
    messages = []
    options = data.TeacherDataOptions(tokens=300, seq_len=64, batch=4, max_prompt_len=16, seed=3)
    stats = {}
    first = data.teacher_data(teacher, tokenizer, options, progress=False, log=messages.append, stats=stats)
    assert not stats["cached"] and stats["complete"] and not stats["compiled"] and stats["batches"] >= 2
    assert stats["seconds"] > 0 and stats["tokens_per_second"] > 0 and stats["tokens"] == first.numel()
    assert "tokens/s" in messages[-1]
    again = {}
    data.teacher_data(teacher, tokenizer, options, progress=False, log=messages.append, stats=again)
    assert again["cached"] and again["seconds"] == stats["seconds"] and "tokens/s" in messages[-1]

    # max_minutes: one batch at least, then stop; that text is cached apart from the key's token count
    # but reused only by calls that also set a time limit
    short = data.TeacherDataOptions(tokens=300, seq_len=64, batch=4, max_prompt_len=16, seed=4, max_minutes=0)
    cut = {}
    windows = data.teacher_data(teacher, tokenizer, short, progress=False, log=messages.append, stats=cut)
    assert not cut["complete"] and cut["batches"] == 1 and windows.numel() < 300 and "stopped" in messages[-1]
    reused = {}
    assert torch.equal(data.teacher_data(teacher, tokenizer, short, progress=False, log=messages.append,
                                         stats=reused), windows) and reused["cached"]
    full = {}
    whole = data.teacher_data(teacher, tokenizer, data.TeacherDataOptions(tokens=300, seq_len=64, batch=4,
                                                                           max_prompt_len=16, seed=4),
                              progress=False, log=messages.append, stats=full)
    assert not full["cached"] and full["complete"] and whole.numel() >= 256


@pytest.mark.parametrize("doc_tokens", [None, 12])  # documents up to the window's room / shorter ones
def test_teacher_text_is_the_former_token_stream(tokenizer, doc_tokens):
    """The batched generation writes the stream the step-by-step one wrote: every batch's
    prompts, each followed by its continuation up to and with its stop token."""
    from mlakit.engine import SamplingParams, generate_stream

    config = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         intermediate_size=32, max_seq_len=128, eos_token_ids=[2, 10, 32])  # frequent stops
    teacher = random_model(config, std=0.5)
    options = data.TeacherDataOptions(tokens=600, seq_len=64, batch=5, max_prompt_len=16, seed=5, top_p=0.9,
                                      doc_tokens=doc_tokens)
    calib = ev.calibration_tokens(tokenizer)
    windows, stats = data._generate(teacher, tokenizer, options, calib, progress=False)
    stream, stopped = [], 0
    for batch_index in range(stats["batches"]):
        prompts = data.make_prompts(tokenizer, options.batch, options, batch_index, calib)
        params = SamplingParams(max_new_tokens=doc_tokens or options.seq_len - options.max_prompt_len,
                                temperature=1.0, top_p=0.9, seed=options.seed * 1_000_003 + batch_index)
        outputs = [[] for _ in prompts]
        for step in generate_stream(teacher, prompts, params):
            for out, token in zip(outputs, step):
                if token is not None:
                    out.append(token)
        for prompt, out in zip(prompts, outputs):
            stream += prompt + out
            stopped += len(out) < params.max_new_tokens
    assert stopped > 0  # some continuations ended at a stop token
    assert torch.equal(windows, torch.tensor(stream[:windows.numel()]).view_as(windows))


def test_document_length_is_checked():
    with pytest.raises(MlakitError, match="--doc-tokens must be in \\[1, 464\\]"):
        data.TeacherDataOptions(doc_tokens=500).check()
    with pytest.raises(MlakitError, match="--doc-tokens"):
        data.TeacherDataOptions(doc_tokens=0).check()
    assert data.TeacherDataOptions(doc_tokens=200).new_tokens_per_document == 200
    assert data.TeacherDataOptions().new_tokens_per_document == 464


def test_generation_batch_defaults_to_what_the_device_holds(tokenizer, monkeypatch):
    from types import SimpleNamespace

    from mlakit.cache import ModelCache
    from mlakit.config import preset

    # CPU: 256, used when TeacherDataOptions.batch is None, and recorded with the stats
    config = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                         intermediate_size=32, max_seq_len=128, eos_token_ids=[2])
    teacher = random_model(config, std=0.5)
    assert data.default_gen_batch(teacher, 64) == 256
    stats = {}
    options = data.TeacherDataOptions(tokens=64 * 64, seq_len=64, max_prompt_len=16, seed=6)
    data.teacher_data(teacher, tokenizer, options, progress=False, log=lambda *_: None, stats=stats)
    assert stats["batch"] == 256
    # a small request: at most the power of two >= 4 x its windows (at least 8), not 256 sequences
    for tokens, expected in ((300, 32), (64, 8), (64 * 40, 256), (10 ** 7, 256)):  # 5 windows -> 20 -> 32
        assert data.default_gen_batch(teacher, 64, tokens) == expected
    stats = {}
    data.teacher_data(teacher, tokenizer, replace(options, tokens=300), progress=False, log=lambda *_: None,
                      stats=stats)
    assert stats["batch"] == 32

    # GPU: the largest power of two <= 2048 whose bf16 cache fits in a quarter of the memory.
    # The default model caches 30 layers x 384 values x 2 bytes = 23,040 bytes per token.
    default_shape = preset("smollm2-135m")
    gpu_teacher = SimpleNamespace(device=torch.device("cuda"), new_cache=lambda b, length: ModelCache(
        default_shape, b, length, dtype=torch.bfloat16, device="cpu"))
    for total_memory, expected in ((150_110_011_392, 2048),  # H200: 2048 x 512 x 23,040 B = 24.2 GB <= 37.5
                                   (85_520_809_984, 1024),  # H100 80GB: 24.2 > 21.4 GB, 12.1 fits
                                   (25_386_352_640, 512),  # 24 GB card: 6.04 <= 6.35 GB
                                   (4 * 23_040 * 512 * 3, 2)):  # room for 3 sequences: 2
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device, m=total_memory:
                            SimpleNamespace(total_memory=m))
        assert data.default_gen_batch(gpu_teacher, 512) == expected
