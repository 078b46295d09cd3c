"""MLA: naive == absorbed, and both against transformers' DeepseekV3 (an independent implementation)."""

import random

import pytest
import torch

import mlakit.loading as loading
from mlakit import ModelConfig, Transformer
from mlakit.attention import MLAttention
from mlakit.options import ABSORBED, NAIVE, ForwardOptions


def mla_config(n_heads=9, rank=16, rope=8, nope=12, v=10, q_lora=None, latent_norm=False, bias=False,
               n_layers=2, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=97, dim=48, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                       head_dim=16, intermediate_size=64, attention="mla", kv_lora_rank=rank,
                       qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=v, q_lora_rank=q_lora,
                       latent_norm=latent_norm, qkv_bias=bias, o_bias=bias, max_seq_len=64, **kw)


def random_cases(n=12, seed=0):
    rng = random.Random(seed)
    cases = [
        dict(n_heads=9, rank=16, rope=8, nope=0, v=8),  # qk_nope_head_dim = 0
        dict(n_heads=9, rank=2, rope=2, nope=4, v=3),  # tiny ranks
        dict(n_heads=1, rank=5, rope=0, nope=6, v=4),  # no RoPE key, one head
        dict(n_heads=4, rank=24, rope=16, nope=16, v=16, q_lora=12, latent_norm=True, bias=True),
        dict(n_heads=3, rank=[4, 20], rope=6, nope=5, v=7),  # per-layer ranks
    ]
    for _ in range(n - len(cases)):
        cases.append(dict(n_heads=rng.choice([1, 2, 3, 5, 9]), rank=rng.randint(1, 40),
                          rope=2 * rng.randint(0, 8), nope=rng.randint(1, 20), v=rng.randint(1, 20),
                          q_lora=rng.choice([None, rng.randint(2, 30)]), latent_norm=rng.random() < 0.5,
                          bias=rng.random() < 0.5))
    return cases


@pytest.mark.parametrize("case", random_cases(), ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_naive_and_absorbed_agree(case, dtype, tol, rel_err, device):
    model = Transformer(mla_config(**case)).init_random(seed=1, std=0.2).to(device, dtype)
    tokens = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        naive = model(tokens, options=NAIVE)
        absorbed = model(tokens, options=ABSORBED)
        # absorbed decoding from the latent cache, after a naive prefill
        cache = model.new_cache(3, 16)
        prefill = model(tokens[:, :6], cache=cache, options=NAIVE)
        steps = [model(tokens[:, i:i + 1], torch.full((3, 1), i, device=device), cache, ABSORBED)
                 for i in range(6, 13)]
    assert torch.isfinite(naive).all()
    assert rel_err(absorbed, naive) <= tol
    assert rel_err(torch.cat([prefill, *steps], 1), naive) <= tol


def test_latent_cache_holds_nothing_per_head():
    config = mla_config(n_heads=9, rank=16, rope=8)
    model = Transformer(config)
    cache = model.new_cache(2, 32, dtype=torch.bfloat16)
    layer = cache.layers[0]
    assert tuple(layer.kv.shape) == (2, 32, 16 + 8)
    assert layer.bytes_per_token() == (16 + 8) * 2
    assert cache.bytes_per_token() == 2 * (16 + 8) * 2  # two layers
    assert config.kv_values_per_token(0) == 24


def test_mla_path_is_checked():
    with pytest.raises(ValueError, match="naive"):
        ForwardOptions(mla_path="fast")


def tiny_deepseek(tmp_path, q_lora_rank, rope_interleave, seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=9, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, rope_interleave=rope_interleave,
        max_position_embeddings=64, rope_theta=1000.0, tie_word_embeddings=False, rms_norm_eps=1e-6,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    path = tmp_path / f"deepseek-{q_lora_rank}-{rope_interleave}"
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("q_lora_rank", [None, 20])
@pytest.mark.parametrize("rope_interleave", [False, True])
@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_matches_transformers_deepseek_v3(tmp_path, rel_err, device, q_lora_rank, rope_interleave, mode):
    hf_model, path = tiny_deepseek(tmp_path, q_lora_rank, rope_interleave)
    hf_model = hf_model.to(device)
    model = loading.load(path, device=device).model
    assert model.config.is_mla and model.config.latent_norm
    options = ForwardOptions(mla_path=mode)
    tokens = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        out = model(tokens, options=options)
        cache = model.new_cache(2, 32)
        steps = [model(tokens[:, i:i + 1], torch.full((2, 1), i, device=device), cache, options)
                 for i in range(21)]
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(torch.cat(steps, 1), ref) <= 1e-5


def test_deepseek_with_moe_layers_is_refused(tmp_path):
    import json

    _, path = tiny_deepseek(tmp_path, None, False)
    config = json.loads((path / "config.json").read_text())
    config["first_k_dense_replace"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(loading.MlakitError, match="MoE"):
        loading.load(path)


@pytest.mark.parametrize("length,lengths", [(1024, [1, 300, 1024]), (96, [5, 96, 40]), (512, [256, 257, 511])])
def test_split_decode_math_equals_sdpa(length, lengths, rel_err):
    """The compiled decode step's split-KV attention equals SDPA with the same mask (float64),
    for caches cut into several splits, one split, and sequences ending on a split's edge."""
    from mlakit.attention import _decode_attention_math

    gen = torch.Generator().manual_seed(0)
    b, kv_h, g, d = len(lengths), 2, 3, 16
    q = torch.randn(b, kv_h, g, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, kv_h, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, kv_h, length, d, generator=gen, dtype=torch.float64)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None])[:, None, None]  # [b, 1, 1, L]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert rel_err(_decode_attention_math(q, k, v, mask, 0.3), ref) <= 1e-12
