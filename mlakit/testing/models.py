"""Tiny models and tokenizers built in code (nothing is downloaded): random transformers
models of each supported family, a byte-level tokenizer (256 ids) to save beside them, and a
word tokenizer for mlakit's own tiny models. transformers and tokenizers are imported inside
the functions that need them."""

from __future__ import annotations

import re

import torch


def tiny_hf_model(arch: str, n_kv_heads: int, seed: int = 0, **overrides):
    transformers = __import__("transformers")
    common = dict(
        vocab_size=211, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=n_kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        config = transformers.LlamaConfig(head_dim=common.pop("head_dim", 16), **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(head_dim=16, sliding_window=common.pop("sliding_window", None), **common)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":  # QK-norm; head_dim set apart from hidden_size / heads, as Qwen3 does
        config = transformers.Qwen3Config(head_dim=common.pop("head_dim", 16), **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "gemma3":  # QK-norm, sandwich norms, GeGLU, scaled embeddings, local/global layers
        gemma = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=6, sliding_window_pattern=3,
                     tie_word_embeddings=True,
                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                      "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
        common.pop("tie_word_embeddings")
        gemma.update({k: common.pop(k) for k in list(common) if k in gemma})
        config = transformers.Gemma3TextConfig(**common, **gemma)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).eval()
    # default init leaves biases and norms at 0/1: make every parameter matter
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def save_tiny(tmp_path, arch: str, n_kv_heads: int, **overrides):
    model = tiny_hf_model(arch, n_kv_heads, **overrides)
    path = tmp_path / f"{arch}-kv{n_kv_heads}"
    model.save_pretrained(path)
    return model, path


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_with_tokenizer(tmp_path, arch: str, n_kv_heads: int, **overrides):
    """A tiny model over bytes (vocab 256) saved with its tokenizer: the CLI can calibrate and evaluate it."""
    model, path = save_tiny(tmp_path, arch, n_kv_heads, vocab_size=256, **overrides)
    byte_tokenizer().save_pretrained(path)
    return model, path


class WordTokenizer:
    """Words (with their leading space), digits runs and punctuation as tokens; ids are given
    in order of first sight (so any text of a few hundred words fits a tiny vocabulary)."""

    PATTERN = re.compile(r" ?\w+|[^\w\s]|\s")

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault(piece, len(self.vocab)) for piece in self.PATTERN.findall(text)]
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        words = {i: w for w, i in self.vocab.items()}
        return "".join(words.get(i, f"<{i}>") for i in ids)
