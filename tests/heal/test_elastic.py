"""Elastic latent rank: truncation against a model with the dropped latent columns zeroed
(an independent construction), and the training mask against truncation."""

import pytest
import torch

from heal.helpers import VOCAB, mla_config, random_model
from mlakit import MlakitError, Transformer
from mlakit.elastic import truncate_latent_rank
from mlakit.heal.elastic import LatentMask, elastic_choices, parse_ranks, sample_rank
from mlakit.options import ForwardOptions

CASES = [
    dict(rank=12, rope=4, nope=8, v=8),
    dict(rank=[6, 16], rope=4, nope=0, v=8, bias=True),  # per-layer ranks, no NoPE part, biases
    dict(rank=10, rope=0, nope=8, v=6, q_lora=12),  # no RoPE key, low-rank queries
]


def zeroed_columns(model: Transformer, rank: int) -> Transformer:
    """The full-size model with the wkv_b columns of latent channels >= rank zeroed:
    mathematically the truncated model, built without slicing anything."""
    copy = Transformer(model.config).to(model.dtype)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in copy.layers:
            layer.attention.wkv_b.weight[:, rank:] = 0
    return copy.eval()


@pytest.mark.parametrize("case", CASES, ids=["uniform", "per-layer", "q-lora"])
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_truncation_equals_zeroed_latent_columns(case, mode):
    model = random_model(mla_config(**case), dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    for rank in (1, 5, 8, 100):
        small = truncate_latent_rank(model, rank)
        expected = [min(rank, r) for r in model.config.kv_lora_ranks()]
        assert small.config.kv_lora_ranks() == expected
        assert [layer.attention.wkv_a.out_features for layer in small.layers] == [
            r + model.config.qk_rope_head_dim for r in expected]
        reference = zeroed_columns(model, rank)
        options = ForwardOptions(mla_path=mode)
        with torch.no_grad():
            torch.testing.assert_close(small(tokens, options=options), reference(tokens, options=options),
                                       rtol=1e-12, atol=1e-12)


def test_truncation_keeps_the_rope_rows_and_the_cache_shrinks():
    model = random_model(mla_config(rank=12, rope=4))
    small = truncate_latent_rank(model, 5)
    for big, little in zip(model.layers, small.layers):
        assert torch.equal(little.attention.wkv_a.weight[5:], big.attention.wkv_a.weight[12:])  # RoPE rows
        assert torch.equal(little.attention.wkv_a.weight[:5], big.attention.wkv_a.weight[:5])
        assert torch.equal(little.attention.wkv_b.weight, big.attention.wkv_b.weight[:, :5])
    assert small.config.kv_values_per_token_total() == 2 * (5 + 4)
    assert model.config.kv_lora_rank == 12  # the original is left alone


@pytest.mark.parametrize("case", CASES, ids=["uniform", "per-layer", "q-lora"])
def test_mask_equals_truncation_exactly(case):
    model = random_model(mla_config(**case), dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
        with LatentMask(model) as mask:
            for rank in (1, 4, 7, 12, 50):
                mask.rank = rank
                torch.testing.assert_close(model(tokens), truncate_latent_rank(model, rank)(tokens),
                                           rtol=1e-13, atol=1e-13)
            mask.rank = None
            assert torch.equal(model(tokens), full)
        mask.rank = 1
        assert torch.equal(model(tokens), full)  # removed: no effect any more


def test_mask_passes_gradients_only_to_kept_channels():
    model = random_model(mla_config(rank=12))
    tokens = torch.randint(0, VOCAB, (1, 8))
    with LatentMask(model) as mask:
        mask.rank = 5
        model(tokens).square().sum().backward()
    grad = model.layers[0].attention.wkv_b.weight.grad
    assert grad[:, :5].abs().sum() > 0 and torch.equal(grad[:, 5:], torch.zeros_like(grad[:, 5:]))


def test_latent_norm_and_gqa_models_are_refused():
    with pytest.raises(MlakitError, match="latent norm"):
        truncate_latent_rank(random_model(mla_config(latent_norm=True)), 4)
    with pytest.raises(MlakitError, match="latent norm"):
        LatentMask(random_model(mla_config(latent_norm=True)))
    from heal.helpers import gqa_config

    with pytest.raises(MlakitError, match="needs an MLA model"):
        truncate_latent_rank(random_model(gqa_config()), 4)
    with pytest.raises(MlakitError, match=">= 1"):
        truncate_latent_rank(random_model(mla_config()), 0)


def test_elastic_choices_and_sampling():
    model = random_model(mla_config(rank=[6, 16]))
    assert elastic_choices(model) is None
    assert elastic_choices(model, [4, 16]) == [4, 16]
    assert elastic_choices(model, min_fraction=0.75) == [12, 13, 14, 15, 16]
    with pytest.raises(MlakitError, match="exceed"):
        elastic_choices(model, [4, 17])
    with pytest.raises(MlakitError, match="not both"):
        elastic_choices(model, [4], 0.5)
    assert parse_ranks("16, 4,8") == [4, 8, 16]
    with pytest.raises(MlakitError):
        parse_ranks("4,x")
    draws = [sample_rank([4, 8, 16], seed=0, step=s) for s in range(60)]
    assert draws == [sample_rank([4, 8, 16], seed=0, step=s) for s in range(60)]  # a pure function of the step
    assert set(draws) == {4, 8, 16}


def test_full_share_gives_the_full_rank_its_share_of_the_steps():
    choices = [4, 8, 12, 16]
    draws = [sample_rank(choices, seed=3, step=s, full_share=0.5) for s in range(2000)]
    assert draws == [sample_rank(choices, seed=3, step=s, full_share=0.5) for s in range(2000)]  # pure in (seed, step)
    assert 0.45 < draws.count(16) / len(draws) < 0.55
    for rank in (4, 8, 12):  # the rest uniform below the full rank
        assert 0.13 < draws.count(rank) / len(draws) < 0.2
    assert {sample_rank(choices, 0, s, full_share=1.0) for s in range(50)} == {16}
    assert {sample_rank(choices, 0, s, full_share=0.0) for s in range(200)} == {4, 8, 12}
    assert {sample_rank([8], 0, s, full_share=0.0) for s in range(5)} == {8}
    assert sample_rank([16, 4, 8], 1, 7, full_share=0.5) == sample_rank([4, 8, 16], 1, 7, full_share=0.5)


def test_heal_samples_with_the_full_share():
    from heal.helpers import perturbed, random_windows
    from mlakit.heal.distill import HealOptions, heal_model

    teacher = random_model(mla_config(rank=12))
    options = HealOptions(tokens=40 * 2 * 8, batch_size=2, seq_len=8, elastic_ranks=[4, 8, 12],
                          elastic_full_share=0.75, val_windows=0, progress=False)
    result = heal_model(perturbed(teacher), teacher, random_windows(10, 8), options, log=lambda *_: None)
    assert result.log["rank"] == [sample_rank([4, 8, 12], 0, s, 0.75) for s in range(40)]
    assert result.log["rank"].count(12) > 20
    with pytest.raises(MlakitError, match="full-share"):
        HealOptions(elastic_full_share=1.5).check()
