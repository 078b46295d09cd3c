"""GGUF (deepseek2) export: file layout with the gguf package's reader, and — when
llama-cpp-python is installed — logits and greedy tokens of the real llama.cpp."""

import math

import numpy as np
import pytest
import torch

from mlakit import checks  # noqa: E402
from mlakit import ModelConfig, Transformer
from mlakit.errors import MlakitError
from mlakit.export import export_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tokenizer_gguf():
    from mlakit.loading import default_model_path

    try:
        return default_model_path()  # the default model's tokenizer (vocab 49152)
    except MlakitError as e:
        pytest.skip(str(e))


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=49152, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16, intermediate_size=96,
                attention="mla", kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                max_seq_len=256, norm_eps=1e-5, tie_embeddings=True, bos_token_id=1, eos_token_ids=[2])
    base.update(kw)
    return ModelConfig(**base)


CASES = {
    # converted-model-like: no latent norm, per-layer ranks (padded), no NoPE part (padded), every other frequency
    "converted": dict(kv_lora_rank=[24, 32], qk_nope_head_dim=0, qk_rope_freq_indices=[0, 2, 4, 6]),
    # frequencies 1, 3, 5, 7 of the source: theta' and a linear factor (llama.cpp's rope.scaling.type linear)
    "converted-shifted": dict(kv_lora_rank=24, qk_nope_head_dim=0, qk_rope_freq_indices=[1, 3, 5, 7]),
    "native": dict(q_lora_rank=32, latent_norm=True, tie_embeddings=False, qk_nope_head_dim=16, norm_eps=1e-6),
}


def build(name):
    model = Transformer(mla(**CASES[name])).init_random(seed=1, std=0.2)
    if model.config.latent_norm:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5)))
    return model


def test_gguf_layout(tmp_path, tokenizer_gguf):
    model = build("converted")
    path = tmp_path / "m.gguf"
    export_gguf(model, path, qtype="q8_0", tokenizer_gguf=tokenizer_gguf)
    reader = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "deepseek2"
    assert checks.attention_kind(str(path)) == "mla"  # read from the file's first key, as mlakit's checks do
    assert f["deepseek2.block_count"] == f["deepseek2.leading_dense_block_count"] == 2
    assert f["deepseek2.attention.kv_lora_rank"] == 32  # padded to the largest layer
    assert f["deepseek2.attention.head_count_kv"] == 1
    assert f["deepseek2.attention.key_length"] == 32 + 8 and f["deepseek2.attention.value_length"] == 32
    assert f["deepseek2.attention.key_length_mla"] == 1 + 8  # NoPE padded to 1
    assert f["deepseek2.attention.value_length_mla"] == 16
    assert f["deepseek2.rope.dimension_count"] == 8
    assert f["deepseek2.rope.freq_base"] == pytest.approx(10000.0 ** (2 * 8 / 16))  # every other source frequency
    assert f["deepseek2.expert_count"] == 0 and f["deepseek2.attention.q_lora_rank"] == 0
    assert len(f["tokenizer.ggml.tokens"]) == 49152
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    assert tensors["blk.0.attn_kv_a_mqa.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert list(tensors["blk.0.attn_k_b.weight"].shape) == [1, 32, 4]  # ne: [nope, r, h]
    assert list(tensors["blk.0.attn_v_b.weight"].shape) == [32, 16, 4]  # ne: [r, v, h]
    assert "deepseek2.rope.scaling.type" not in f


def test_gguf_shifted_frequencies_use_linear_scaling(tmp_path, tokenizer_gguf):
    """Frequencies 1, 3, 5, 7 of 8: theta' = theta^(2 * 8 / 16), linear factor theta^(2 / 16); llama.cpp's
    extra RoPE magnitude 1 + 0.1 ln(factor) is divided out of the RoPE rows (checked against llama.cpp below)."""
    model = build("converted-shifted")
    path = tmp_path / "m.gguf"
    export_gguf(model, path, qtype="f32", tokenizer_gguf=tokenizer_gguf)
    reader = gguf.GGUFReader(str(path))
    f = {k: v.contents() for k, v in reader.fields.items()}
    factor = 10000.0 ** (2 / 16)
    assert f["deepseek2.rope.scaling.type"] == "linear"
    assert f["deepseek2.rope.scaling.factor"] == pytest.approx(factor)
    assert f["deepseek2.rope.freq_base"] == pytest.approx(10000.0 ** (2 * 8 / 16))
    kv_a = torch.from_numpy(next(t for t in reader.tensors if t.name == "blk.0.attn_kv_a_mqa.weight").data.copy())
    ours = model.layers[0].attention.wkv_a.weight.detach()
    gain = 1 / (1 + 0.1 * math.log(factor))
    # RoPE rows (the last 8, interleaved pair order) scaled by the gain; latent rows untouched up to the
    # linearised-norm scale, so compare row norms of the RoPE block only
    torch.testing.assert_close(kv_a[-8:].norm(), gain * ours[-8:].norm(), rtol=1e-5, atol=0)


def test_gguf_refusals(tmp_path, tokenizer_gguf):
    with pytest.raises(MlakitError, match="biases"):
        export_gguf(Transformer(mla(qkv_bias=True)), tmp_path / "a.gguf", tokenizer_gguf=tokenizer_gguf)
    with pytest.raises(MlakitError, match="tokens"):
        export_gguf(Transformer(mla(vocab_size=1000)).init_random(), tmp_path / "b.gguf", tokenizer_gguf=tokenizer_gguf)
    with pytest.raises(MlakitError, match="arithmetic progression"):
        export_gguf(Transformer(mla(qk_rope_freq_indices=[0, 1, 3, 4])).init_random(), tmp_path / "c.gguf",
                    tokenizer_gguf=tokenizer_gguf)
    with pytest.raises(MlakitError, match="--type"):
        export_gguf(Transformer(mla()).init_random(), tmp_path / "d.gguf", qtype="q4_0", tokenizer_gguf=tokenizer_gguf)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_gguf_export_leaves_nothing(tmp_path, tokenizer_gguf, monkeypatch):
    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(build("converted"), tmp_path / "m.gguf", tokenizer_gguf=tokenizer_gguf)
    assert list(tmp_path.iterdir()) == []


def llama_logits_and_greedy(path, tokens, n_new):
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 KV cache (llama.cpp's default is float16, 1e-3 off on its own)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2, seed=0, type_k=0, type_v=0)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    out = []
    for _ in range(n_new):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    llm.close()
    return logits, out


@pytest.mark.parametrize("name", list(CASES))
# random weights are hard to quantise: q8_0 (weights and activations) is ~5e-2 off
@pytest.mark.parametrize("qtype,tol", [("f32", 1e-4), ("f16", 1e-2), ("q8_0", 1e-1)])
def test_llama_cpp_matches_mlakit(tmp_path, tokenizer_gguf, rel_err, name, qtype, tol):
    pytest.importorskip("llama_cpp")
    from mlakit.engine import SamplingParams, generate

    model = build(name)
    path = tmp_path / f"{name}-{qtype}.gguf"
    export_gguf(model, path, qtype=qtype, tokenizer_gguf=tokenizer_gguf)
    tokens = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    logits, greedy = llama_logits_and_greedy(path, tokens, 16)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double()
    assert rel_err(torch.from_numpy(logits), ours) <= tol
    if qtype == "f32":
        expected = generate(model, [tokens], SamplingParams(max_new_tokens=16, greedy=True))[0][-16:]
        assert greedy == expected


# ------------------------------------------------------------------ quantised cache
def _round_away(v: torch.Tensor) -> torch.Tensor:  # C's roundf: halves away from zero
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's q8_0 round trip over the last dim (blocks of 32: d = absmax / 127 in float32,
    q = roundf(x / d), stored d in float16)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    q = _round_away(xb * torch.where(d > 0, 1.0 / d, torch.zeros_like(d)))
    return (q.double() * d.half().double()).reshape(x.shape).to(x.dtype)


def q4_0(x: torch.Tensor) -> torch.Tensor:
    """ggml's q4_0 round trip (blocks of 32: d = (signed value of largest magnitude) / -8,
    q = min(15, trunc(x / d + 8.5)), x' = (q - 8) d, d stored in float16)."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    d = torch.gather(xb, -1, xb.abs().argmax(-1, keepdim=True)) / -8.0
    q = torch.clamp(torch.trunc(xb * torch.where(d != 0, 1.0 / d, torch.zeros_like(d)) + 8.5), max=15)
    return ((q - 8).double() * d.half().double()).reshape(x.shape).to(x.dtype)


def llamacpp_cache_emulation(cache_type):
    """mlakit's absorbed attention as llama.cpp's CPU flash attention computes it with a
    quantised cache (ggml-cpu ops.cpp, flash_attn_ext): one cache row per token, K = [latent,
    RoPE key] quantised in blocks; V = the first kv_lora_rank values of the same stored row;
    the query quantised to q8_0 (K's vec_dot type) for the score dot products; V dequantised
    and accumulated in float32."""
    from mlakit.attention import _softmax

    def attend(self, q_nope, q_rope, latent, k_rope, mask):
        w_uk, w_uv = self.up_projections()
        r = latent.shape[-1]
        q = q8_0(torch.cat([torch.einsum("bshn,hnr->bshr", q_nope, w_uk), q_rope], dim=-1))
        k = cache_type(torch.cat([latent, k_rope], dim=-1))
        scores = torch.einsum("bshd,bld->bhsl", q, k) * self.scale
        probs = _softmax(scores.masked_fill(~mask[:, None], float("-inf")))
        return torch.einsum("bshr,hvr->bshv", torch.einsum("bhsl,blr->bshr", probs, k[..., :r]), w_uv)

    return attend


def llama_logits(path, tokens, type_kv: int, flash_attn: bool = True):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2, seed=0, type_k=type_kv, type_v=type_kv, flash_attn=flash_attn)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    llm.close()
    return torch.from_numpy(logits)


GGML_Q8_0, GGML_Q4_0, GGML_F16 = 8, 2, 1


@pytest.mark.parametrize("cache,type_kv", [("q8_0", GGML_Q8_0), ("q4_0", GGML_Q4_0)])
def test_llama_cpp_quantised_cache_is_the_latent_in_blocks(tmp_path, tokenizer_gguf, rel_err, monkeypatch,
                                                           cache, type_kv):
    """llama.cpp's q8_0 / q4_0 cache on an MLA GGUF: its logits equal mlakit's forward with the
    cache row [latent, RoPE key] and the absorbed query rounded as ggml rounds them (the same
    arithmetic in float64 here: what is left is float32 accumulation order, measured 7e-7;
    bound 1e-5). Against mlakit's unquantised forward the same logits are 2.4e-2 (q8_0) and
    0.34 (q4_0) off on these random weights, so the bound shows the cache is stored as said."""
    pytest.importorskip("llama_cpp")
    from mlakit.attention import MLAttention
    from mlakit.options import ABSORBED

    model = Transformer(mla(kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=8, head_dim=64,
                            qk_rope_freq_indices=list(range(16)))).init_random(seed=1, std=0.2)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, qtype="f32", tokenizer_gguf=tokenizer_gguf)
    tokens = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    theirs = llama_logits(path, tokens, type_kv)
    with torch.no_grad():
        exact = model(torch.tensor([tokens]))[0].double()
        monkeypatch.setattr(MLAttention, "_attend_absorbed", llamacpp_cache_emulation(globals()[cache]))
        emulated = model(torch.tensor([tokens]), options=ABSORBED)[0].double()
    assert rel_err(theirs, emulated) <= 1e-5
    assert rel_err(theirs, exact) > 100 * rel_err(theirs, emulated)


def test_llama_cpp_quantised_cache_needs_blocks_of_32(tmp_path, tokenizer_gguf, rel_err):
    """kv_lora_rank 24 + RoPE 8: llama.cpp refuses a q8_0 cache (its blocks of 32 must divide the
    K row, 32, and the V view, 24); exported with cache_block=32 (mlakit export --quantised-cache)
    the same model runs (with a float32 cache, padded = unpadded to 1e-6); MLA needs type_k == type_v and flash
    attention (a quantised V is a view of the quantised K)."""
    pytest.importorskip("llama_cpp")
    from mlakit.export.engines import engines_for

    model = build("converted-shifted")  # rank 24, rope 8 (frequencies 1, 3, 5, 7: linear factor)
    tokens = torch.randint(0, 49152, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    plain, padded = tmp_path / "plain.gguf", tmp_path / "padded.gguf"
    export_gguf(model, plain, qtype="f32", tokenizer_gguf=tokenizer_gguf)
    form = export_gguf(model, padded, qtype="f32", tokenizer_gguf=tokenizer_gguf, cache_block=32)
    assert (form.config["kv_lora_rank"], form.config["qk_rope_head_dim"]) == (32, 32)
    quant = {fit.engine: fit.runs for fit in engines_for(model.config)}["llama.cpp quantised cache (q8_0/q4_0)"]
    assert not quant
    with pytest.raises(ValueError, match="context"):
        llama_logits(plain, tokens, GGML_Q8_0)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double()
    assert rel_err(llama_logits(padded, tokens, 0, flash_attn=False), ours) <= 1e-4  # padding is exact: 1.3e-6
    assert rel_err(llama_logits(padded, tokens, GGML_F16), ours) <= 1e-2  # f16 cache + flash attention: 1.9e-3
    assert rel_err(llama_logits(padded, tokens, GGML_Q8_0), ours) <= 1e-1  # q8_0 cache on random weights: 2.0e-2
    with pytest.raises(ValueError, match="context"):
        llama_logits(padded, tokens, GGML_Q8_0, flash_attn=False)  # a quantised V needs flash attention
    llama_cpp = pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError, match="context"):  # MLA: one cache type for K and V
        llama_cpp.Llama(model_path=str(padded), n_ctx=128, verbose=False, type_k=GGML_Q8_0, type_v=GGML_F16,
                        flash_attn=True)


def test_tokenizer_fields_follow_a_file_replaced_within_one_mtime(tmp_path):
    """The per-file cache of a GGUF's tokenizer fields is not fooled by a file replaced in place
    (a rename, as mlakit's own writes do) that keeps the old modification time."""
    import os

    from mlakit.export.gguf import tokenizer_fields_from_gguf

    def write(path, tokens):
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()

    path, other = tmp_path / "tok.gguf", tmp_path / "next.gguf"
    write(path, ["a", "b"])
    mtime = path.stat().st_mtime_ns
    first = dict((name, value) for name, value, *_ in tokenizer_fields_from_gguf(path))
    write(other, ["a", "b", "c"])
    os.replace(other, path)
    os.utime(path, ns=(mtime, mtime))
    second = dict((name, value) for name, value, *_ in tokenizer_fields_from_gguf(path))
    assert (list(first["tokenizer.ggml.tokens"]), list(second["tokenizer.ggml.tokens"])) == (["a", "b"], ["a", "b", "c"])
