"""The generation engine: static cache, CUDA-graph decode equals eager decode."""

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit.engine import Engine

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(attention: str) -> Transformer:
    shape = dict(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, intermediate_size=96,
                 max_seq_len=128)
    if attention == "mla":
        shape.update(attention="mla", kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    return Transformer(ModelConfig(**shape)).init_random(seed=0, std=0.2)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_engine_decode_equals_full_forward(attention, rel_err):
    model = tiny(attention)
    tokens = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens)  # [3, 20, vocab], naive path for MLA
    engine = Engine(model, batch=3, max_len=32)
    lengths = torch.tensor([5, 9, 7])
    prefill = engine.prefill(torch.where(torch.arange(9) < lengths[:, None], tokens[:, :9], 0), lengths)
    assert rel_err(prefill, ref[torch.arange(3), lengths - 1]) <= 1e-5
    positions = lengths.clone()
    for _ in range(8):
        logits = engine.decode(tokens[torch.arange(3), positions], positions)
        assert rel_err(logits, ref[torch.arange(3), positions]) <= 1e-5
        positions += 1


@cuda
@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_graph_decode_equals_eager_and_captures_once(attention, dtype, tol, rel_err):
    model = tiny(attention).to("cuda", dtype)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(2)).cuda()
    lengths = torch.tensor([5, 9, 7], device="cuda")
    prompts = torch.where(torch.arange(9, device="cuda") < lengths[:, None], tokens[:, :9], 0)
    graphed, eager = Engine(model, 3, 64, cuda_graph=True), Engine(model, 3, 64, cuda_graph=False)
    graphed.prefill(prompts, lengths)
    eager.prefill(prompts, lengths)
    positions = lengths.clone()
    graph = None
    for step in range(30):
        step_tokens = tokens[torch.arange(3, device="cuda"), positions]
        out_graph = graphed.decode(step_tokens, positions).clone()
        out_eager = eager.decode(step_tokens, positions)
        assert rel_err(out_graph, out_eager) <= tol
        graph = graph or graphed._graph
        assert graphed._graph is graph  # captured once; positions advance without a new capture
        positions += 1
