"""Which stock engines run an export (mlakit.export.engines), on tiny configs of each case,
and the lines `mlakit info` and `mlakit export` print."""

import json

import pytest

from mlakit import ModelConfig, Transformer
from mlakit.errors import MlakitError
from mlakit.export.engines import engine_lines, engines_for, export_shape


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=32, n_kv_heads=32, head_dim=64, intermediate_size=64,
                attention="mla", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
                qk_rope_freq_indices=list(range(32)), max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def runs(config: ModelConfig) -> dict[str, bool]:
    return {fit.engine: fit.runs for fit in engines_for(config)}


VLLM, FLASHMLA, CUDA, CPU, QUANT = ("vLLM", "FlashMLA (in vLLM / SGLang)", "llama.cpp CUDA flash attention",
                                    "llama.cpp CPU", "llama.cpp quantised cache (q8_0/q4_0)")
HF = "transformers DeepseekV3ForCausalLM"

CASES = {
    # name: (config overrides, engines that run it)
    "576, 32 heads": ({}, {HF, VLLM, FLASHMLA, CPU, CUDA, QUANT}),
    "576, 1 head": (dict(n_heads=1), {HF, VLLM, FLASHMLA, CPU, QUANT}),  # llama.cpp CUDA: >= 2 query heads
    "320, 32 heads": (dict(kv_lora_rank=256), {HF, VLLM, CPU, CUDA, QUANT}),  # FlashMLA: 576 only
    "320, 64 heads": (dict(kv_lora_rank=256, n_heads=64), {HF, VLLM, CPU, CUDA, QUANT}),
    "320, 9 heads": (dict(kv_lora_rank=256, n_heads=9), {HF, VLLM, CPU, QUANT}),  # CUDA: heads % 32
    # the default model's 50% conversion: llama.cpp on the CPU, 144 is not a multiple of 32
    "192 (144+48)": (dict(n_heads=9, kv_lora_rank=144, qk_rope_head_dim=48, qk_rope_freq_indices=list(range(24))),
                     {HF, CPU}),
    "224 (160+64), 9 heads": (dict(n_heads=9, kv_lora_rank=160), {HF, CPU, QUANT}),
    # per-layer ranks are padded to the largest: 256 + 64 everywhere
    "per-layer ranks": (dict(kv_lora_rank=[256, 200]), {HF, VLLM, CPU, CUDA, QUANT}),
    # query bias: hf-deepseek with attention_bias (vLLM builds none), no GGUF at all
    "qkv bias": (dict(qkv_bias=True), {HF, FLASHMLA}),
    # frequencies 1, 2, ...: a linear RoPE factor, which vLLM rewrites to YaRN
    "linear factor": (dict(head_dim=128, qk_rope_freq_indices=list(range(1, 33))), {HF, FLASHMLA, CPU, CUDA, QUANT}),
    "no rope": (dict(qk_rope_head_dim=0, qk_rope_freq_indices=None, kv_lora_rank=512), {HF, CPU}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engines_for_each_shape(name):
    overrides, expected = CASES[name]
    got = runs(mla(**overrides))
    assert {engine for engine, ok in got.items() if ok} == expected, got


def test_engine_lines_say_where_and_how_known():
    lines = engine_lines(mla(n_heads=9, kv_lora_rank=144, qk_rope_head_dim=48, qk_rope_freq_indices=list(range(24))))
    text = "\n".join(lines)
    assert "vLLM (hf-deepseek): no: its MLA backends take head size 576 (512+64) or 320 (256+64) only; this export " \
           "has 192" in text
    assert "llama.cpp CPU (gguf): yes, CPU: any shape (measured here" in text
    assert "flash-attention op runs on the CPU" in text and "--quantised-cache to pad to 160 + 64" in text
    assert all(("measured here" in line) or ("from source, not measured here" in line) for line in lines)
    assert engine_lines(mla(), fmt="gguf") == [line for line in engine_lines(mla()) if "(gguf)" in line]


def test_unexportable_and_non_mla():
    fits = engines_for(mla(head_dim=128, qk_rope_freq_indices=[0, 1, 3, 4] + list(range(5, 33))))  # no progression
    assert not any(fit.runs for fit in fits) and "arithmetic progression" in fits[0].detail
    with pytest.raises(MlakitError, match="convert it first"):
        engines_for(ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12,
                                intermediate_size=64))
    shape = export_shape(mla(kv_lora_rank=[100, 200], qk_rope_head_dim=0, qk_rope_freq_indices=None))
    assert (shape.kv_lora_rank, shape.qk_rope_head_dim, shape.padded_from) == (200, 2, [100, 200])


def test_info_and_export_print_the_engines(tmp_path, capsys):
    from mlakit.cli import main
    from mlakit.loading import save_checkpoint

    model = Transformer(mla(vocab_size=97, kv_lora_rank=256, n_layers=1, dim=32, intermediate_size=32)).init_random(
        seed=1)
    save_checkpoint(model, tmp_path / "m", None)
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "engines (mlakit export):\n  transformers DeepseekV3ForCausalLM (hf-deepseek): yes" in out
    assert "  vLLM (hf-deepseek): yes, GPU: head size 320" in out
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    engines = json.loads(capsys.readouterr().out)["engines"]
    assert {e["engine"] for e in engines if e["runs"]} == {HF, VLLM, CPU, CUDA, QUANT}
    pytest.importorskip("transformers")
    assert main(["export", str(tmp_path / "m"), "--format", "hf-deepseek", "-o", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "engines:\n  transformers" in out and "FlashMLA (in vLLM / SGLang) (hf-deepseek): no" in out
    assert "(gguf)" not in out
    assert main(["export", str(tmp_path / "m"), "--format", "hf-deepseek", "-o", str(tmp_path / "hf2"),
                 "--quantised-cache"]) == 2
    assert "--quantised-cache is for --format gguf" in capsys.readouterr().err
