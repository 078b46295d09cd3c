"""decode-e2e-v1: whole-model decode and prefill, MHA / GQA / MQA / MLA side by side.

Implements the protocol of PROTOCOL.md (section decode-e2e-v1). In one process
on one device:

1. the copy-bandwidth ceiling (device-to-device copy, bytes read + written);
2. for each variant of the model's shape -- the original (e.g. GQA-8), MHA
   (``n_kv_heads == n_heads``), MQA (``n_kv_heads == 1``) and MLA (``kv_lora_rank``
   512 + ``qk_rope_head_dim`` 64, ``qk_nope_head_dim == v_head_dim == head_dim``,
   no q_lora) -- built one at a time with random weights (never zeros):

   * per (batch, context) of the grid: an ``Engine`` of ``max_len = context``,
     its cache filled with random normal data (no prefill), every sequence
     decoding at position ``context - 1`` so attention spans ``context`` tokens.
     Warm-up steps (the first one captures the CUDA graph), then ``steps`` timed
     steps with CUDA events; the median step gives ms/step and tokens/s.
   * the largest batch that fits at ``max_batch_context``: estimated from free
     memory and the cache's bytes per sequence, verified by building the engine
     and decoding, shrunk on out-of-memory; that batch is timed too.
   * prefill throughput: one ``prefill_tokens`` prompt, batch 1.

3. transformers' ``generate`` on the original shape (``LlamaForCausalLM``,
   random bf16 weights, dynamic cache; static cache with ``--hf-static``):
   decode tokens/s = batch * N / (time(N + 1 new tokens) - time(1 new token)),
   the same prompt length as the grid's context.

Per row: tokens/s, ms/step, KV bytes per token, peak memory
(``torch.cuda.max_memory_allocated``, reset per row: weights included), and the
fraction of the bandwidth limit: (weight bytes + cache bytes read per step) /
copy bandwidth / step time. Weight bytes count every parameter the step reads:
all of them except the embedding table, of which it reads ``batch`` rows (a
tied table is read whole as the output head). Cache bytes: ``batch * context *
bytes_per_token``. A row that runs out of memory is recorded as ``OOM`` and the
run goes on.

``--device cpu`` with ``--preset tiny`` runs the whole pipeline in seconds (the
tests do): host timers instead of CUDA events, no peak memory, and the
largest-batch search against ``--memory-budget-gib``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mlakit.config import PRESETS, ModelConfig, preset
from mlakit.errors import MlakitError

PROTOCOL = "decode-e2e-v1"
DEFAULT_GRID: Tuple[Tuple[int, int], ...] = ((1, 8192), (1, 32768), (16, 8192), (64, 8192))
DEFAULT_MAX_BATCH_CONTEXT = 32768
DEFAULT_PREFILL_TOKENS = 8192
DEFAULT_MLA = (512, 64)  # kv_lora_rank, qk_rope_head_dim
VARIANT_KEYS = ("original", "mla", "mqa", "mha")  # run order: the target rows first
GIB = 1 << 30

# Shapes that are not model presets: for tests and CPU smoke runs.
SHAPES: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        config=ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           intermediate_size=128, max_seq_len=4096),
        grid=((1, 64), (1, 256), (4, 64), (16, 64)),
        max_batch_context=256,
        prefill_tokens=64,
        mla=(32, 8),
    ),
}


# ---------------------------------------------------------------------- variants
@dataclass
class Variant:
    key: str  # original | mha | mqa | mla
    name: str  # what the table shows
    config: ModelConfig
    source: Optional[str] = None  # a model to load (the original of a named model); None: random weights
    convert_from: Optional[str] = None  # MLA: convert this model with mlakit.convert (rank/rope of ``config``)


def mla_variant_config(config: ModelConfig, kv_lora_rank: int, rope_dim: int) -> ModelConfig:
    """The MLA model of the same shape: latent ``kv_lora_rank`` + shared RoPE key
    ``rope_dim``, per-head nope and value dims equal to ``head_dim``, no q_lora."""
    return config.replace(attention="mla", kv_lora_rank=kv_lora_rank, qk_rope_head_dim=rope_dim,
                          qk_nope_head_dim=config.head_dim, v_head_dim=config.head_dim, q_lora_rank=None,
                          latent_norm=False, qk_rope_freq_indices=None)


def make_variants(config: ModelConfig, kv_lora_rank: int, rope_dim: int,
                  keys: Sequence[str] = VARIANT_KEYS, source: Optional[str] = None) -> List[Variant]:
    """The original and its MHA / MQA / MLA siblings of the same shape, in ``keys`` order.
    A sibling that equals the original (e.g. MHA of an MHA model) is left out."""
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise MlakitError(f"unknown variants {unknown}; choose from {', '.join(VARIANT_KEYS)}")
    gqa_base = config if not config.is_mla else config.replace(attention="gqa", n_kv_heads=config.n_heads)
    out: List[Variant] = []
    for key in keys:
        if key == "original":
            cfg = config
        elif key == "mha":
            cfg = gqa_base.replace(n_kv_heads=config.n_heads)
        elif key == "mqa":
            cfg = gqa_base.replace(n_kv_heads=1)
        else:
            cfg = mla_variant_config(gqa_base, kv_lora_rank, rope_dim)
        if key != "original" and _same_attention(cfg, config) and "original" in keys:
            continue
        name = _variant_name(cfg) + (" (original)" if key == "original" else "")
        out.append(Variant(key, name, cfg, source if key == "original" else None))
    return out


def _same_attention(a: ModelConfig, b: ModelConfig) -> bool:
    if a.attention != b.attention:
        return False
    if a.is_mla:
        return a.kv_lora_ranks() == b.kv_lora_ranks() and a.qk_rope_head_dim == b.qk_rope_head_dim
    return a.n_kv_heads == b.n_kv_heads


def _variant_name(config: ModelConfig) -> str:
    if config.is_mla:
        ranks = sorted(set(config.kv_lora_ranks()))
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return f"MLA {rank}+{config.qk_rope_head_dim}"
    return config.gqa_variant


# ---------------------------------------------------------------------- arithmetic
def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Parameter bytes one decode step reads: every parameter, except that only
    ``batch`` rows of an untied embedding table are read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    if getattr(model, "output", None) is not None:  # untied: the table itself is only indexed
        total -= emb.numel() * emb.element_size()
        total += min(batch, emb.shape[0]) * emb.shape[1] * emb.element_size()
    return total


def bandwidth_fraction(bytes_per_step: float, copy_gbps: Optional[float], ms_per_step: Optional[float]) -> Optional[float]:
    """(bytes read per step / copy bandwidth) / measured step time: 1.0 = at the copy ceiling."""
    if not copy_gbps or not ms_per_step:
        return None
    return bytes_per_step / (copy_gbps * 1e9) / (ms_per_step * 1e-3)


def estimate_max_batch(free_bytes: int, bytes_per_sequence: int, headroom_bytes: int) -> int:
    """How many sequences of ``bytes_per_sequence`` fit in ``free_bytes`` less a headroom."""
    if bytes_per_sequence <= 0:
        raise ValueError("bytes_per_sequence must be positive")
    return max(0, int((free_bytes - headroom_bytes) // bytes_per_sequence))


def search_max_batch(estimate: int, fits: Callable[[int], bool], max_tries: int = 8) -> Tuple[int, List[Tuple[int, bool]]]:
    """Verify ``estimate`` with ``fits(batch)`` (build + run one step; False on OOM) and
    shrink on failure (by 1, or ~1.5% for large batches), then bisect any gap left
    between the last failure and the first success. Returns (largest batch that
    fitted, or 0; the tries as (batch, fitted))."""
    tries: List[Tuple[int, bool]] = []

    def attempt(batch: int) -> bool:
        ok = bool(fits(batch))
        tries.append((batch, ok))
        return ok

    best, failed = 0, None
    batch = estimate
    while batch >= 1 and len(tries) < max_tries:
        if attempt(batch):
            best = batch
            break
        failed = batch
        batch -= max(1, batch // 64)
    while best and failed is not None and failed - best > 1 and len(tries) < max_tries:
        mid = (best + failed) // 2
        if attempt(mid):
            best = mid
        else:
            failed = mid
    return best, tries


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


# ---------------------------------------------------------------------- building
def build_random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``Transformer`` of ``config`` with random normal weights, drawn on ``device``
    (built on the meta device first: no float32 copy, no CPU init)."""
    from mlakit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_random(seed=seed)
    model.requires_grad_(False)
    return model.eval()


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


def fill_cache_random(cache, context: int, seed: int = 0) -> None:
    """Random normal keys/values/latents in every slot (never zeros); each sequence's
    length set to ``context - 1`` (the next step writes slot ``context - 1``)."""
    device = cache.lengths.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for layer in cache.layers:
            for name, buf in layer.named_buffers():
                if name == "lengths":
                    buf.fill_(context - 1)
                else:
                    buf.normal_(generator=generator)


# ---------------------------------------------------------------------- timing
class Timer:
    """Per-call milliseconds: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], n: int) -> Tuple[List[float], float]:
        """(ms of each of n back-to-back calls, total ms / n)."""
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            torch.cuda.synchronize()
            events[0].record()
            for i in range(n):
                fn()
                events[i + 1].record()
            torch.cuda.synchronize()
            times = [events[i].elapsed_time(events[i + 1]) for i in range(n)]
            return times, events[0].elapsed_time(events[n]) / n
        times = []
        t_start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, (time.perf_counter() - t_start) * 1e3 / n

    def seconds(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy; GB/s counting bytes read plus bytes written."""
    if device.type == "cuda":
        from mlakit.bench.attention import measure_copy_bandwidth

        return measure_copy_bandwidth(device, nbytes or (2 << 30))
    nbytes = nbytes or (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def _free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached blocks to the device; ``collect`` first breaks reference cycles
    (an exception's traceback holds the failed row's tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def _oom_message(exc: BaseException) -> str:
    """One short line: what the allocation wanted and what was free, when torch says so."""
    import re

    text = str(exc).strip()
    wanted = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    free = re.search(r"of which ([\d.]+ \w+) is free", text)
    if wanted:
        return f"out of memory (tried to allocate {wanted.group(1)}" + (f", {free.group(1)} free)" if free else ")")
    first = text.splitlines()[0][:160] if text else ""
    return f"out of memory: {first}" if first else "out of memory"


# ---------------------------------------------------------------------- options
@dataclass
class E2EOptions:
    model: Optional[str] = None  # a name/path for mlakit.loading.load; None: the preset
    preset: str = "llama3-8b"
    device: str = "cuda"
    dtype: str = "bfloat16"
    grid: Sequence[Tuple[int, int]] = DEFAULT_GRID
    variants: Sequence[str] = VARIANT_KEYS
    mla_rank: Optional[int] = None
    mla_rope: Optional[int] = None
    steps: int = 20
    warmup: int = 3
    max_batch_context: Optional[int] = DEFAULT_MAX_BATCH_CONTEXT  # None: skip the search
    max_batch_steps: int = 5
    prefill_tokens: Optional[int] = DEFAULT_PREFILL_TOKENS  # None: skip prefill
    prefill_reps: int = 2
    hf: bool = True
    hf_static: bool = False
    hf_steps: Optional[int] = None  # default: steps
    memory_budget_gib: Optional[float] = None  # pretend the device has this much (CPU search; tests)
    headroom_gib: float = 1.5
    time_budget_s: Optional[float] = None  # skip what is left (recorded) once spent
    seed: int = 0
    progress: bool = True
    profile_path: Optional[str] = None  # write a per-kernel profile of one eager step per variant
    compile: Optional[bool] = None  # torch.compile the decode step's blocks; None: on CUDA
    # where the MLA variant comes from: "converter" (mlakit.convert of the named model), "shape" (random
    # weights of the same dims), "auto": the converter for a named model, the shape for a preset
    mla_from: str = "auto"


def _dtype(name: str) -> torch.dtype:
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError:
        raise MlakitError(f"unknown dtype {name!r}") from None


def resolve_shape(opts: E2EOptions) -> Tuple[ModelConfig, Tuple[int, int], Optional[str]]:
    """(original config, default MLA (rank, rope), model source or None)."""
    if opts.model is not None:
        return _config_of(opts.model), DEFAULT_MLA, opts.model
    if opts.preset in SHAPES:
        shape = SHAPES[opts.preset]
        return shape["config"].replace(), shape["mla"], None
    if opts.preset not in PRESETS:
        raise MlakitError(f"unknown preset {opts.preset!r}; presets: {', '.join(sorted([*PRESETS, *SHAPES]))}")
    return preset(opts.preset), DEFAULT_MLA, None


def _config_of(ref: str) -> ModelConfig:
    """The config of a model to load: read from its directory when it has one
    (no weights loaded), else by loading it on the CPU (GGUF, ``default``)."""
    from mlakit.config import CONFIG_FILENAME
    from mlakit.loading import config_from_hf, load

    path = Path(ref)
    if path.is_dir() and (path / CONFIG_FILENAME).exists():
        return ModelConfig.load(path)
    if path.is_dir() and (path / "config.json").exists():
        return config_from_hf(json.loads((path / "config.json").read_text()))
    return load(ref, device="cpu").model.config


# ---------------------------------------------------------------------- the run
class E2EBench:
    """One decode-e2e-v1 run; ``run()`` returns the result dict (also kept as ``self.result``)."""

    def __init__(self, opts: E2EOptions, log: Optional[Callable[[str], None]] = None) -> None:
        self.opts = opts
        self.device = torch.device(opts.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MlakitError(f"{PROTOCOL} on cuda needs a CUDA GPU (use --device cpu for a smoke run)")
        self.dtype = _dtype(opts.dtype)
        self.compile = self.device.type == "cuda" if opts.compile is None else opts.compile
        self.timer = Timer(self.device)
        self._user_log = log
        self.t_start = time.time()
        self.rows: List[Dict[str, Any]] = []
        self.max_batch: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self.copy_gbps: Optional[float] = None
        self._bar = None

    # ------------------------------------------------------------ bookkeeping
    def log(self, msg: str) -> None:
        """To the caller's log; else above the progress bar (stderr); else nowhere."""
        if self._user_log is not None:
            self._user_log(msg)
        elif self._bar is not None:
            self._bar.write(msg, file=sys.stderr)

    def _elapsed(self) -> float:
        return time.time() - self.t_start

    def _over_budget(self) -> bool:
        return self.opts.time_budget_s is not None and self._elapsed() > self.opts.time_budget_s

    def _tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what[:40])
            self._bar.update(1)

    def _emit(self, row: Dict[str, Any]) -> Dict[str, Any]:
        self.rows.append(row)
        tps = row.get("tokens_per_s")
        msg = (f"{row['phase']:<16s} {row['variant']:<20s} b={row['batch']:<4d} ctx={row['context']:<6d} "
               + (f"{tps:10.1f} tok/s {row['ms_per_step']:8.2f} ms" if tps else f"{row['status']}: {row.get('note', '')}"))
        if row.get("peak_gib") is not None:
            msg += f"  peak {row['peak_gib']:.1f} GiB"
        if row.get("bw_fraction") is not None:
            msg += f"  {100 * row['bw_fraction']:.0f}% of BW limit"
        self.log(msg)
        return row

    def _row(self, phase: str, variant: str, batch: int, context: int, **kw: Any) -> Dict[str, Any]:
        row = dict(phase=phase, variant=variant, batch=batch, context=context, status="ok", tokens_per_s=None,
                   ms_per_step=None, kv_bytes_per_token=None, peak_gib=None, bytes_per_step=None,
                   bw_fraction=None, note="")
        row.update(kw)
        return row

    def _guard(self, fn: Callable[[], Dict[str, Any]], phase: str, variant: str, batch: int, context: int,
               **kw: Any) -> Dict[str, Any]:
        """Run one row; out of memory becomes an "OOM" row and the run goes on."""
        if self._over_budget():
            return self._emit(self._row(phase, variant, batch, context, status="skipped",
                                        note="time budget spent", **kw))
        failure = None
        try:
            row = fn()
        except torch.OutOfMemoryError as exc:  # noqa: PERF203
            failure = ("OOM", _oom_message(exc))
        except Exception as exc:  # one broken row must not lose the others
            import traceback

            self.log(traceback.format_exc())
            failure = ("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
        if failure is not None:
            _free_memory(self.device, collect=True)  # the failed row's tensors died with the exception
            row = self._row(phase, variant, batch, context, status=failure[0], note=failure[1], **kw)
        _free_memory(self.device)
        return self._emit(row)

    # ------------------------------------------------------------ variants
    def _model(self, variant: Variant):
        if variant.convert_from is not None:
            return self._converted_model(variant)
        if variant.source is not None:
            from mlakit.loading import load

            model = load(variant.source, dtype=self.dtype, device=str(self.device)).model
            model.requires_grad_(False)
        else:
            model = build_random_model(variant.config, self.device, self.dtype, seed=self.opts.seed)
        return model

    def _converted_model(self, variant: Variant):
        """The named model converted to MLA by the project's converter (calibrated on the
        protocol's calibration range, as ``mlakit convert``), at the variant's rank and RoPE dim."""
        import dataclasses
        import tempfile

        from mlakit.convert.api import ConvertOptions, convert
        from mlakit.evaluate import calibration_tokens
        from mlakit.loading import load

        cfg = variant.config
        options = ConvertOptions(kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                                 progress=self.opts.progress)
        start = time.time()
        loaded = load(variant.convert_from, dtype=torch.float32, device=str(self.device))
        if loaded.tokenizer is None:
            raise MlakitError(f"{variant.convert_from} has no tokenizer: the converter calibrates on the "
                              "protocol's text (use --mla-from shape)")
        tokens = calibration_tokens(loaded.tokenizer, options.calib_tokens)
        with tempfile.TemporaryDirectory(prefix="mlakit-e2e-convert-") as spill:
            model, _ = convert(loaded.model, tokens, dataclasses.replace(options, spill_dir=spill))
        del loaded
        model = model.to(self.dtype).requires_grad_(False)
        self._convert_seconds = time.time() - start
        self.log(f"converted {variant.convert_from} -> {variant.name} in {self._convert_seconds:.0f} s")
        return model

    def _engine(self, model, batch: int, max_len: int, **kw):
        from mlakit.engine import Engine

        return Engine(model, batch, max_len, compile=self.compile, **kw)

    def _decode_row(self, model, variant: Variant, batch: int, context: int, steps: int,
                    phase: str = "decode") -> Dict[str, Any]:
        _reset_peak(self.device)
        engine = self._engine(model, batch, context)
        fill_cache_random(engine.cache, context, seed=self.opts.seed + 1)
        gen = torch.Generator(device="cpu").manual_seed(self.opts.seed)
        tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=gen).to(self.device)
        positions = torch.full((batch,), context - 1, dtype=torch.long, device=self.device)
        for _ in range(max(1, self.opts.warmup)):  # the first captures the CUDA graph
            engine.decode(tokens, positions)
        times, mean_ms = self.timer.per_call(lambda: engine.decode(tokens, positions), steps)
        ms = statistics.median(times)
        kv_bpt = engine.cache.bytes_per_token()
        nbytes = weight_bytes_per_step(model, batch) + batch * context * kv_bpt
        row = self._row(phase, variant.name, batch, context, tokens_per_s=batch / (ms * 1e-3), ms_per_step=ms,
                        mean_ms_per_step=mean_ms, kv_bytes_per_token=kv_bpt, peak_gib=_peak_gib(self.device),
                        bytes_per_step=nbytes, bw_limit_ms=nbytes / (self.copy_gbps * 1e9) * 1e3,
                        bw_fraction=bandwidth_fraction(nbytes, self.copy_gbps, ms),
                        cuda_graph=engine.cuda_graph)
        del engine
        return row

    def _prefill_row(self, model, variant: Variant, tokens_n: int, mode: str = "naive") -> Dict[str, Any]:
        _reset_peak(self.device)
        engine = self._engine(model, 1, tokens_n, prefill_mode=mode)
        gen = torch.Generator(device="cpu").manual_seed(self.opts.seed)
        tokens = torch.randint(0, model.config.vocab_size, (1, tokens_n), generator=gen).to(self.device)
        lengths = torch.tensor([tokens_n], device=self.device)
        engine.prefill(tokens, lengths)  # warm-up
        times, _ = self.timer.per_call(lambda: engine.prefill(tokens, lengths), max(1, self.opts.prefill_reps))
        ms = statistics.median(times)
        row = self._row("prefill", variant.name, 1, tokens_n, tokens_per_s=tokens_n / (ms * 1e-3), ms_per_step=ms,
                        kv_bytes_per_token=engine.cache.bytes_per_token(), peak_gib=_peak_gib(self.device),
                        note=(f"one prompt, {'un-absorbed (naive)' if mode == 'naive' else 'absorbed'} MLA"
                              if variant.config.is_mla else "one prompt"))
        del engine
        return row

    def _free_bytes(self, model) -> int:
        """Free memory for caches: the device's, or the budget less the weights."""
        if self.opts.memory_budget_gib is not None:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            return int(self.opts.memory_budget_gib * GIB) - weights
        if self.device.type == "cuda":
            _free_memory(self.device)
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free)
        return 0

    def _max_batch(self, model, variant: Variant, context: int) -> None:
        kv_bpt = model.new_cache(1, 1).bytes_per_token()
        per_seq = kv_bpt * context
        free = self._free_bytes(model)
        record: Dict[str, Any] = dict(variant=variant.name, context=context, kv_bytes_per_token=kv_bpt,
                                      bytes_per_sequence=per_seq, free_gib=free / GIB, estimate=None,
                                      max_batch=None, tries=[], note="")
        self.max_batch.append(record)
        if free <= 0:
            record["note"] = "no memory figure on this device (give --memory-budget-gib)"
            self.log(f"max batch   {variant.name:<20s} ctx={context}: skipped ({record['note']})")
            return
        if self._over_budget():
            record["note"] = "time budget spent"
            return
        estimate = estimate_max_batch(free, per_seq, int(self.opts.headroom_gib * GIB))
        if self.opts.memory_budget_gib is None and self.device.type == "cpu":
            estimate = 0
        record["estimate"] = estimate
        timed: Dict[int, Dict[str, Any]] = {}

        def fits(batch: int) -> bool:
            row = self._guard(lambda: self._decode_row(model, variant, batch, context, self.opts.max_batch_steps,
                                                       phase="decode@max-batch"),
                              "decode@max-batch", variant.name, batch, context)
            timed[batch] = row
            if row["status"] == "ok":
                return True
            if row["status"] == "OOM":
                self.rows.remove(row)  # a failed try is part of the search, not a result row
                return False
            if row["status"] == "error":
                raise _SearchFailed(row["note"])
            raise _BudgetSpent()

        try:
            best, tries = search_max_batch(estimate, fits)
        except _BudgetSpent:
            best, tries = 0, [(b, False) for b in timed]
            record["note"] = "time budget spent"
        except _SearchFailed as exc:
            best, tries = 0, [(b, False) for b in timed]
            record["note"] = f"error: {exc}"
        record.update(max_batch=best, tries=tries)
        self.log(f"max batch   {variant.name:<20s} ctx={context}: {best} (estimate {estimate}, tries {tries})")

    def _profile(self, model, variant: Variant, batch: int, context: int) -> None:
        """Per-kernel GPU time of one eager decode step, appended to ``profile_path``."""
        path = self.opts.profile_path
        if not path or self.device.type != "cuda" or self._over_budget():
            return
        try:
            from torch.profiler import ProfilerActivity, profile

            engine = self._engine(model, batch, context, cuda_graph=False)
            fill_cache_random(engine.cache, context, seed=self.opts.seed + 1)
            tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
            positions = torch.full((batch,), context - 1, dtype=torch.long, device=self.device)
            for _ in range(2):
                engine.decode(tokens, positions)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.decode(tokens, positions)
                torch.cuda.synchronize()
            averages = prof.key_averages()
            cats: Dict[str, float] = {}
            total, kernels = 0.0, 0
            for ev in averages:
                us = getattr(ev, "self_device_time_total", None)
                if us is None:
                    us = getattr(ev, "self_cuda_time_total", 0.0)
                if not us or getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
                    continue
                cat = _kernel_category(ev.key)
                cats[cat] = cats.get(cat, 0.0) + us
                total += us
                kernels += int(getattr(ev, "count", 0) or 0)
            try:
                table = averages.table(sort_by="self_device_time_total", row_limit=25)
            except Exception:  # older names
                table = averages.table(sort_by="self_cuda_time_total", row_limit=25)
            summary = ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in sorted(cats.items(), key=lambda kv: -kv[1]))
            with open(path, "a") as fh:
                fh.write(f"\n## {variant.name} eager decode step, batch {batch}, context {context}\n")
                fh.write(f"GPU kernel time {total / 1e3:.2f} ms in {kernels} kernels: {summary}\n\n{table}\n")
            self.log(f"profile     {variant.name:<20s} b={batch} ctx={context}: {kernels} kernels, "
                     f"{total / 1e3:.2f} ms ({summary})")
            self.profiles.append(dict(variant=variant.name, batch=batch, context=context, kernels=kernels,
                                      kernel_ms=total / 1e3, by_category_ms={k: v / 1e3 for k, v in cats.items()}))
            del engine
        except Exception as exc:  # diagnostics never stop the bench
            self.log(f"profile of {variant.name} failed: {type(exc).__name__}: {exc}")
        _free_memory(self.device)

    def _run_variant(self, variant: Variant) -> None:
        opts = self.opts
        self.log(f"== {variant.name}: building ({'loaded ' + variant.source if variant.source else 'random weights'})")
        model = None
        try:
            model = self._model(variant)
        except torch.OutOfMemoryError as exc:
            msg = _oom_message(exc)
        if model is None:
            _free_memory(self.device, collect=True)
            for batch, context in opts.grid:
                self._emit(self._row("decode", variant.name, batch, context, status="OOM", note="model: " + msg))
                self._tick("oom")
            return
        self.variant_info.append(dict(key=variant.key, name=variant.name, config=variant.config.to_dict(),
                                      weights=("loaded " + variant.source if variant.source else
                                               f"converted from {variant.convert_from} by mlakit.convert "
                                               f"({self._convert_seconds:.0f} s)" if variant.convert_from
                                               else "random normal"),
                                      parameters=sum(p.numel() for p in model.parameters()),
                                      weight_gib=sum(p.numel() * p.element_size() for p in model.parameters()) / GIB,
                                      kv_bytes_per_token=model.new_cache(1, 1).bytes_per_token()))
        for batch, context in opts.grid:
            self._guard(lambda: self._decode_row(model, variant, batch, context, opts.steps),
                        "decode", variant.name, batch, context)
            self._tick(f"{variant.name} {batch}x{context}")
        if opts.profile_path:
            batch, context = min(opts.grid)
            self._profile(model, variant, batch, context)
        if opts.max_batch_context:
            self._max_batch(model, variant, opts.max_batch_context)
            self._tick(f"{variant.name} max batch")
        if opts.prefill_tokens:
            self._guard(lambda: self._prefill_row(model, variant, opts.prefill_tokens),
                        "prefill", variant.name, 1, opts.prefill_tokens)
            if variant.config.is_mla:  # what the engine's choice of the naive form for prefill rests on
                self._guard(lambda: self._prefill_row(model, variant, opts.prefill_tokens, mode="absorbed"),
                            "prefill", variant.name, 1, opts.prefill_tokens)
            self._tick(f"{variant.name} prefill")
        del model
        _free_memory(self.device, collect=True)

    # ------------------------------------------------------------ transformers
    def _run_hf(self, original: ModelConfig) -> None:
        opts = self.opts
        if original.is_mla or original.sliding_window is not None:
            self.notes.append("transformers baseline skipped: it is built as LlamaForCausalLM (GQA, no sliding window)")
            return
        try:
            import transformers  # noqa: F401
        except ImportError:
            self.notes.append("transformers baseline skipped: transformers is not installed")
            return
        steps = opts.hf_steps or opts.steps
        max_positions = max(c for _, c in opts.grid) + steps + 2
        self.log("== transformers generate: building LlamaForCausalLM (random weights)")
        try:
            hf = build_hf_model(original, self.device, self.dtype, max_positions, seed=opts.seed)
        except torch.OutOfMemoryError as exc:
            self.notes.append(f"transformers baseline: {_oom_message(exc)}")
            _free_memory(self.device, collect=True)
            return
        elt = torch.tensor([], dtype=self.dtype).element_size()
        name = f"transformers {_variant_name(original)}"

        def generate(ids, n, **kw):
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, **kw)

        warm = torch.randint(1, original.vocab_size, (1, 16), device=self.device)
        generate(warm, 2)

        def row_fn(batch: int, context: int, static: bool) -> Dict[str, Any]:
            gen = torch.Generator(device="cpu").manual_seed(opts.seed)
            ids = torch.randint(1, original.vocab_size, (batch, context), generator=gen).to(self.device)
            kw = dict(cache_implementation="static") if static else {}
            generate(ids, 1, **kw)  # first-time costs of this prompt shape stay out of t_one
            if static:  # compile the longer cache too
                generate(ids, steps + 1, **kw)
            _reset_peak(self.device)
            for _ in range(3):  # on a busy CPU and a tiny model, noise can make the difference <= 0: again
                t_one = self.timer.seconds(lambda: generate(ids, 1, **kw))
                t_many = self.timer.seconds(lambda: generate(ids, steps + 1, **kw))
                tps = hf_decode_rate(t_one, t_many, batch, steps)
                if tps is not None:
                    break
            ms = batch / tps * 1e3 if tps else None
            return self._row("hf-static" if static else "hf-dynamic", name + (" static" if static else ""),
                             batch, context, tokens_per_s=tps, ms_per_step=ms, peak_gib=_peak_gib(self.device),
                             kv_bytes_per_token=original.n_layers * 2 * original.n_kv_heads * original.head_dim * elt,
                             note=f"generate: prompt {context}, ({t_many:.2f} s - {t_one:.2f} s) / {steps} steps")

        plan = [(b, c, False) for b, c in opts.grid]
        if opts.hf_static:
            plan += [(b, c, True) for b, c in opts.grid if b == 1][:1]
        for batch, context, static in plan:
            phase = "hf-static" if static else "hf-dynamic"
            rname = name + (" static" if static else "")
            need = hf_memory_estimate(original, batch, context, steps + 1, elt)
            free = self._hf_free_bytes()
            if free is not None and need > free:
                self._emit(self._row(phase, rname, batch, context, status="OOM",
                                     note=f"not run: needs ~{need / GIB:.0f} GiB (weights + 2x dynamic cache + "
                                          f"prefill activations), {free / GIB:.0f} GiB free"))
            else:
                self._guard(lambda: row_fn(batch, context, static), phase, rname, batch, context)
            self._tick(f"transformers {batch}x{context}")
        del hf
        _free_memory(self.device, collect=True)

    def _hf_free_bytes(self) -> Optional[int]:
        if self.device.type != "cuda":
            return None
        _free_memory(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        # the model is already resident: its weights are part of the estimate, so add them back
        return int(free) + self._hf_weight_bytes

    # ------------------------------------------------------------ main
    def run(self) -> Dict[str, Any]:
        opts = self.opts
        self.variant_info: List[Dict[str, Any]] = []
        self.profiles: List[Dict[str, Any]] = []
        original, (rank, rope), source = resolve_shape(opts)
        rank = opts.mla_rank or rank
        rope = opts.mla_rope if opts.mla_rope is not None else rope
        longest = max([c for _, c in opts.grid] + [opts.max_batch_context or 0, opts.prefill_tokens or 0])
        if original.max_seq_len < longest:
            self.notes.append(f"max_seq_len raised from {original.max_seq_len} to {longest} for timing")
            original = original.replace(max_seq_len=longest)
        if opts.mla_from not in ("auto", "converter", "shape"):
            raise MlakitError(f"--mla-from must be auto, converter or shape, got {opts.mla_from!r}")
        use_converter = opts.mla_from == "converter" or (opts.mla_from == "auto" and source is not None)
        if use_converter and source is None:
            raise MlakitError("--mla-from converter needs a model to convert (MODEL); a preset has random weights")
        if use_converter and not original.is_mla:
            from mlakit.convert.api import ConvertOptions, resolve_budget

            # the converter's own default budget (50% KV saving) unless --mla-rank/--mla-rope say otherwise
            budget = resolve_budget(original, ConvertOptions(kv_lora_rank=opts.mla_rank, rope_dim=opts.mla_rope)
                                    if opts.mla_rank else ConvertOptions())
            rank, rope = budget.rank, budget.rope_dim
        variants = make_variants(original, rank, rope, opts.variants, source=source)
        if use_converter:
            for v in variants:
                if v.key == "mla" and not original.is_mla:
                    v.convert_from = source
        if source is not None:
            for v in variants:
                v.config = v.config.replace(max_seq_len=max(v.config.max_seq_len, longest))
        if any(v.config.is_mla and v.convert_from for v in variants if v.key == "mla"):
            self.notes.append(f"MLA is the original converted by the project's converter (rank {rank} + rope {rope}, "
                              "calibrated on the protocol's calibration range)")
        elif any(v.config.is_mla for v in variants if v.key == "mla"):
            self.notes.append("MLA is built by shape with random weights (same dims as the project's converter "
                              f"would give at rank {rank} + rope {rope}); the converter is not used here")
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        self.copy_gbps = measure_copy_gbps(self.device)
        self.log(f"{PROTOCOL} on {gpu}: copy {self.copy_gbps:.0f} GB/s")
        hf_weight = hf_memory_estimate(original, 0, 0, 0, torch.tensor([], dtype=self.dtype).element_size())
        self._hf_weight_bytes = hf_weight
        total_ticks = len(variants) * (len(opts.grid) + bool(opts.max_batch_context) + bool(opts.prefill_tokens))
        if opts.hf:
            total_ticks += len(opts.grid) + (1 if opts.hf_static else 0)
        bar = None
        if opts.progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=total_ticks, desc=PROTOCOL, unit="row", file=sys.stderr, dynamic_ncols=True,
                           mininterval=0.5 if sys.stderr.isatty() else 10.0)
            except ImportError:
                bar = None
        self._bar = bar
        # transformers right after the MLA variant (or the first one): the headline rows come first
        hf_after = "mla" if any(v.key == "mla" for v in variants) else variants[0].key
        try:
            for variant in variants:
                self._run_variant(variant)
                self._write_partial()
                if opts.hf and variant.key == hf_after:
                    self._run_hf(original)
                    self._write_partial()
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        _add_ratios(self.rows)
        env = dict(torch=torch.__version__)
        try:
            import transformers

            env["transformers"] = transformers.__version__
        except ImportError:
            pass
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
        result = dict(protocol=PROTOCOL, gpu=gpu, device=str(self.device), dtype=opts.dtype, copy_gbps=self.copy_gbps,
                      model=opts.model or opts.preset, steps=opts.steps, warmup=opts.warmup, env=env,
                      compiled=self.compile,
                      options={k: v for k, v in asdict(opts).items() if k != "profile_path"},
                      variants=self.variant_info, rows=self.rows, max_batch=self.max_batch,
                      profiles=self.profiles, notes=self.notes, elapsed_s=self._elapsed())
        result["summary"] = summarize(result)
        self.result = result
        return result

    partial_path: Optional[str] = None

    def _write_partial(self) -> None:
        if self.partial_path:
            try:
                Path(self.partial_path).write_text(json.dumps(dict(protocol=PROTOCOL, partial=True, rows=self.rows,
                                                                   max_batch=self.max_batch), indent=1, default=str))
            except OSError:
                pass


class _BudgetSpent(Exception):
    pass


class _SearchFailed(Exception):
    pass


def _kernel_category(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("mla_decode", "_mla", "flash", "fmha", "attention", "efficient_attention", "cudnn")):
        return "attention"
    if any(k in low for k in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "matmul", "sm90_", "splitk", "cublas")):
        return "matmul"
    if any(k in low for k in ("memcpy", "memset", "copy")):
        return "copy"
    return "other (elementwise, norms, rope, index)"


def run_e2e(opts: E2EOptions, log: Optional[Callable[[str], None]] = None,
            partial_path: Optional[str] = None) -> Dict[str, Any]:
    bench = E2EBench(opts, log)
    bench.partial_path = partial_path
    return bench.run()


# ---------------------------------------------------------------------- reporting
def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    """vs_original: tokens/s over the original's at the same (batch, context), decode rows;
    vs_hf: for mlakit rows, tokens/s over transformers' dynamic-cache row of the same shape."""
    original = {(r["batch"], r["context"]): r["tokens_per_s"] for r in rows
                if r["phase"] == "decode" and r["variant"].endswith("(original)") and r["tokens_per_s"]}
    hf = {(r["batch"], r["context"], r["phase"]): r["tokens_per_s"] for r in rows
          if r["phase"].startswith("hf-") and r["tokens_per_s"]}
    for r in rows:
        key = (r["batch"], r["context"])
        if r["tokens_per_s"] and r["phase"] in ("decode", "hf-dynamic", "hf-static") and original.get(key):
            r["vs_original"] = r["tokens_per_s"] / original[key]
        if r["tokens_per_s"] and r["phase"] == "decode":
            for phase in ("hf-dynamic", "hf-static"):
                if hf.get((*key, phase)):
                    r["vs_" + phase.replace("-", "_")] = r["tokens_per_s"] / hf[(*key, phase)]


def _find(rows, phase, pred):
    return [r for r in rows if r["phase"] == phase and pred(r)]


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    """The issue-6 targets, as far as this run measured them."""
    rows = result["rows"]
    out: Dict[str, Any] = {}
    decode = [r for r in rows if r["phase"] == "decode"]
    orig = [r for r in decode if r["variant"].endswith("(original)")]
    mla = [r for r in decode if r["variant"].startswith("MLA")]
    # MLA vs original at the largest batch both ran (the protocol row is (64, 8192))
    both = sorted({(r["batch"], r["context"]) for r in orig if r["tokens_per_s"]}
                  & {(r["batch"], r["context"]) for r in mla if r["tokens_per_s"]})
    if both:
        b, c = max(both)
        o = next(r for r in orig if (r["batch"], r["context"]) == (b, c))
        m = next(r for r in mla if (r["batch"], r["context"]) == (b, c))
        out["mla_vs_original_decode"] = dict(batch=b, context=c, original=o["tokens_per_s"], mla=m["tokens_per_s"],
                                             ratio=m["tokens_per_s"] / o["tokens_per_s"], target=2.5,
                                             bandwidth_bound_ratio=o["bytes_per_step"] / m["bytes_per_step"])
    mla_only = [(r["batch"], r["context"], r["tokens_per_s"]) for r in mla if r["tokens_per_s"]
                and not any(o["tokens_per_s"] and (o["batch"], o["context"]) == (r["batch"], r["context"]) for o in orig)]
    if mla_only:
        out["mla_only_rows"] = [dict(batch=b, context=c, tokens_per_s=t) for b, c, t in mla_only]
    mb = {m["variant"]: m["max_batch"] for m in result.get("max_batch", []) if m.get("max_batch")}
    o_name = next((m["variant"] for m in result.get("max_batch", []) if m["variant"].endswith("(original)")), None)
    m_name = next((m["variant"] for m in result.get("max_batch", []) if m["variant"].startswith("MLA")), None)
    if o_name and m_name and mb.get(o_name) and mb.get(m_name):
        out["max_batch_ratio"] = dict(context=result["max_batch"][0]["context"], original=mb[o_name], mla=mb[m_name],
                                      ratio=mb[m_name] / mb[o_name], target=3.5)
    b1 = [r for r in decode if r["batch"] == 1 and r.get("bw_fraction") is not None]
    if b1:
        ctx = min(r["context"] for r in b1)
        out["batch1_bandwidth_fraction"] = {r["variant"]: r["bw_fraction"] for r in b1 if r["context"] == ctx}
        out["batch1_bandwidth_context"] = ctx
        out["batch1_bandwidth_target"] = 0.8
    vs_hf = {}
    for r in orig:
        for phase in ("hf_dynamic", "hf_static"):
            if r.get("vs_" + phase):
                vs_hf.setdefault(phase, []).append(dict(batch=r["batch"], context=r["context"],
                                                        ratio=r["vs_" + phase]))
    if vs_hf:
        out["original_vs_transformers"] = vs_hf
    return out


def _fmt(value, spec: str, empty: str = "") -> str:
    return empty if value is None else format(value, spec)


def format_table(result: Dict[str, Any]) -> str:
    """Markdown: a header naming protocol and device, the main table, max batch, targets."""
    env = result.get("env", {})
    lines = [
        f"{result['protocol']} on {result['gpu']} ({result['dtype']}, copy {result['copy_gbps']:.0f} GB/s, "
        f"model {result['model']}, {result['steps']} timed steps, "
        f"decode step: {'CUDA graph' if result['device'].startswith('cuda') else 'eager'}"
        f"{' + torch.compile blocks' if result.get('compiled') else ''}, torch {env.get('torch', '?')}"
        + (f", transformers {env['transformers']}" if "transformers" in env else "") + ")",
        "",
        "| phase | variant | batch | context | tok/s | ms/step | KV bytes/token | peak GiB | % of BW limit "
        "| vs original | vs transformers (dynamic) | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        status = r["status"]
        tps = _fmt(r.get("tokens_per_s"), ".1f", status if status != "ok" else "")
        lines.append(
            f"| {r['phase']} | {r['variant']} | {r['batch']} | {r['context']} | {tps} | {_fmt(r.get('ms_per_step'), '.2f')} "
            f"| {_fmt(r.get('kv_bytes_per_token'), 'd')} | {_fmt(r.get('peak_gib'), '.1f')} "
            f"| {_fmt(None if r.get('bw_fraction') is None else 100 * r['bw_fraction'], '.0f')} "
            f"| {_fmt(r.get('vs_original'), '.2f')} | {_fmt(r.get('vs_hf_dynamic'), '.1f')} "
            f"| {r.get('note', '') if status != 'ok' or r['phase'] != 'decode' else ''} |")
    if result.get("max_batch"):
        lines += ["", f"Largest batch at context {result['max_batch'][0]['context']} (estimated from free memory, "
                      "verified by building the engine and decoding):", "",
                  "| variant | KV bytes/token | MiB per sequence | free GiB | estimate | largest batch | tries | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for m in result["max_batch"]:
            tries = " ".join(f"{b}{'' if ok else '(OOM)'}" for b, ok in m.get("tries", []))
            lines.append(f"| {m['variant']} | {m['kv_bytes_per_token']} | {m['bytes_per_sequence'] / 2**20:.1f} "
                         f"| {m['free_gib']:.1f} | {_fmt(m.get('estimate'), 'd')} | {_fmt(m.get('max_batch'), 'd')} "
                         f"| {tries} | {m.get('note', '')} |")
    s = result.get("summary", {})
    lines += ["", "Targets of issue 6 (this run):", ""]
    if "mla_vs_original_decode" in s:
        t = s["mla_vs_original_decode"]
        lines.append(f"- MLA vs original decode at ({t['batch']}, {t['context']}): {t['mla']:.1f} vs {t['original']:.1f} "
                     f"tok/s = {t['ratio']:.2f}x (target >= {t['target']}x at (64, 8192); if both ran at the "
                     f"bandwidth limit: {t['bandwidth_bound_ratio']:.2f}x)")
    for r in s.get("mla_only_rows", []):
        lines.append(f"- MLA runs where the original does not: ({r['batch']}, {r['context']}) {r['tokens_per_s']:.1f} tok/s")
    if "max_batch_ratio" in s:
        t = s["max_batch_ratio"]
        lines.append(f"- largest batch at context {t['context']}: MLA {t['mla']} vs original {t['original']} = "
                     f"{t['ratio']:.2f}x (target >= {t['target']}x)")
    if "batch1_bandwidth_fraction" in s:
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["batch1_bandwidth_fraction"].items())
        lines.append(f"- batch 1, context {s['batch1_bandwidth_context']}: fraction of the bandwidth limit {parts} "
                     "(target >= 80%)")
    for phase, items in s.get("original_vs_transformers", {}).items():
        parts = ", ".join(f"({i['batch']}, {i['context']}) {i['ratio']:.1f}x" for i in items)
        lines.append(f"- original vs transformers generate ({phase.replace('hf_', '')} cache): {parts}")
    hf_rows = [r for r in result["rows"] if r["phase"].startswith("hf-")]
    if hf_rows and not any(r["phase"] == "hf-static" for r in hf_rows):
        lines.append("- transformers with its static cache: not run (--hf-static; generate compiles for minutes)")
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def write_plots(result: Dict[str, Any], directory: str) -> List[str]:
    """Two PNGs a user would rather look at than read: decode tokens/s and peak memory,
    each against context (batch 1) and against batch (at the grid's most common
    context), one line per variant, transformers dashed, OOM rows as an x on the
    bottom edge; the memory figure adds the largest batch per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r["phase"] in ("decode", "hf-dynamic", "hf-static")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {v: (("0.35" if "static" in v else "0.55", "--") if v.startswith("transformers")
                 else (colors[i % len(colors)], "-")) for i, v in enumerate(variants)}
    total_gib = None
    if result.get("device", "").startswith("cuda") and torch.cuda.is_available():
        total_gib = torch.cuda.get_device_properties(torch.device(result["device"])).total_memory / GIB
    small_batch = min((r["batch"] for r in rows), default=1)
    contexts = [r["context"] for r in rows]
    common_ctx = max(set(contexts), key=contexts.count) if contexts else 0
    panels = [("batch", small_batch, "context", f"batch {small_batch}: against context"),
              ("context", common_ctx, "batch", f"context {common_ctx}: against batch")]
    title = f"{result['protocol']}: {result['model']} on {result['gpu']}"
    mbs = [m for m in result.get("max_batch", []) if m.get("max_batch")]
    paths = []
    for key, ylabel, fname in (("tokens_per_s", "decode tokens/s (all sequences)", "e2e_throughput.png"),
                               ("peak_gib", "peak GPU memory (GiB)", "e2e_memory.png")):
        n_panels = 2 + (1 if key == "peak_gib" and mbs else 0)
        fig, axes = plt.subplots(1, n_panels, figsize=(5.6 * n_panels, 4.8), squeeze=False)
        for ax, (fixed, value, xkey, subtitle) in zip(axes[0], panels):
            for variant in variants:
                pts = sorted(((r[xkey], r.get(key), r["status"]) for r in rows
                              if r["variant"] == variant and r[fixed] == value), key=lambda t: t[0])
                good = [(x, y) for x, y, st in pts if st == "ok" and y is not None]
                bad = [x for x, y, st in pts if st == "OOM"]
                color, ls = style[variant]
                if good:
                    ax.plot([x for x, _ in good], [y for _, y in good], ls, marker="o", color=color, label=variant)
                if bad:
                    ax.scatter(bad, [0.03] * len(bad), transform=ax.get_xaxis_transform(), marker="x", color=color,
                               s=70, label=None if good else f"{variant} (OOM)", clip_on=False)
            if key == "peak_gib" and total_gib:
                ax.axhline(total_gib, color="k", lw=0.8, ls=":", label=f"device {total_gib:.0f} GiB")
            ax.set_xscale("log", base=2)
            xs = [r[xkey] for r in rows if r[fixed] == value]
            if xs:
                ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)
            if key == "tokens_per_s" and any(line.get_xydata().size for line in ax.get_lines()):
                ax.set_yscale("log")
            ax.set_xlabel(f"{xkey} (x = out of memory)")
            ax.set_ylabel(ylabel)
            ax.set_title(subtitle, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            if not any(r.get(key) is not None for r in rows):
                ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
        if n_panels == 3:
            ax = axes[0][2]
            names = [m["variant"] for m in mbs]
            ax.bar(range(len(mbs)), [m["max_batch"] for m in mbs],
                   color=[style[n][0] if n in style else "C0" for n in names])
            for i, m in enumerate(mbs):
                ax.text(i, m["max_batch"], str(m["max_batch"]), ha="center", va="bottom")
            ax.set_xticks(range(len(mbs)), names, rotation=15, fontsize=8)
            ax.set_ylabel("largest batch that fits")
            ax.set_title(f"largest batch at context {mbs[0]['context']}", fontsize=10)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------- CLI
def _parse_grid(text: str) -> List[Tuple[int, int]]:
    grid = []
    try:
        for item in text.split(","):
            batch, context = item.lower().split("x")
            grid.append((int(batch), int(context)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be BATCHxCONTEXT pairs like 1x8192,16x8192, got {text!r}") from None
    return grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a model to load (name or path, as `mlakit generate` takes); default: --preset")
    parser.add_argument("--preset", "--shape", dest="preset", default="llama3-8b",
                        help=f"shape with random weights: {', '.join([*PRESETS, *SHAPES])} (default llama3-8b)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (a smoke run: host timers)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) | float16 | float32 (default on cpu)")
    parser.add_argument("--grid", type=_parse_grid, default=None,
                        help="comma-separated BATCHxCONTEXT (default the protocol's 1x8192,1x32768,16x8192,64x8192)")
    parser.add_argument("--variants", default=",".join(VARIANT_KEYS),
                        help=f"comma-separated, run in this order: {','.join(VARIANT_KEYS)}")
    parser.add_argument("--mla-rank", type=int, default=None, help="kv_lora_rank of the MLA variant (default 512)")
    parser.add_argument("--mla-rope", type=int, default=None, help="qk_rope_head_dim of the MLA variant (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per row (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per row (the first captures the graph)")
    parser.add_argument("--max-batch-context", type=int, default=None,
                        help="context of the largest-batch search (default 32768; 0 skips it)")
    parser.add_argument("--prefill-tokens", type=int, default=None,
                        help="prompt length of the prefill row (default 8192; 0 skips it)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    parser.add_argument("--hf-static", action="store_true",
                        help="also transformers with cache_implementation='static' at batch 1 (compiles: minutes)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="pretend the device holds this much (the largest-batch search on the CPU)")
    parser.add_argument("--headroom-gib", type=float, default=1.5,
                        help="memory kept free for activations when estimating the largest batch (default 1.5)")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip remaining rows once this is spent")
    parser.add_argument("--json", metavar="PATH", help="write the whole result as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to a file")
    parser.add_argument("--plot-dir", metavar="DIR", help="write e2e_throughput.png and e2e_memory.png here")
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help="append a per-kernel profile of one eager decode step per variant (CUDA)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the decode step's blocks (default on CUDA; compiling takes ~1 min per variant)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks (CUDA graph only)")
    parser.add_argument("--mla-from", choices=("auto", "converter", "shape"), default="auto",
                        help="the MLA variant: converted from MODEL by `mlakit convert`'s method (default when a "
                             "MODEL is named; 50%% KV saving unless --mla-rank/--mla-rope), or built by shape with "
                             "random weights (default for a preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> E2EOptions:
    device = args.device or "cuda"
    shape = SHAPES.get(args.preset, {})
    return E2EOptions(
        model=args.model, preset=args.preset, device=device,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
        grid=args.grid or shape.get("grid", DEFAULT_GRID),
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        mla_rank=args.mla_rank, mla_rope=args.mla_rope, steps=args.steps, warmup=args.warmup,
        max_batch_context=(shape.get("max_batch_context", DEFAULT_MAX_BATCH_CONTEXT)
                           if args.max_batch_context is None else (args.max_batch_context or None)),
        prefill_tokens=(shape.get("prefill_tokens", DEFAULT_PREFILL_TOKENS)
                        if args.prefill_tokens is None else (args.prefill_tokens or None)),
        hf=not args.no_hf, hf_static=args.hf_static, memory_budget_gib=args.memory_budget_gib,
        headroom_gib=args.headroom_gib, time_budget_s=args.time_budget_s, seed=args.seed,
        progress=not args.no_progress, profile_path=args.profile, compile=args.compile, mla_from=args.mla_from,
    )


def write_outputs(result: Dict[str, Any], json_path: Optional[str] = None, markdown_path: Optional[str] = None,
                  plot_dir: Optional[str] = None) -> str:
    table = format_table(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    if markdown_path:
        Path(markdown_path).write_text(table + "\n")
    if plot_dir:
        result["plots"] = write_plots(result, plot_dir)
    return table


def run_from_args(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise MlakitError(f"{PROTOCOL} times a whole model on a CUDA GPU; none is visible "
                          "(try --device cpu --preset tiny for a smoke run)")
    result = run_e2e(opts, log=None if opts.progress else (lambda msg: print(msg, file=sys.stderr, flush=True)))
    table = write_outputs(result, None, args.markdown, args.plot_dir)
    if args.json:  # after the plots, so their paths are in it
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(table)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mlakit bench e2e", description=f"{PROTOCOL}: whole-model decode")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
