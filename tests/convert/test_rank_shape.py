"""`mlakit convert --rank-shape vllm`: kv_lora_rank 512 or 256 with a 64-dim RoPE key in every
layer (the head sizes 576 / 320 vLLM's MLA backends take), exported to a stock DeepSeek-V3
directory that transformers loads as DeepseekV3ForCausalLM with mlakit's logits."""

import json

import pytest
import torch

from mlakit.config import PRESETS, ModelConfig
from mlakit.convert.api import ConvertOptions, resolve_budget
from mlakit.errors import MlakitError
from mlakit.loading import no_hub_kernels


def gqa(n_kv_heads: int, head_dim: int) -> ModelConfig:
    return ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=32, n_kv_heads=n_kv_heads, head_dim=head_dim,
                       intermediate_size=160)


@pytest.mark.parametrize("config,rank,expected", [
    (gqa(8, 64), None, 512),  # cache 1024 values/token/layer: 576 saves 44%
    (gqa(8, 64), 256, 256),  # 320 asked for: saves 69%
    (PRESETS["smollm2-135m"], None, 256),  # the default model: 384 values; only 320 saves (17%)
    (PRESETS["llama3-8b"], None, 512),  # 2048 values: 576 saves 72%
])
def test_vllm_budget_picks_the_shape_that_saves(config, rank, expected):
    budget = resolve_budget(config, ConvertOptions(rank_shape="vllm", kv_lora_rank=rank))
    assert (budget.rank, budget.rope_dim) == (expected, 64)


@pytest.mark.parametrize("config,rank,message", [
    (gqa(2, 64), None, "save nothing against this model's cache of 256"),
    (gqa(4, 64), 512, "save nothing against this model's cache of 512"),  # 576 > 512; 320 not asked for
    (gqa(16, 32), None, "head_dim 32 has only 16 frequencies"),
    (ModelConfig(vocab_size=256, dim=128, n_layers=2, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=160,
                 arch="qwen3", qk_norm=True), None, "could not be exported for vLLM: DeepSeek-V3 cannot express"),
])
def test_vllm_budget_refusals(config, rank, message):
    with pytest.raises(MlakitError, match=message) as e:
        resolve_budget(config, ConvertOptions(rank_shape="vllm", kv_lora_rank=rank))
    assert "\n" not in str(e.value)


def test_vllm_options_check():
    assert ConvertOptions(rank_shape="vllm").rope_frequencies == "deepseek"  # implied
    assert ConvertOptions().rope_frequencies == "free"
    for kw, message in [(dict(kv_saving=0.5), "give no --kv-saving"), (dict(kv_lora_rank=384), "512 or 256"),
                        (dict(rope_dim=32), "--rope-dim 64"), (dict(rank_allocation="adaptive"), "uniform"),
                        (dict(rope_frequencies="free"), "--rope-frequencies deepseek")]:
        with pytest.raises(MlakitError, match=message):
            ConvertOptions(rank_shape="vllm", **kw).check()
    with pytest.raises(MlakitError, match="--rank-shape must be one of"):
        ConvertOptions(rank_shape="sglang").check()


transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_vllm_shape(tmp_path):
    """32 heads x head_dim 64 with 8 KV heads (1024 cache values per token per layer), small otherwise."""
    from mlakit import evaluate as ev
    from mlakit.testing.models import save_tiny_with_tokenizer

    try:
        ev.data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    _, path = save_tiny_with_tokenizer(tmp_path, "llama", 8, hidden_size=128, num_attention_heads=32, head_dim=64,
                                       num_hidden_layers=2, intermediate_size=160, max_position_embeddings=512)
    return path


def test_rank_shape_vllm_converts_exports_and_loads_in_transformers(tiny_vllm_shape, tmp_path, capsys, rel_err):
    from mlakit.cli import main
    from mlakit.loading import load

    out, hf_dir = tmp_path / "mla", tmp_path / "hf"
    assert main(["convert", str(tiny_vllm_shape), "-o", str(out), "--rank-shape", "vllm", "--calib-tokens", "512",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ranks"] == [512, 512] and summary["rope_dim"] == 64
    assert summary["values_per_token_layer"] == 576 and summary["kv_saving"] == pytest.approx(1 - 576 / 1024)
    freqs = summary["rope_freq_indices"]
    assert len(freqs) == 32 and len({b - a for a, b in zip(freqs, freqs[1:])}) == 1  # deepseek frequencies

    assert main(["info", str(out), "--json"]) == 0
    engines = {e["engine"]: e for e in json.loads(capsys.readouterr().out)["engines"]}
    assert engines["vLLM"]["runs"] and engines["FlashMLA (in vLLM / SGLang)"]["runs"]
    assert engines["llama.cpp CUDA flash attention"]["runs"]

    assert main(["export", str(out), "--format", "hf-deepseek", "-o", str(hf_dir)]) == 0
    printed = capsys.readouterr().out
    assert "vLLM (hf-deepseek): yes, GPU: head size 576" in printed
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (512, 64)

    model = load(str(out), dtype=torch.float32).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **no_hub_kernels()).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model(tokens)) <= 1e-4  # as tests/test_export_hf.py


def test_rank_shape_cli_refusals_are_one_line(tmp_path, capsys):
    from mlakit.cli import main
    from mlakit.testing.models import save_tiny

    _, path = save_tiny(tmp_path, "llama", 2, head_dim=64)  # 2 KV heads x 64: 256 values, below 320
    capsys.readouterr()
    for argv, message in [([], "save nothing"), (["--kv-saving", "0.5"], "give no --kv-saving"),
                          (["--rope-frequencies", "free"], "--rope-frequencies deepseek"),
                          (["--sweep", "0.5", "--report", str(tmp_path / "r")], "fixes the budget")]:
        extra = [] if "--sweep" in argv else ["-o", str(tmp_path / "x")]
        assert main(["convert", str(path), *extra, "--rank-shape", "vllm", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("mlakit: error:"), err
    assert not (tmp_path / "x").exists()
