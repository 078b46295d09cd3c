"""Generation against transformers' `generate`, the sampling rules on their own, and the
batched generation against a plain step-by-step reference."""

import pytest
import torch

import mlakit.loading as loading
from mlakit.engine import Engine, SamplingParams, generate, generate_batch, generate_stream, sample_next
from mlakit.testing.models import save_tiny

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, device):
    hf_model, path = save_tiny(tmp_path_factory.mktemp("gen"), "qwen2", 2)
    return hf_model.to(device), loading.load(path, device=device).model


def hf_greedy(hf_model, prompt, max_new_tokens):
    device = hf_model.device
    out = hf_model.generate(torch.tensor([prompt], device=device),
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_batched_greedy_equals_transformers_one_by_one(tiny):
    hf_model, model = tiny
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 211, (n,), generator=gen).tolist() for n in (3, 12, 7, 1)]
    params = SamplingParams(max_new_tokens=20, greedy=True, stop_token_ids=[2])
    outputs = generate(model, prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert out == hf_greedy(hf_model, prompt, 20)


def test_stops_at_eos_and_streams(tiny):
    _, model = tiny
    prompt = [5, 6, 7]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=[]))[0]
    stop = free[4]  # pretend the fifth token is the stop token
    steps = list(generate_stream(model, [prompt], SamplingParams(max_new_tokens=12, greedy=True,
                                                                 stop_token_ids=[stop])))
    streamed = [s[0] for s in steps]
    assert streamed == free[: free.index(stop) + 1]  # stops right after the first stop token


def test_max_new_tokens_and_finished_sequences(tiny):
    _, model = tiny
    outputs = generate(model, [[5, 6], [7, 8, 9]], SamplingParams(max_new_tokens=5, greedy=True, stop_token_ids=[]))
    assert [len(o) for o in outputs] == [5, 5]
    assert generate(model, [[5]], SamplingParams(max_new_tokens=0, greedy=True)) == [[]]


def test_seeded_sampling_is_reproducible(tiny):
    _, model = tiny
    params = SamplingParams(max_new_tokens=15, temperature=1.5, top_p=0.9, seed=123, stop_token_ids=[])
    a = generate(model, [[5, 6, 7]], params)
    b = generate(model, [[5, 6, 7]], params)
    c = generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=15, temperature=1.5, top_p=0.9, seed=124,
                                                    stop_token_ids=[]))
    assert a == b
    assert a != c


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    # temperature: empirical frequencies follow softmax(logits / T)
    draws = sample_next(logits, SamplingParams(temperature=2.0), gen)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = (logits[0].double() / 2.0).softmax(-1)
    assert (freq - expected).abs().max() < 0.015
    # top-k keeps only the k best
    draws = sample_next(logits, SamplingParams(top_k=2), gen)
    assert set(draws.tolist()) == {0, 1}
    # top-p keeps the smallest prefix whose mass reaches p
    probs = logits[0].softmax(-1)
    p = float(probs[0] + probs[1]) - 1e-3  # tokens 0 and 1 are needed, 2 is not
    draws = sample_next(logits, SamplingParams(top_p=p), gen)
    assert set(draws.tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingParams(top_p=1e-6), gen).tolist()) == {0}


@pytest.mark.parametrize("top_p,temperature", [(0.5, 1.0), (0.9, 1.0), (0.97, 0.7), (0.3, 2.0)])
def test_top_p_draws_follow_the_renormalised_nucleus(top_p, temperature):
    """Against a float64 reference that sorts: the nucleus is the longest prefix of the
    sorted tokens whose mass before each token is below top_p; draws follow the
    renormalised probabilities inside it and never leave it."""
    torch.manual_seed(0)
    logits = torch.randn(1, 24) * 2
    rows = 60_000
    draws = sample_next(logits.repeat(rows, 1), SamplingParams(temperature=temperature, top_p=top_p),
                        torch.Generator().manual_seed(1))
    probs = (logits[0].double() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    expected = torch.zeros_like(probs)
    expected[order[keep]] = sorted_probs[keep] / sorted_probs[keep].sum()
    freq = torch.bincount(draws, minlength=24).double() / rows
    assert set(draws.unique().tolist()) <= set(order[keep].tolist())
    assert (freq - expected).abs().max() < 0.01  # 5 standard deviations of a frequency near 1/2
    assert 1 < int(keep.sum()) < 24  # the nucleus is neither one token nor all


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_too_long_is_refused(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[5] * 250], SamplingParams(max_new_tokens=10))


# ------------------------------------------------------------------ batched generation
@torch.inference_mode()
def reference_generate(model, prompts, params):
    """Step by step, the stop test on the host (what ``generate`` did before ``generate_batch``)."""
    tokens = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long, device=model.device)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = torch.tensor(prompt)
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    engine = Engine(model, len(prompts), int(lengths.max()) + params.max_new_tokens)
    stop = set(model.config.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
    generator = None if params.seed is None else torch.Generator(device=model.device).manual_seed(params.seed)
    logits, positions = engine.prefill(tokens, lengths), lengths.clone()
    outputs, finished = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(params.max_new_tokens):
        next_tokens = sample_next(logits, params, generator)
        for i, token in enumerate(next_tokens.tolist()):
            if not finished[i]:
                outputs[i].append(token)
            finished[i] = finished[i] or token in stop
        if all(finished):
            break
        logits = engine.decode(next_tokens, positions)
        positions += 1
    return outputs


PROMPTS = [[5, 6, 7], [40, 41], [100] * 9, [3], [17, 18, 19, 20, 21]]


@pytest.mark.parametrize("sampling", [dict(greedy=True), dict(top_p=0.9, seed=11), dict(top_p=0.8, top_k=40, seed=12),
                                      dict(temperature=1.3, top_p=0.95, seed=13)])
@pytest.mark.parametrize("stops", ["none", "some", "all"])
def test_generate_batch_equals_step_by_step_generation(tiny, sampling, stops):
    """Stop tokens hit at different steps (some sequences, or all of them, the loop then
    ending early: on the host's check every FINISHED_CHECK_EVERY steps)."""
    _, model = tiny
    max_new = 40
    free = reference_generate(model, PROMPTS, SamplingParams(max_new_tokens=max_new, stop_token_ids=[], **sampling))
    # sequence -> the step of its free-running output whose token becomes a stop token
    stop_at = {"none": {}, "some": {0: 3, 3: 11}, "all": {0: 2, 1: 5, 2: 9, 3: 14, 4: 20}}[stops]
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=[free[i][j] for i, j in stop_at.items()],
                            **sampling)
    expected = reference_generate(model, PROMPTS, params)
    lengths = [len(out) for out in expected]
    # stopped (at that step or earlier, where that token came before) at different steps
    assert all(lengths[i] <= j + 1 for i, j in stop_at.items())
    assert len(set(lengths)) > 1 or stops == "none"

    tokens, counts = generate_batch(model, PROMPTS, params)
    assert tokens.shape == (len(PROMPTS), max_new) and tokens.device == model.device
    assert counts.tolist() == lengths
    assert [row[:n] for row, n in zip(tokens.tolist(), lengths)] == expected
    assert all(set(row[n:]) <= {-1} for row, n in zip(tokens.tolist(), lengths))
    assert generate(model, PROMPTS, params) == expected
    streamed = [[] for _ in PROMPTS]
    steps = list(generate_stream(model, PROMPTS, params))
    for step in steps:
        for out, token in zip(streamed, step):
            if token is not None:
                out.append(token)
    assert streamed == expected and len(steps) == max(lengths)  # the stream ends at the last stop


def test_generate_batch_without_new_tokens(tiny):
    _, model = tiny
    tokens, counts = generate_batch(model, [[5], [6, 7]], SamplingParams(max_new_tokens=0, greedy=True))
    assert tokens.shape == (2, 0) and counts.tolist() == [0, 0]
