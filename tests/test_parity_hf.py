"""mlakit's Llama-family model against transformers' own classes."""

import pytest
import torch

import mlakit.loading as loading
from mlakit.testing.models import save_tiny

pytest.importorskip("transformers")

CASES = [
    ("llama", 6), ("llama", 2), ("llama", 1),
    ("mistral", 6), ("mistral", 3),
    ("qwen2", 6), ("qwen2", 2),
]


@pytest.mark.parametrize("arch,n_kv_heads", CASES)
def test_logits_match_transformers(tmp_path, rel_err, device, arch, n_kv_heads):
    hf_model, path = save_tiny(tmp_path, arch, n_kv_heads)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    tokens = torch.randint(0, 211, (2, 37), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        out = model(tokens)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("extra", [
    dict(tie_word_embeddings=True),
    dict(attention_bias=True, mlp_bias=True),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, rope_theta=50000.0),
    dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
])
def test_llama_variants_match_transformers(tmp_path, rel_err, device, extra):
    hf_model, path = save_tiny(tmp_path, "llama", 2, **extra)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    tokens = torch.randint(0, 211, (2, 200), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        out = model(tokens)
    assert rel_err(out, ref) <= 1e-5


def test_mistral_sliding_window_matches_transformers(tmp_path, rel_err, device):
    hf_model, path = save_tiny(tmp_path, "mistral", 2, sliding_window=8)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    assert model.config.sliding_window == 8
    tokens = torch.randint(0, 211, (1, 40), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        out = model(tokens)
        # and with the cache, token by token
        cache = model.new_cache(1, 40)
        steps = [model(tokens[:, i:i + 1], torch.tensor([[i]], device=device), cache) for i in range(40)]
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(torch.cat(steps, 1), ref) <= 1e-5


@pytest.mark.parametrize("arch,n_kv_heads", [("llama", 2), ("qwen2", 6)])
def test_incremental_decoding_equals_full_forward(tmp_path, rel_err, device, arch, n_kv_heads):
    hf_model, path = save_tiny(tmp_path, arch, n_kv_heads)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    tokens = torch.randint(0, 211, (2, 24), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        cache = model.new_cache(2, 32)
        prefill = model(tokens[:, :10], cache=cache)  # chunk, then one token at a time
        steps = [model(tokens[:, i:i + 1], torch.full((2, 1), i, device=device), cache) for i in range(10, 24)]
    assert rel_err(torch.cat([prefill, *steps], 1), ref) <= 1e-5
    assert cache.lengths.tolist() == [24, 24]


def test_ragged_batch_equals_one_by_one(tmp_path, rel_err, device):
    hf_model, path = save_tiny(tmp_path, "llama", 2)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 211, (n,), generator=gen) for n in (5, 17, 11)]
    batch = torch.zeros(3, 17, dtype=torch.long)  # right-padded
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = p
    batch, prompts = batch.to(device), [p.to(device) for p in prompts]
    with torch.no_grad():
        batched = model(batch)
        for i, p in enumerate(prompts):
            ref = hf_model(p[None]).logits[0]
            assert rel_err(batched[i, : len(p)], ref) <= 1e-5


def test_unknown_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = save_tiny(tmp_path, "llama", 2)
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, path / "model.safetensors")
    with pytest.raises(loading.MlakitError, match="unknown tensor"):
        loading.load(path)


def test_unsupported_architecture_is_named(tmp_path):
    import json

    _, path = save_tiny(tmp_path, "llama", 2)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(loading.MlakitError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        loading.load(path)
