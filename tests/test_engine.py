"""The generation engine: static cache, CUDA-graph decode equals eager decode."""

import shutil

import pytest
import torch

from mlakit import ModelConfig, Transformer
from mlakit.engine import Engine
from mlakit.options import ABSORBED

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
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graph_decode_equals_eager_and_captures_once(attention, dtype, tol, compile, rel_err):
    """The CUDA-graph step (optionally with inductor-compiled blocks) == the eager step.
    In bf16 the compiled step rounds in other places than the eager one, and the two
    caches drift apart: there both are compared to a float32 run of the same weights and
    the graph's error may be at most twice the eager one's (plus bf16 noise)."""
    model = tiny(attention).to("cuda", dtype)
    reference = tiny(attention).to("cuda") if dtype != torch.float32 else None  # same seed: same weights
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(2)).cuda()
    lengths = torch.tensor([5, 9, 7], device="cuda")
    prompts = torch.where(torch.arange(9, device="cuda") < lengths[:, None], tokens[:, :9], 0)
    graphed, eager = Engine(model, 3, 64, cuda_graph=True, compile=compile), Engine(model, 3, 64, cuda_graph=False)
    graphed.prefill(prompts, lengths)
    eager.prefill(prompts, lengths)
    if reference is not None:
        exact = Engine(reference, 3, 64, cuda_graph=False)
        exact.prefill(prompts, lengths)
    positions = lengths.clone()
    for step in range(30):
        step_tokens = tokens[torch.arange(3, device="cuda"), positions]
        out_graph = graphed.decode(step_tokens, positions).clone()
        out_eager = eager.decode(step_tokens, positions)
        if reference is None:
            assert rel_err(out_graph, out_eager) <= tol
        else:
            out_exact = exact.decode(step_tokens, positions)
            assert rel_err(out_graph, out_exact) <= 2 * rel_err(out_eager, out_exact) + tol / 2
        assert list(graphed._graphs) == [64]  # captured once; positions advance without a new capture
        positions += 1


def test_span_buckets():
    engine = Engine(tiny("gqa"), 2, 100)
    assert [engine.span_bucket(s) for s in (None, 1, 100)] == [100, 100, 100]  # never above max_len
    engine.max_len = 1000
    assert [engine.span_bucket(s) for s in (1, 128, 129, 256, 257, 600, 1000)] == [128, 128, 256, 256, 512, 1000,
                                                                                  1000]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("cuda_graph", [False, pytest.param(True, marks=cuda)])
def test_decode_over_a_span_equals_the_whole_cache(attention, cuda_graph, rel_err, monkeypatch):
    """A step told how far the sequences reach (``span``) attends over fewer cache slots
    (CUDA graphs: one graph per span bucket) and gives the logits of a step over the
    whole cache; the spans cross two buckets here."""
    from mlakit import engine as engine_module

    device = "cuda" if cuda_graph else "cpu"
    model = tiny(attention).to(device)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(5)).to(device)
    lengths = torch.tensor([5, 9, 7], device=device)
    prompts = torch.where(torch.arange(9, device=device) < lengths[:, None], tokens[:, :9], 0)
    spanned, whole = Engine(model, 3, 64, cuda_graph=cuda_graph), Engine(model, 3, 64, cuda_graph=False)
    spanned.prefill(prompts, lengths)
    whole.prefill(prompts, lengths)
    positions = lengths.clone()
    monkeypatch.setattr(engine_module, "SPAN_BUCKET_MIN", 16)  # buckets 16, 32, 64 for this short cache
    for step in range(25):  # furthest position 9 .. 33: spans 10 .. 34
        step_tokens = tokens[torch.arange(3, device=device), positions]
        got = spanned.decode(step_tokens, positions, span=9 + step + 1).clone()
        ref = whole.model(step_tokens[:, None], positions[:, None], whole.cache, ABSORBED, kv_len=64)[:, -1]
        assert rel_err(got, ref) <= 1e-5
        positions += 1
    if cuda_graph:
        assert sorted(spanned._graphs) == [16, 32, 64]


def _decode_logits(engine: Engine, tokens: torch.Tensor, lengths: torch.Tensor, steps: int) -> list[torch.Tensor]:
    b = tokens.shape[0]
    engine.prefill(torch.where(torch.arange(9) < lengths[:, None], tokens[:, :9], 0), lengths)
    positions, out = lengths.clone(), []
    for _ in range(steps):
        out.append(engine.decode(tokens[torch.arange(b), positions], positions).clone())
        positions += 1
    return out


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_compiled_decode_equals_eager_without_recompiles(attention, rel_err):
    """The engine's compiled decode step (regional torch.compile of the blocks; the
    aot_eager backend here, so no C++ toolchain is needed) gives the eager step's
    logits, compiles once per block graph, and never recompiles as positions advance
    or for another engine of another batch size and length."""
    from torch._dynamo.utils import counters

    model = tiny(attention)
    tokens = torch.randint(0, 101, (3, 30), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([5, 9, 7])
    eager = _decode_logits(Engine(model, 3, 32), tokens, lengths, 10)
    torch._dynamo.reset()
    counters.clear()
    compiled = _decode_logits(Engine(model, 3, 32, compile=True, compile_backend="aot_eager"), tokens, lengths, 4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled += _decode_logits(Engine(model, 3, 32, compile=True, compile_backend="aot_eager"), tokens, lengths, 10)[4:]
    for got, ref in zip(compiled, eager):
        assert rel_err(got, ref) <= 1e-5
    # another batch and cache length: the same graph (batch and length are symbolic)
    _decode_logits(Engine(model, 2, 40, compile=True, compile_backend="aot_eager"), tokens[:2], lengths[:2], 3)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor on the CPU needs a C++ compiler")
def test_inductor_compiled_mla_decode_equals_eager(rel_err):
    """The real compiler (inductor) around the MLA custom ops (rope_append, mla_decode):
    their fake kernels must describe the real outputs for the compiled code to run."""
    model = tiny("mla")
    tokens = torch.randint(0, 101, (3, 30), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([5, 9, 7])
    eager = _decode_logits(Engine(model, 3, 32), tokens, lengths, 4)
    compiled = _decode_logits(Engine(model, 3, 32, compile=True), tokens, lengths, 4)
    for got, ref in zip(compiled, eager):
        assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("attention", ["gqa", "mla", "mla-qlora-bias"])
def test_fuse_projections_keeps_logits_and_state_dict(attention, rel_err):
    """Fused input projections give the same logits, share the weights (no copy, same
    state dict), follow in-place weight updates, and are rebuilt after a cast."""
    from mlakit.speed import fuse_projections

    if attention == "mla-qlora-bias":
        shape = dict(vocab_size=101, dim=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=16, intermediate_size=96,
                     max_seq_len=128, attention="mla", kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                     v_head_dim=16, q_lora_rank=24, qkv_bias=True)
        model = Transformer(ModelConfig(**shape)).init_random(seed=0, std=0.2)
    else:
        model = tiny(attention)
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(tokens)
        keys = {k: v.clone() for k, v in model.state_dict().items()}
        params = sum(p.numel() for p in model.parameters())
        fuse_projections(model)
        assert rel_err(model(tokens), ref) <= 1e-6
        assert model.state_dict().keys() == keys.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
        assert sum(p.numel() for p in model.parameters()) == params
        block = model.layers[0]
        assert block.feed_forward.fused_input is not None and block.attention.fused_input is not None
        # an in-place update of a layer's weight reaches the fused matmul
        model.layers[1].feed_forward.w3.weight.mul_(0.5)
        fused_half = model(tokens)
        model.layers[1].feed_forward.fused_input = None  # the unfused reference for the same weights
        unfused_half = model(tokens)
        assert rel_err(unfused_half, ref) > 1e-3 and rel_err(fused_half, unfused_half) <= 1e-6
        fuse_projections(model)
        model.double()  # a cast breaks the sharing: fusing again follows it
        fuse_projections(model)
        assert rel_err(model(tokens), unfused_half.double()) <= 1e-6


def test_generate_fast_mode_gives_the_same_greedy_tokens(monkeypatch):
    """``generate(..., compile=True)`` (what ``mlakit generate --compile`` runs): same
    greedy tokens as the plain engine (aot_eager here: no C++ toolchain needed)."""
    import mlakit.engine as engine_module
    from mlakit.engine import SamplingParams, generate

    compiled = engine_module.compiled_block_call
    monkeypatch.setattr(engine_module, "compiled_block_call",
                        lambda backend="inductor", dynamic=True: compiled("aot_eager", dynamic))
    model = tiny("mla")
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    params = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=[])
    plain = generate(model, prompts, params)
    fast = generate(model, prompts, params, compile=True)
    assert fast == plain and all(len(out) == 12 for out in fast)


def test_absorbed_prefill_equals_naive_prefill(rel_err):
    """``prefill_mode="absorbed"`` (the prompt through the absorbed decode kernel, causal
    within the chunk) gives the naive prefill's logits, and decoding goes on the same."""
    model = tiny("mla")
    tokens = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([5, 9, 7])
    prompts = torch.where(torch.arange(9) < lengths[:, None], tokens[:, :9], 0)
    naive, absorbed = Engine(model, 3, 32), Engine(model, 3, 32, prefill_mode="absorbed")
    assert rel_err(absorbed.prefill(prompts, lengths), naive.prefill(prompts, lengths)) <= 1e-5
    positions = lengths.clone()
    for _ in range(3):
        step = tokens[torch.arange(3), positions]
        assert rel_err(absorbed.decode(step, positions), naive.decode(step, positions)) <= 1e-5
        positions += 1
