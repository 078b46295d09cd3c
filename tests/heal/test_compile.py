"""Speed options that must not change the math: regional torch.compile (blocks of student
and teacher, the KL of a chunk) and the elastic mask under compile (no recompiles per rank).
CPU backends only ("aot_eager", or a counting eager backend): no C++ compiler needed."""

import pytest
import torch

from heal.helpers import VOCAB, gqa_config, mla_config, random_model, random_windows
from mlakit.heal.distill import HealOptions, forward_hidden, heal_model
from mlakit.speed import compiled_block_call
from mlakit.elastic import truncate_latent_rank
from mlakit.heal.elastic import LatentMask

pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """An eager backend that counts the graphs it is handed."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_training_matches_eager():
    teacher = random_model(gqa_config(n_layers=1))
    windows = random_windows(8, 16)
    losses, weights = {}, {}
    for compiled in (False, True):
        student = random_model(mla_config(n_layers=1), seed=1)
        options = HealOptions(tokens=2 * 4 * 16, batch_size=4, seq_len=16, lr=3e-3, val_windows=0, train="all",
                              progress=False, compile=compiled, compile_backend="aot_eager")
        result = heal_model(student, teacher, windows, options, log=lambda *_: None)
        losses[compiled], weights[compiled] = result.log["loss"], student.state_dict()
        # compiling changes no module: the models come back as plain modules
        assert all(layer._compiled_call_impl is None for layer in [*student.layers, *teacher.layers])
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-6)


def test_elastic_mask_under_compile_needs_no_recompile_per_rank():
    model = random_model(mla_config(rank=12, n_layers=2))
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    backend = CountingBackend()
    with torch.no_grad(), LatentMask(model) as mask:
        block_fn = compiled_block_call(backend, dynamic=None)
        for rank in (4, 7, 12, 3):
            mask.rank = rank
            hidden, _ = forward_hidden(model, tokens, block_fn=block_fn)
            torch.testing.assert_close(model.head(hidden), truncate_latent_rank(model, rank)(tokens),
                                       rtol=1e-5, atol=1e-5)
        graphs_masked = backend.graphs
        mask.rank = None
        hidden, _ = forward_hidden(model, tokens, block_fn=block_fn)
    assert graphs_masked == 1 and backend.graphs == 2  # one graph for every rank (both blocks), one unmasked
    torch.testing.assert_close(model.head(hidden), model(tokens), rtol=1e-5, atol=1e-5)
