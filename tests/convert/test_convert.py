"""GQA -> MLA conversion: exact at the full budget (against transformers), finite below it."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mlakit.convert import ConvertOptions, analyse, convert, convert_model  # noqa: E402
from mlakit.errors import MlakitError  # noqa: E402
from mlakit.loading import load, no_hub_kernels, save_checkpoint  # noqa: E402
from mlakit.options import ForwardOptions  # noqa: E402
from mlakit.testing.models import save_tiny  # noqa: E402

CASES = [("llama", 2), ("llama", 6), ("qwen2", 2), ("qwen2", 1), ("mistral", 3)]


def calib_tokens(n=512, vocab=211, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def options(**kw):
    return ConvertOptions(calib_seq_len=64, progress=False, **kw)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 211, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,kv", CASES, ids=[f"{a}-kv{k}" for a, k in CASES])
def test_full_budget_reproduces_transformers(tmp_path, arch, kv, tokens, rel_err):
    hf, path = save_tiny(tmp_path, arch, kv)
    source = load(path).model
    full_rope = kv * source.config.head_dim  # every key dim of every KV head in the RoPE key
    mla, summary = convert(source, calib_tokens(256), options(kv_saving=0.0, rope_dim=full_rope))
    config = mla.config
    assert config.is_mla and config.qk_rope_head_dim == full_rope and config.qk_nope_head_dim == 0
    assert config.kv_lora_ranks() == [full_rope] * config.n_layers  # the latent holds all value dims
    assert config.kv_values_per_token_total() == source.config.kv_values_per_token_total()
    assert summary.kv_saving == 0
    with torch.no_grad():
        ref = hf(tokens).logits
        for mode in ("naive", "absorbed"):
            assert rel_err(mla(tokens, options=ForwardOptions(mla_path=mode)), ref) <= 1e-5, mode
        # decoding token by token from the latent cache (absorbed) as well
        cache = mla.new_cache(2, 48)
        steps = [mla(tokens[:, i:i + 1], torch.full((2, 1), i), cache) for i in range(tokens.shape[1])]
    assert rel_err(torch.cat(steps, 1), ref) <= 1e-5


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 2)])
@pytest.mark.parametrize("budget", [dict(kv_saving=0.5), dict(kv_saving=0.75, rank_allocation="adaptive"),
                                    dict(kv_saving=0.9), dict(kv_lora_rank=1, rope_dim=0),
                                    dict(kv_lora_rank=3, rope_dim=2, rank_allocation="adaptive")])
def test_smaller_budgets_are_finite_and_sized(tmp_path, arch, kv, budget, tokens):
    hf, path = save_tiny(tmp_path, arch, kv)
    source = load(path).model
    mla, summary = convert(source, calib_tokens(), options(**budget))
    full = 2 * kv * source.config.head_dim
    if "kv_saving" in budget:
        expected = round((1 - budget["kv_saving"]) * full)
    else:
        expected = budget["kv_lora_rank"] + budget["rope_dim"]
    assert mla.config.kv_values_per_token_total() == expected * source.config.n_layers  # adaptive keeps the total
    assert summary.values_per_token_layer == expected
    with torch.no_grad():
        for mode in ("naive", "absorbed"):
            out = mla(tokens, options=ForwardOptions(mla_path=mode))
            assert torch.isfinite(out).all()
    # the result is a valid checkpoint that loads back to the same function
    saved = save_checkpoint(mla, tmp_path / "out")
    again = load(saved).model
    with torch.no_grad():
        assert torch.equal(again(tokens, options=ForwardOptions(mla_path="absorbed")), out)


def test_error_shrinks_with_the_budget(tmp_path, tokens, rel_err):
    hf, path = save_tiny(tmp_path, "llama", 2)
    source = load(path).model
    analysis = analyse(source, calib_tokens(1024), options())
    with torch.no_grad():
        ref = hf(tokens).logits
        errors = []
        for saving in (0.25, 0.75):
            mla, _ = convert_model(source, analysis, options(kv_saving=saving))
            errors.append(rel_err(mla(tokens), ref))
    assert errors[0] < errors[-1]


@pytest.mark.parametrize("budget,message", [
    (dict(kv_saving=-0.1), "larger than the original"),
    (dict(kv_saving=1.0), "below 1"),
    (dict(kv_lora_rank=60, rope_dim=8), "larger than the original"),
    (dict(kv_lora_rank=0, rope_dim=8), "too small to hold the RoPE key"),
    (dict(kv_saving=0.99, rope_dim=2), "too small to hold the RoPE key"),
    (dict(kv_lora_rank=4, rope_dim=3), "even"),
    (dict(kv_lora_rank=4, rope_dim=34), "exceeds the source's key dimensions"),
    (dict(kv_lora_rank=4), "needs --rope-dim"),
    (dict(kv_saving=0.5, kv_lora_rank=4, rope_dim=4), "not both"),
    (dict(rank_allocation="random"), "rank-allocation"),
])
def test_bad_budgets_are_explained(tmp_path, budget, message):
    _, path = save_tiny(tmp_path, "llama", 2)
    with pytest.raises(MlakitError, match=message):
        convert(load(path).model, calib_tokens(), options(**budget))


def test_mla_source_is_refused(tmp_path):
    _, path = save_tiny(tmp_path, "llama", 2)
    source = load(path).model
    mla, _ = convert(source, calib_tokens(), options(kv_saving=0.5))
    with pytest.raises(MlakitError, match="already an MLA"):
        convert(mla, calib_tokens(), options(kv_saving=0.5))


def test_summary_is_json(tmp_path):
    _, path = save_tiny(tmp_path, "qwen2", 2)
    _, summary = convert(load(path).model, calib_tokens(), options(kv_saving=0.5, rank_allocation="adaptive"))
    data = json.loads(json.dumps(summary.to_dict()))
    assert sum(data["ranks"]) == len(data["ranks"]) * (32 - data["rope_dim"])
    assert any("latent rank" in line for line in summary.lines())


def test_frequency_selection_patterns():
    from mlakit.convert.ranks import select_frequencies

    score = torch.zeros(8, 3, dtype=torch.float64)  # [d/2 frequencies, G components]
    score[:, 0] = torch.tensor([0.1, 5, 0.2, 4, 0.3, 3, 0.4, 0.5])
    score[1, 1] = 4.5  # a second component of frequency 1 beats everything but its first
    assert select_frequencies(score, 3, "free") == [0, 2, 0, 1, 0, 0, 0, 0]
    # one component per frequency, on an arithmetic progression: 1, 3, 5 (brute force over all of them)
    best, best_idx = -1.0, None
    for step in range(1, 8):
        for start in range(8):
            idx = [start + k * step for k in range(3)]
            if idx[-1] < 8 and score[idx, 0].sum() > best:
                best, best_idx = float(score[idx, 0].sum()), idx
    assert best_idx == [1, 3, 5]
    assert select_frequencies(score, 3, "deepseek") == [1 if i in best_idx else 0 for i in range(8)]
    with pytest.raises(MlakitError, match="at most 8 rotary pairs"):
        select_frequencies(score, 9, "deepseek")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_deepseek_frequencies_export_exactly(tmp_path, arch, tokens, rel_err):
    """``rope_frequencies="deepseek"``: the converted model's RoPE key is a stock DeepSeek-V3 RoPE
    (theta', linear factor), so transformers' own DeepseekV3ForCausalLM computes the same function."""
    transformers = pytest.importorskip("transformers")
    from mlakit.export import export_hf_deepseek

    _, path = save_tiny(tmp_path, arch, 2)
    source = load(path).model
    mla, summary = convert(source, calib_tokens(), options(kv_saving=0.75, rope_frequencies="deepseek"))
    idx = summary.rope_freq_indices
    assert len(set(idx)) == len(idx) == summary.rope_dim // 2
    assert len({b - a for a, b in zip(idx, idx[1:])}) <= 1  # an arithmetic progression
    export_hf_deepseek(mla, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32, **no_hub_kernels()).eval()
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, mla(tokens)) <= 1e-4


def test_spilled_statistics_give_the_same_model(tmp_path, tokens):
    """``spill_dir`` keeps one layer's statistics in memory at a time; the result is bit-identical."""
    _, path = save_tiny(tmp_path, "qwen2", 2)
    source = load(path).model
    spill = tmp_path / "spill"
    spill.mkdir()
    in_memory, _ = convert(source, calib_tokens(), options(kv_saving=0.5, rank_allocation="adaptive"))
    spilled, _ = convert(source, calib_tokens(), options(kv_saving=0.5, rank_allocation="adaptive",
                                                         spill_dir=str(spill)))
    assert len(list(spill.glob("stats*.pt"))) == len(list(spill.glob("spectrum*.pt"))) == source.config.n_layers
    with torch.no_grad():
        assert torch.equal(in_memory(tokens), spilled(tokens))


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_spill_file_swapped_for_a_pickle_runs_no_code(tmp_path):
    """The spill directory's files are read with weights_only=True: one replaced between the write
    and the read by a pickle that would run code is refused, and the code does not run."""
    import pickle

    from mlakit.convert.calibrate import LayerStats, LayerStore

    store = LayerStore(tmp_path, prefix="stats")
    stats = LayerStats(sigma=torch.eye(3, dtype=torch.float64), dist=torch.ones(2, 4) / 4, tokens=7)
    store.append(stats)
    back = store[0]
    assert isinstance(back, LayerStats) and back.tokens == 7 and back.sigma_attn is None
    assert torch.equal(back.sigma, stats.sigma) and torch.equal(back.dist, stats.dist)
    marker = tmp_path / "code-ran.txt"
    torch.save(_Planted(str(marker)), tmp_path / "stats0.pt", pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        store[0]
    assert not marker.exists()
