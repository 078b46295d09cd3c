"""Top-k sparse attention and per-sequence latent ranks through the model and the engine
(tiny random MLA models; the kernels' own tests are tests/kernels/test_mla_sparse.py)."""

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit.elastic import truncate_latent_rank
from mlakit.engine import Engine, SamplingParams, generate_batch
from mlakit.options import ForwardOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mla(seed: int = 0) -> Transformer:
    config = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=16,
                         intermediate_size=96, max_seq_len=160, attention="mla", kv_lora_rank=32,
                         qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    return Transformer(config).init_random(seed=seed, std=0.2)


def _tokens(b, s, seed=1):
    return torch.randint(0, 101, (b, s), generator=torch.Generator().manual_seed(seed))


def _decode_logits(model, options, prompts_len=(40, 25), steps=6):
    """Right-padded prefill then ``steps`` decode steps; logits [steps, b, vocab]."""
    tokens = _tokens(len(prompts_len), max(prompts_len) + steps)
    lengths = torch.tensor(prompts_len)
    engine = Engine(model, len(prompts_len), max(prompts_len) + steps, options=options)
    engine.prefill(torch.where(torch.arange(max(prompts_len)) < lengths[:, None], tokens[:, :max(prompts_len)], 0),
                   lengths)
    positions, out = lengths.clone(), []
    for _ in range(steps):
        out.append(engine.decode(tokens[torch.arange(len(prompts_len)), positions], positions).clone())
        positions += 1
    return torch.stack(out)


@pytest.mark.parametrize("kernels", [True, False])
def test_sparse_decode_is_dense_when_k_covers_the_context(kernels, rel_err):
    model = tiny_mla()
    with torch.no_grad():
        dense = _decode_logits(model, ForwardOptions(kernels=kernels))
        sparse = _decode_logits(model, ForwardOptions(kernels=kernels, sparse_topk=64, sparse_window=0,
                                                      sparse_sink=0, sparse_index_rank=4))
    assert rel_err(sparse, dense) <= 1e-6


def test_sparse_decode_kernel_path_equals_masked_reference_path(rel_err):
    """The decode path (mla_sparse_decode) and the masked dense path select the same slots."""
    model = tiny_mla()
    opts = dict(sparse_topk=6, sparse_window=3, sparse_sink=2, sparse_index_rank=8)
    with torch.no_grad():
        fast = _decode_logits(model, ForwardOptions(kernels=True, **opts))
        masked = _decode_logits(model, ForwardOptions(kernels=False, **opts))
        dense = _decode_logits(model, ForwardOptions(kernels=True))
    assert rel_err(fast, masked) <= 1e-5
    assert rel_err(fast, dense) > 1e-3  # the selection does matter at this k


def test_sparse_window_forward_error_shrinks_as_k_grows():
    model = tiny_mla()
    tokens = _tokens(2, 120)
    with torch.no_grad():
        dense = model(tokens).double()
        errors = []
        for k in (4, 16, 48, 120):
            for path in ("naive", "absorbed"):
                options = ForwardOptions(mla_path=path, sparse_topk=k, sparse_window=4, sparse_sink=2,
                                         sparse_index_rank=16)
                sparse = model(tokens, options=options).double()
                if path == "naive":
                    errors.append(float((sparse - dense).norm() / dense.norm()))
                else:  # the two MLA forms select alike
                    assert float((sparse - naive).norm() / naive.norm()) <= 1e-5
                naive = sparse
    assert errors[0] > errors[1] > errors[2] and errors[3] <= 1e-6, errors


def test_options_reject_bad_sparse_settings():
    with pytest.raises(ValueError, match="sparse_topk"):
        ForwardOptions(sparse_topk=0)
    with pytest.raises(ValueError, match="sparse_window"):
        ForwardOptions(sparse_topk=8, sparse_window=-1)


def test_mixed_rank_batch_matches_truncated_models():
    """Each sequence at its own runtime rank == that rank's truncated model alone."""
    model = tiny_mla(seed=3)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21]]
    ranks = [8, 32, 16]
    params = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=[])
    with torch.no_grad():
        mixed, counts = generate_batch(model, prompts, params,
                                       options=ForwardOptions(latent_ranks=torch.tensor(ranks)))
        for i, (prompt, rank) in enumerate(zip(prompts, ranks)):
            alone, _ = generate_batch(truncate_latent_rank(model, rank), [prompt], params)
            assert mixed[i].tolist() == alone[0].tolist(), (rank, mixed[i].tolist(), alone[0].tolist())
        full, _ = generate_batch(model, prompts, params)
    assert mixed[1].tolist() == full[1].tolist()  # rank 32 = the model's full rank
    assert mixed[0].tolist() != full[0].tolist()  # rank 8 does change this random model


def test_mixed_rank_logits_match_truncated_model(rel_err):
    model = tiny_mla(seed=3)
    tokens = _tokens(2, 30)
    with torch.no_grad():
        mixed = model(tokens, options=ForwardOptions(latent_ranks=torch.tensor([12, 32])))
        alone = truncate_latent_rank(model, 12)(tokens[:1])
    assert rel_err(mixed[:1], alone) <= 1e-6
    assert rel_err(mixed[1:], model(tokens[1:])) <= 1e-6


def test_engine_set_latent_ranks_checks_its_input():
    model = tiny_mla()
    with pytest.raises(ValueError, match="full rank"):
        Engine(model, 2, 16).set_latent_ranks([4, 4])
    engine = Engine(model, 2, 16, options=ForwardOptions(latent_ranks=torch.tensor([4, 8])))
    with pytest.raises(ValueError, match="one rank >= 1 per sequence"):
        engine.set_latent_ranks([4])
