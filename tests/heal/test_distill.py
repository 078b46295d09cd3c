"""Distillation: the chunked KL against a direct reference, the parameter sets, the schedule,
the loss going down, and resume == an uninterrupted run, bit for bit."""

import math

import pytest
import torch
import torch.nn.functional as F

from heal.helpers import VOCAB, gqa_config, mla_config, perturbed, random_model, random_windows
from mlakit import MlakitError
from mlakit.io import save_tree
from mlakit.heal.distill import (STATE_FILENAME, BatchOrder, HealOptions, forward_hidden, heal_model, kl_loss, learning_rate,
                                 load_state, trainable_names)


@pytest.mark.parametrize("window", [None, 5])  # plain causal (mask=None to attention) / a sliding window
def test_forward_hidden_matches_the_model(window):
    model = random_model(mla_config(sliding_window=window), dtype=torch.float64)
    tokens = random_windows(2, 16)
    hidden, layers = forward_hidden(model, tokens, collect=True)
    assert len(layers) == model.config.n_layers
    torch.testing.assert_close(model.head(hidden), model(tokens), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_kl_and_its_gradient_match_a_direct_reference(chunk):
    teacher = random_model(gqa_config(), seed=0, dtype=torch.float64)
    student = random_model(mla_config(), seed=1, dtype=torch.float64)
    tokens = random_windows(3, 10)
    ht, _ = forward_hidden(teacher, tokens)
    hs, _ = forward_hidden(student, tokens)
    loss = kl_loss(student, teacher, hs, ht, chunk)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    # reference: torch's kl_div on the full logits, batchmean over the 30 positions
    ref = F.kl_div(F.log_softmax(student(tokens), -1).reshape(-1, VOCAB),
                   F.log_softmax(teacher(tokens), -1).reshape(-1, VOCAB).detach(), log_target=True,
                   reduction="batchmean")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, p in zip(grads, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        assert float(kl_loss(teacher, teacher, ht, ht, chunk)) == pytest.approx(0, abs=1e-12)


def test_trainable_sets():
    model = random_model(mla_config(q_lora=8, latent_norm=True, bias=True))
    mla = trainable_names(model, "mla")
    attention = trainable_names(model, "attention")
    assert {n.split(".", 3)[3] for n in mla} == {"wq_a.weight", "wq_a.bias", "q_norm.weight", "wq_b.weight",
                                                 "wkv_a.weight", "wkv_a.bias", "kv_norm.weight", "wkv_b.weight"}
    assert set(attention) - set(mla) == {f"layers.{i}.attention.wo.{k}" for i in range(2) for k in ("weight", "bias")}
    assert trainable_names(model, "all") == [n for n, _ in model.named_parameters()]


def test_schedule_warms_up_then_decays_to_the_floor():
    options = HealOptions(tokens=100 * 4 * 32, batch_size=4, seq_len=32, lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    lrs = [learning_rate(options, s) for s in range(options.steps)]
    assert options.steps == 100 and lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert learning_rate(options, 55) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def _options(**kw):
    base = dict(tokens=24 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, warmup=0.1, checkpoint_every=8,
                val_windows=4, progress=False, kl_chunk=50)
    return HealOptions(**{**base, **kw})


def test_kl_goes_down_on_a_tiny_model():
    teacher = random_model(mla_config())
    student = perturbed(teacher, scale=0.5)
    result = heal_model(student, teacher, random_windows(40, 32), _options(tokens=80 * 4 * 32, lr=1e-2),
                        log=lambda *_: None)
    val = [v["kl"] for v in result.log["val"]]
    assert result.finished and result.step == 80
    assert val[-1] < 0.5 * val[0] and val == sorted(val, reverse=True), val
    assert not any(p.requires_grad for p in student.parameters())  # handed back frozen, in eval mode


@pytest.mark.parametrize("train", ["mla", "attention"])
def test_only_the_chosen_parameters_move(train):
    teacher = random_model(mla_config())
    student = perturbed(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    heal_model(student, teacher, random_windows(20, 32), _options(tokens=2 * 4 * 32, train=train),
               log=lambda *_: None)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == set(trainable_names(student, train))


def _rows(windows: torch.Tensor) -> list[tuple]:
    return sorted(tuple(row.tolist()) for row in windows)


@pytest.mark.parametrize("shift", [False, True])
def test_batch_order_reads_every_window_once_per_epoch(shift):
    n, s, b = 12, 16, 4  # an epoch is 3 steps
    windows = torch.arange(n * s).view(n, s)  # every token distinct: a window is known by its tokens
    order = BatchOrder(windows, b, seed=3, shift=shift)
    for epoch in range(4):
        got = torch.cat([order.batch(epoch * 3 + i) for i in range(3)])
        offset = order.offset(epoch)
        # the reference: the text rolled by the epoch's offset, cut into windows
        assert _rows(got) == _rows(torch.roll(windows.reshape(-1), -offset).view(n, s))
        assert (offset != 0) == (shift and epoch > 0)
    assert len({order.offset(e) for e in range(1, 6)}) == (5 if shift else 1)
    first, again = order.batch(0), BatchOrder(windows, b, seed=3, shift=shift).batch(0)
    assert torch.equal(first, again) and not torch.equal(order.batch(0), order.batch(3))  # fixed shuffles, per epoch


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    teacher = random_model(mla_config())
    windows = random_windows(40, 32)
    options = _options(elastic_ranks=[4, 8, 12], hidden_weight=0.5, shift_windows=True)
    whole = perturbed(teacher)
    heal_model(whole, teacher, windows, options, tmp_path / "a", log=lambda *_: None)

    parts = perturbed(teacher)
    stopped = heal_model(parts, teacher, windows, _options(elastic_ranks=[4, 8, 12], hidden_weight=0.5,
                                                            shift_windows=True, max_minutes=0),
                         tmp_path / "b", log=lambda *_: None)
    assert not stopped.finished and stopped.step == 1 and load_state(tmp_path / "b")["step"] == 1
    resumed = perturbed(teacher)  # a fresh process: the converted weights again, then the saved state
    result = heal_model(resumed, teacher, windows, options, tmp_path / "b", resume=True, log=lambda *_: None)
    assert result.finished and result.step == options.steps
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert set(result.log["rank"]) == {4, 8, 12}

    with pytest.raises(MlakitError, match="different settings.*lr"):
        heal_model(perturbed(teacher), teacher, windows, _options(lr=1e-3), tmp_path / "b", resume=True)


def test_a_state_saved_before_an_option_existed_resumes_as_its_default(tmp_path):
    teacher = random_model(mla_config())
    windows = random_windows(40, 32)
    heal_model(perturbed(teacher), teacher, windows, _options(max_minutes=0), tmp_path, log=lambda *_: None)
    state = load_state(tmp_path)
    del state["options"]["shift_windows"]  # as an older mlakit saved it
    save_tree(state, tmp_path / STATE_FILENAME)
    result = heal_model(perturbed(teacher), teacher, windows, _options(), tmp_path, resume=True, log=lambda *_: None)
    assert result.finished
    with pytest.raises(MlakitError, match="different settings.*shift_windows"):
        heal_model(perturbed(teacher), teacher, windows, _options(shift_windows=True), tmp_path, resume=True)


def test_bad_inputs_are_refused():
    teacher = random_model(gqa_config())
    with pytest.raises(MlakitError, match="MLA model"):
        heal_model(random_model(gqa_config()), teacher, random_windows(8, 32), _options())
    with pytest.raises(MlakitError, match="--train"):
        _options(train="mlp").check()
    with pytest.raises(MlakitError, match="less than one step"):
        _options(tokens=10).check()


def test_quantisation_aware_healing_trains_through_the_cache_format():
    """``kv_cache_dtype``: the student's loss is computed on its latent as an int4 cache stores it
    (a different loss from the plain run at step 0), and training still lowers it; ``int4+rope``
    rounds its RoPE key too (another loss again)."""
    from heal.helpers import gqa_config, mla_config, random_model, random_windows

    teacher = random_model(gqa_config(n_layers=1))
    windows = random_windows(8, 16)
    logs = {}
    for fmt in (None, "int4", "int4+rope"):
        student = random_model(mla_config(n_layers=1), seed=1)
        options = HealOptions(tokens=6 * 4 * 16, batch_size=4, seq_len=16, lr=3e-3, val_windows=0, train="all",
                              progress=False, kv_cache_dtype=fmt)
        logs[fmt] = heal_model(student, teacher, windows, options, log=lambda *_: None).log["loss"]
    assert logs["int4"][0] != logs[None][0] and logs["int4+rope"][0] != logs["int4"][0]
    assert logs["int4"][-1] < logs["int4"][0] and logs["int4+rope"][-1] < logs["int4+rope"][0]
