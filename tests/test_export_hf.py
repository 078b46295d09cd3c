"""Export to a stock DeepSeek-V3 HF directory: transformers' own DeepseekV3ForCausalLM
(no trust_remote_code) must compute mlakit's function on converted-model-like shapes."""

import argparse
import json

import pytest
import torch

from mlakit import checks  # noqa: E402
from mlakit import ModelConfig, Transformer
from mlakit.errors import MlakitError
from mlakit.export import export_hf_deepseek, to_deepseek
from mlakit.export import cli as export_cli
from mlakit.export.hf_deepseek import DELTA, mlakit_key_to_hf, rope_spec
from mlakit.loading import no_hub_kernels, save_checkpoint

transformers = pytest.importorskip("transformers")


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=3, n_kv_heads=3, head_dim=16, intermediate_size=64,
                attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                max_seq_len=64, norm_eps=1e-5, bos_token_id=1, eos_token_ids=[2])
    base.update(kw)
    return ModelConfig(**base)


CASES = {
    "plain": {},
    "eps1e-6": dict(norm_eps=1e-6),
    "tied": dict(tie_embeddings=True),
    "qwen2-bias": dict(qkv_bias=True),  # query bias -> q-LoRA of rank dim + 1; latent + rope-key bias
    "o-bias": dict(qkv_bias=True, o_bias=True, tie_embeddings=True),
    "q-lora-latent-norm": dict(q_lora_rank=12, latent_norm=True),
    "q-lora-bias": dict(q_lora_rank=12, qkv_bias=True),
    "per-layer-ranks": dict(kv_lora_rank=[4, 20]),
    "per-layer-ranks-norm": dict(kv_lora_rank=[4, 20], latent_norm=True),
    "nope0": dict(qk_nope_head_dim=0),
    "rope-every-other": dict(qk_rope_freq_indices=[0, 2, 4, 6]),
    "rope-shifted": dict(qk_rope_freq_indices=[1, 2, 3, 4]),  # needs a linear factor
    "rope-descending": dict(qk_rope_freq_indices=[7, 5, 3, 1]),
    "linear-scaled": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, qk_rope_freq_indices=[0, 1, 2, 3]),
    "no-rope": dict(qk_rope_head_dim=0),
}


def logits_pair(model, path, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path,
                                                           dtype=torch.float32, **no_hub_kernels()).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        return model(tokens), hf(tokens).logits, hf


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_matches_mlakit(tmp_path, rel_err, name):
    model = Transformer(mla(**CASES[name])).init_random(seed=1, std=0.2)
    if model.config.latent_norm or model.config.q_lora_rank:
        with torch.no_grad():  # norms that matter
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    form = export_hf_deepseek(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert checks.attention_kind(str(tmp_path / "out")) == "mla"
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] == 2
    assert config["rope_interleave"] is True and config["rms_norm_eps"] == 1e-6
    ours, theirs, hf = logits_pair(model, tmp_path / "out", tokens)
    assert not any("mlp.experts" in n or "mlp.gate." in n for n, _ in hf.named_parameters())
    assert rel_err(theirs, ours) <= 1e-4
    assert form.linearised_bound <= DELTA
    if name == "plain":  # cached decoding in transformers: same greedy tokens as mlakit
        from mlakit.engine import SamplingParams, generate

        prompt = tokens[0, :5].tolist()
        ours_ids = generate(model, [prompt], SamplingParams(max_new_tokens=12, greedy=True))[0]
        hf_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0].tolist()
        assert ours_ids[-12:] == hf_ids[len(prompt):]


@pytest.mark.parametrize("name", ["plain", "per-layer-ranks-norm", "rope-shifted", "no-rope"])
def test_cache_block_padding_is_exact(tmp_path, rel_err, name):
    """Latent and RoPE key padded with zero channels to multiples of 32 (llama.cpp's quantised
    cache blocks): the RoPE pairs added continue the frequency progression; logits unchanged."""
    model = Transformer(mla(**CASES[name])).init_random(seed=1, std=0.2)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    form = export_hf_deepseek(model, tmp_path / "out", cache_block=32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["kv_lora_rank"] % 32 == 0 and config["qk_rope_head_dim"] % 32 == 0
    assert any("multiples of 32" in note for note in form.notes)
    ours, theirs, _ = logits_pair(model, tmp_path / "out", tokens)
    assert rel_err(theirs, ours) <= 1e-4


def test_bfloat16_export_keeps_the_tiny_latent_weights(tmp_path, rel_err):
    model = Transformer(mla(qkv_bias=True)).init_random(seed=1, std=0.2)
    export_hf_deepseek(model, tmp_path / "bf16", dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16",
                                                           dtype=torch.float32, **no_hub_kernels()).eval()
    w = hf.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[:16]
    assert (w.abs() > 0).float().mean() > 0.99  # no underflow to zero
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model(tokens)) < 3e-2  # bf16 weight rounding only
    with pytest.raises(MlakitError, match="float16"):
        export_hf_deepseek(model, tmp_path / "f16", dtype="float16")


def test_key_map_is_the_loaders():
    assert mlakit_key_to_hf("layers.3.attention.wkv_a.bias") == "model.layers.3.self_attn.kv_a_proj_with_mqa.bias"
    assert mlakit_key_to_hf("tok_embeddings.weight") == "model.embed_tokens.weight"


def test_refusals(tmp_path):
    gqa = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                                  intermediate_size=64))
    with pytest.raises(MlakitError, match="MLA"):
        to_deepseek(gqa)
    with pytest.raises(MlakitError, match="arithmetic progression"):
        rope_spec(mla(qk_rope_freq_indices=[0, 1, 3, 7]))
    with pytest.raises(MlakitError, match="arithmetic progression"):
        rope_spec(mla(qk_rope_freq_indices=[0, 0, 1, 1]))  # repeats
    with pytest.raises(MlakitError, match="cannot represent"):  # Llama-3 scaling bends the frequency curve
        rope_spec(mla(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                      rope_theta=500000.0, qk_rope_freq_indices=[0, 2, 4, 6]))
    with pytest.raises(MlakitError, match="MLP biases"):
        to_deepseek(Transformer(mla(mlp_bias=True)))
    model = Transformer(mla()).init_random()
    (tmp_path / "exists").mkdir()
    with pytest.raises(MlakitError, match="already exists"):
        export_hf_deepseek(model, tmp_path / "exists")


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model = Transformer(mla()).init_random()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_hf_deepseek(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tmp_path, capsys, rel_err):
    model = Transformer(mla(qkv_bias=True, tie_embeddings=True)).init_random(seed=2, std=0.2)
    save_checkpoint(model, tmp_path / "ckpt")
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tmp_path / "ckpt"), "--format", "hf-deepseek", "-o",
                              str(tmp_path / "hf"), "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "hf-deepseek" and summary["bytes"] > 0
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    ours, theirs, _ = logits_pair(model, tmp_path / "hf", tokens)
    assert rel_err(theirs, ours) <= 1e-4
    with pytest.raises(MlakitError, match="already exists"):
        args.func(args)
    args = parser.parse_args(["export", str(tmp_path / "ckpt"), "--format", "gguf", "-o", str(tmp_path / "x.gguf")])
    with pytest.raises(MlakitError, match="bias"):
        args.func(args)
