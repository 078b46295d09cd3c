"""Tiny random HF models with a byte-level tokenizer (256 ids), built in the test."""

from __future__ import annotations

from hf_models import save_tiny


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
