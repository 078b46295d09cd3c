"""Export an mlakit MLA model as a GGUF file of architecture ``deepseek2`` (llama.cpp).

The weights are first rewritten into DeepSeek-V3 form by ``to_deepseek`` (exact;
see ``hf_deepseek``), with the file's own ``rms_norm_eps`` (the source's: the
GGUF carries it, so no rescaling is needed) and ``qk_nope_head_dim >= 1``
(llama.cpp asserts it; zero channels are added and the softmax-scale change is
folded into the query). Then, as llama.cpp's ``convert_hf_to_gguf.py`` does for
DeepSeek-V2/V3:

- names come from the ``gguf`` package's own tensor map for ``deepseek2``;
- ``kv_b_proj`` is split per head into ``attn_k_b`` (transposed: ``[h, r, nope]``)
  and ``attn_v_b`` (``[h, v, r]``), the tensors llama.cpp's absorbed MLA uses;
- MLA is written as MQA: ``head_count_kv = 1``, ``key_length = r + rope``,
  ``value_length = r``, ``key_length_mla = nope + rope``, ``value_length_mla = v``;
- every layer is dense: ``leading_dense_block_count = block_count``, 0 experts;
- RoPE rows are in the interleaved pair layout (llama.cpp's ROPE_TYPE_NORM).

llama.cpp's ``deepseek2`` graph has no attention biases, so models with a query /
latent / output bias are refused. RoPE frequencies that need a linear factor
(``qk_rope_freq_indices`` not starting at 0) are written as linear RoPE scaling,
with llama.cpp's extra magnitude factor divided out of the RoPE rows.

``attn_kv_a_mqa`` is always stored as float32: with no latent norm in the source
its latent rows are scaled by ~1e-8 (the linearised norm), below float16's range
(and q8_0's float16 block scales). Everything 1-D (norms) is float32 too.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlakit.errors import MlakitError
from mlakit.export.hf_deepseek import check_exportable, to_deepseek
from mlakit.io import atomic_file, check_output
from mlakit.model import Transformer

GGUF_TYPES = ("f32", "f16", "q8_0")
KEEP_F32 = ("attn_kv_a_mqa",)  # scaled latent rows: see the module docstring


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise MlakitError("GGUF export needs the package 'gguf': pip install gguf") from None
    return gguf


def check_gguf_exportable(model: Transformer) -> None:
    cfg = model.config
    check_exportable(cfg)
    biases = [n for n, flag in (("query/key/latent (qkv_bias)", cfg.qkv_bias), ("output (o_bias)", cfg.o_bias)) if flag]
    if biases:
        raise MlakitError(f"llama.cpp's deepseek2 has no attention biases; this model has {' and '.join(biases)} "
                          "biases (export it with --format hf-deepseek for transformers instead)")


# ------------------------------------------------------------------ tokenizer
# per file version: a file replaced in place (rename) within one mtime tick has a new inode
_TOKENIZER_CACHE: dict[tuple[str, int, int, int], list] = {}


def tokenizer_fields_from_gguf(path: str | os.PathLike) -> list[tuple[str, Any, Any, Any]]:
    """``(key, value, type, sub_type)`` of every ``tokenizer.*`` field of a GGUF file (cached per file)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[key] = _read_tokenizer_fields(path)
    return _TOKENIZER_CACHE[key]


def _read_tokenizer_fields(path: str | os.PathLike) -> list[tuple[str, Any, Any, Any]]:
    gguf = _require_gguf()
    reader = gguf.GGUFReader(str(path))
    fields = []
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((name, f.contents(), vtype, sub))
    if not any(name == "tokenizer.ggml.tokens" for name, *_ in fields):
        raise MlakitError(f"{path} has no tokenizer (tokenizer.ggml.tokens)")
    return fields


def tokenizer_fields_from_hf(tokenizer: Any) -> list[tuple[str, Any, Any, Any]]:
    """A byte-level BPE (GPT-2 style) HF tokenizer as GGUF fields (pre-tokenizer 'default')."""
    import json

    gguf = _require_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise MlakitError("the model's tokenizer is not a fast (tokenizer.json) tokenizer; give --tokenizer-gguf FILE")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise MlakitError(f"only byte-level BPE tokenizers are written to GGUF (this one is {model.get('type')!r}); "
                          "give --tokenizer-gguf FILE")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.CONTROL if added.get(tok, {}).get("special") else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    A, S, I, U = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT32
    fields = [("tokenizer.ggml.model", "gpt2", S, None), ("tokenizer.ggml.pre", "default", S, None),
              ("tokenizer.ggml.tokens", tokens, A, S), ("tokenizer.ggml.token_type", [int(t) for t in types], A, I),
              ("tokenizer.ggml.merges", merges, A, S)]
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id"), ("unknown_token_id", "unk_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields.append((f"tokenizer.ggml.{key}", int(value), U, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields.append(("tokenizer.chat_template", template, S, None))
    return fields


# ------------------------------------------------------------------ writing
def _tensor_data(gguf, name: str, tensor: torch.Tensor, qtype: str) -> tuple[np.ndarray, Any]:
    """numpy data and raw GGML type for one tensor under the requested file type."""
    data = tensor.to(torch.float32).contiguous().numpy()
    if data.ndim == 1 or qtype == "f32" or any(k in name for k in KEEP_F32):
        return data, gguf.GGMLQuantizationType.F32
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if data.shape[-1] % block == 0:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(model: Transformer, path: str | os.PathLike, qtype: str = "f32",
                tokenizer_gguf: str | os.PathLike | None = None, tokenizer: Any | None = None,
                name: str | None = None, overwrite: bool = False, cache_block: int = 1):
    """Write ``model`` as a ``deepseek2`` GGUF file; returns the ``DeepseekForm`` it was built from.

    ``cache_block``: pad the latent and the RoPE key with zero channels to multiples of
    it (exact; 32 lets llama.cpp store the cache as q8_0 / q4_0, see ``engines``).

    The tokenizer comes from ``tokenizer_gguf`` (copied field by field: the right
    choice for a model that came from a GGUF file) or else from the HF
    ``tokenizer`` (byte-level BPE only). The file is written to a temporary
    sibling and renamed into place once complete.
    """
    gguf = _require_gguf()
    if qtype not in GGUF_TYPES:
        raise MlakitError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    check_gguf_exportable(model)
    cfg = model.config
    path = Path(path)
    check_output(path, overwrite, directory=False)
    tok_fields = _tokenizer_fields(tokenizer_gguf, tokenizer, cfg.vocab_size)
    form = to_deepseek(model, rms_norm_eps=cfg.norm_eps, min_nope_dim=1, cache_block=cache_block)
    with atomic_file(path, overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
        _add_metadata(gguf, writer, cfg, form, qtype, name)
        for key, value, vtype, sub in tok_fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        _add_tensors(gguf, writer, cfg, form, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return form


def _tokenizer_fields(tokenizer_gguf, tokenizer, vocab_size: int) -> list[tuple[str, Any, Any, Any]]:
    """The tokenizer's GGUF fields: copied from ``tokenizer_gguf``, else built from the HF ``tokenizer``."""
    if tokenizer_gguf is not None:
        tok_fields = tokenizer_fields_from_gguf(tokenizer_gguf)
    elif tokenizer is not None:
        tok_fields = tokenizer_fields_from_hf(tokenizer)
    else:
        raise MlakitError("llama.cpp needs a tokenizer in the GGUF file: the model has none; give --tokenizer-gguf FILE")
    n_tokens = len(next(v for k, v, *_ in tok_fields if k == "tokenizer.ggml.tokens"))
    if n_tokens != vocab_size:
        raise MlakitError(f"the tokenizer has {n_tokens} tokens but the model's vocabulary is {vocab_size}")
    return tok_fields


def _add_metadata(gguf, writer, cfg, form, qtype: str, name: str | None) -> None:
    """The deepseek2 architecture's fields (every layer dense; MLA run as MQA over the latent)."""
    hc = form.config
    n_layers, r, p = cfg.n_layers, hc["kv_lora_rank"], hc["qk_rope_head_dim"]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    writer.add_name(name or "mlakit MLA export")
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(hc["num_attention_heads"])
    writer.add_head_count_kv(1)  # MLA is run as MQA over the latent
    writer.add_layer_norm_rms_eps(hc["rms_norm_eps"])
    writer.add_rope_freq_base(hc["rope_theta"])
    writer.add_rope_dimension_count(p)
    if form.rope is not None and form.rope.factor != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(form.rope.factor)
    writer.add_leading_dense_block_count(n_layers)
    writer.add_q_lora_rank(hc["q_lora_rank"] or 0)
    writer.add_kv_lora_rank(r)
    writer.add_key_length(r + p)
    writer.add_value_length(r)
    writer.add_key_length_mla(hc["qk_nope_head_dim"] + p)
    writer.add_value_length_mla(hc["v_head_dim"])
    writer.add_expert_feed_forward_length(cfg.intermediate_size)
    writer.add_expert_count(0)
    writer.add_expert_used_count(0)
    writer.add_expert_shared_count(0)


def _add_tensors(gguf, writer, cfg, form, qtype: str) -> None:
    """Every tensor of ``form`` under its GGUF name (``kv_b_proj`` split into ``k_b`` and ``v_b``)."""
    hc = form.config
    r, p = hc["kv_lora_rank"], hc["qk_rope_head_dim"]
    nope, v_dim, h = hc["qk_nope_head_dim"], hc["v_head_dim"], hc["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.n_layers)

    def add(hf_name: str, tensor: torch.Tensor) -> None:
        base, _, kind = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise MlakitError(f"no GGUF name for {hf_name}")
        data, raw = _tensor_data(gguf, mapped, tensor, qtype)
        writer.add_tensor(f"{mapped}.{kind}", data, raw_dtype=raw)

    rope_gain = 1.0
    if form.rope is not None and form.rope.factor != 1.0:
        # llama.cpp's deepseek2 graph multiplies the rotated query and key by
        # 1 + 0.1 ln(factor) whenever a frequency scale is set (YaRN's magnitude
        # correction, applied for linear scaling too): divide it out of the RoPE rows.
        # Measured with llama-cpp-python 0.3.36: logits rel. error 1e-6 with, 0.21 without.
        rope_gain = 1.0 / (1.0 + 0.1 * math.log(form.rope.factor))
    for hf_name, tensor in form.tensors.items():
        if rope_gain != 1.0 and hf_name.endswith(("kv_a_proj_with_mqa.weight", "q_proj.weight", "q_b_proj.weight")):
            tensor = tensor.clone()
            if "kv_a" in hf_name:
                tensor[r:] *= rope_gain
            else:
                tensor.view(h, nope + p, -1)[:, nope:] *= rope_gain
        if hf_name.endswith("kv_b_proj.weight"):
            kv_b = tensor.view(h, nope + v_dim, r)
            k_b, v_b = kv_b.split([nope, v_dim], dim=1)
            add(hf_name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2).contiguous())  # [h, r, nope]
            add(hf_name.replace("kv_b_proj", "v_b_proj"), v_b.contiguous())  # [h, v, r]
        else:
            add(hf_name, tensor)
