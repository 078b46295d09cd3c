"""decode-e2e-v1's baseline: transformers' ``generate`` on the original shape
(``LlamaForCausalLM``, random weights, dynamic cache; static cache on request).
Decode tokens/s = batch * N / (time(N + 1 new tokens) - time(1 new token))."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from mlakit.bench.memory import GIB, device_free_bytes, free_memory, oom_message, peak_gib, reset_peak
from mlakit.bench.rows import RowRecorder, new_row
from mlakit.bench.timing import Timer
from mlakit.bench.variants import variant_name
from mlakit.config import ModelConfig


def hf_decode_rate(seconds_one: float, seconds_many: float, batch: int, steps: int) -> Optional[float]:
    """Decode tokens/s from generate(1 new token) and generate(steps + 1 new tokens):
    the difference is ``steps`` decode steps of ``batch`` tokens (the prefill cancels)."""
    delta = seconds_many - seconds_one
    if delta <= 0:
        return None
    return batch * steps / delta


def hf_memory_estimate(config: ModelConfig, batch: int, context: int, new_tokens: int, elt: int) -> int:
    """Bytes transformers' generate needs with a dynamic cache: weights, the cache
    twice (each step concatenates a copy), and the prefill's MLP activations."""
    params = (config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)
              + config.n_layers * (config.dim * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
                                   + 3 * config.dim * config.intermediate_size))
    kv = batch * (context + new_tokens) * config.n_layers * 2 * config.n_kv_heads * config.head_dim * elt
    activations = batch * context * (3 * config.intermediate_size + 6 * config.dim) * elt
    return params * elt + 2 * kv + activations


def hf_llama_config(config: ModelConfig, max_positions: int):
    """transformers ``LlamaConfig`` of the same shape (no EOS: generation never stops early)."""
    from transformers import LlamaConfig

    rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        max_position_embeddings=max(config.max_seq_len, max_positions), rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias,
        bos_token_id=config.bos_token_id, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa",
    )


def build_hf_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0):
    """``LlamaForCausalLM`` of ``config``'s shape with random normal weights on ``device``."""
    from transformers import LlamaForCausalLM

    hf_config = hf_llama_config(config, max_positions)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    model = model.to(dtype=dtype).to_empty(device=device)
    # RoPE buffers are computed in __init__ (meta above): rebuild that module for real.
    rotary = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rotary)(config=hf_config).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.requires_grad_(False)
    return model.eval()


def run_hf_baseline(rec: RowRecorder, original: ModelConfig, grid: Sequence[Tuple[int, int]], steps: int,
                    dtype: torch.dtype, timer: Timer, static: bool = False, seed: int = 0) -> None:
    """transformers' rows of ``grid`` (and one static-cache row at batch 1 with ``static``)
    into ``rec``; a row whose estimated memory exceeds what is free is recorded as OOM, not run."""
    device = rec.device
    if original.is_mla or original.sliding_window is not None:
        rec.notes.append("transformers baseline skipped: it is built as LlamaForCausalLM (GQA, no sliding window)")
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        rec.notes.append("transformers baseline skipped: transformers is not installed")
        return
    max_positions = max(c for _, c in grid) + steps + 2
    rec.log("== transformers generate: building LlamaForCausalLM (random weights)")
    try:
        hf = build_hf_model(original, device, dtype, max_positions, seed=seed)
    except torch.OutOfMemoryError as exc:
        rec.notes.append(f"transformers baseline: {oom_message(exc)}")
        free_memory(device, collect=True)
        return
    elt = dtype.itemsize
    name = f"transformers {variant_name(original)}"

    def generate(ids, n, **kw):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)

    warm = torch.randint(1, original.vocab_size, (1, 16), device=device)
    generate(warm, 2)

    def row_fn(batch: int, context: int, static: bool) -> Dict[str, Any]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(1, original.vocab_size, (batch, context), generator=gen).to(device)
        kw = dict(cache_implementation="static") if static else {}
        generate(ids, 1, **kw)  # first-time costs of this prompt shape stay out of t_one
        if static:  # compile the longer cache too
            generate(ids, steps + 1, **kw)
        reset_peak(device)
        for _ in range(3):  # on a busy CPU and a tiny model, noise can make the difference <= 0: again
            t_one = timer.seconds(lambda: generate(ids, 1, **kw))
            t_many = timer.seconds(lambda: generate(ids, steps + 1, **kw))
            tps = hf_decode_rate(t_one, t_many, batch, steps)
            if tps is not None:
                break
        ms = batch / tps * 1e3 if tps else None
        return new_row("hf-static" if static else "hf-dynamic", name + (" static" if static else ""),
                       batch, context, tokens_per_s=tps, ms_per_step=ms, peak_gib=peak_gib(device),
                       kv_bytes_per_token=original.n_layers * 2 * original.n_kv_heads * original.head_dim * elt,
                       note=f"generate: prompt {context}, ({t_many:.2f} s - {t_one:.2f} s) / {steps} steps")

    # the model is already resident: its weights are part of the estimate, so add them back to what is free
    resident = hf_memory_estimate(original, 0, 0, 0, elt)
    plan = [(b, c, False) for b, c in grid]
    if static:
        plan += [(b, c, True) for b, c in grid if b == 1][:1]
    for batch, context, is_static in plan:
        phase = "hf-static" if is_static else "hf-dynamic"
        rname = name + (" static" if is_static else "")
        need = hf_memory_estimate(original, batch, context, steps + 1, elt)
        free = device_free_bytes(device) + resident if device.type == "cuda" else None
        if free is not None and need > free:
            rec.emit(new_row(phase, rname, batch, context, status="OOM",
                             note=f"not run: needs ~{need / GIB:.0f} GiB (weights + 2x dynamic cache + "
                                  f"prefill activations), {free / GIB:.0f} GiB free"))
        else:
            rec.guard(lambda: row_fn(batch, context, is_static), phase, rname, batch, context)
        rec.tick(f"transformers {batch}x{context}")
    del hf
    free_memory(device, collect=True)
