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

``--tensor-parallel`` (under ``torchrun --nproc-per-node N``): every rank builds the same
variant (same seed), ``mlakit.parallel.parallelize_for_decode`` splits it over the job's
mesh before the engine is made, and every rank runs the same rows; rank 0 reports. The
rows are per rank: KV bytes per token, ``cache_bytes_per_rank``, weight bytes and the
bandwidth fraction count what one rank holds and reads (MLA: the whole latent cache,
replicated on each rank). A variant whose heads do not split (MQA on 2 ranks) is skipped;
so are transformers' baseline, the largest-batch search and ``--profile`` (docs/distributed.md).
"""


from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mlakit.bench.args import parse_grid
from mlakit.bench.hf_baseline import run_hf_baseline
from mlakit.bench.kernel_profile import profile_decode_step
from mlakit.bench.memory import (GIB, BudgetSpent, SearchFailed, device_free_bytes, estimate_max_batch, free_memory,
                                 oom_message, peak_gib, reset_peak, search_max_batch)
from mlakit.bench.report import add_ratios, summarize, write_outputs
from mlakit.bench import tensor_parallel
from mlakit.bench.rows import RowRecorder, new_row
from mlakit.bench.timing import Timer, bandwidth_fraction, device_name, measure_copy_gbps
from mlakit.bench.variants import (SHAPES, VARIANT_KEYS, Variant, build_random_model, fill_cache_random,
                                   make_variants, parse_dtype, resolve_shape, weight_bytes, weight_bytes_per_step)
from mlakit.config import PRESETS, ModelConfig
from mlakit.errors import MlakitError

PROTOCOL = "decode-e2e-v1"
DEFAULT_GRID: Tuple[Tuple[int, int], ...] = ((1, 8192), (1, 32768), (16, 8192), (64, 8192))
DEFAULT_MAX_BATCH_CONTEXT = 32768
DEFAULT_PREFILL_TOKENS = 8192


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
    tensor_parallel: bool = False  # under torchrun: the job of ``E2EBench(job=...)``; rows per rank


# ---------------------------------------------------------------------- the run
class E2EBench(RowRecorder):
    """One decode-e2e-v1 run; ``run()`` returns the result dict (also kept as ``self.result``)."""

    partial_path: Optional[str] = None  # where the rows so far are written after each variant

    def __init__(self, opts: E2EOptions, log: Optional[Callable[[str], None]] = None, job=None) -> None:
        if opts.tensor_parallel and job is None:
            raise MlakitError("--tensor-parallel runs under torchrun: "
                              "torchrun --nproc-per-node N -m mlakit bench e2e ...")
        self.job = job if opts.tensor_parallel else None  # a mlakit.parallel.Distributed
        device = torch.device(self.job.device if self.job is not None else opts.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MlakitError(f"{PROTOCOL} on cuda needs a CUDA GPU (use --device cpu for a smoke run)")
        if self.job is not None and not self.job.is_main:
            log = lambda msg: None  # noqa: E731 (rank 0 alone logs and draws the progress bar)
        super().__init__(device, opts.time_budget_s, log)
        self.opts = opts
        self.dtype = parse_dtype(opts.dtype)
        self.compile = self.device.type == "cuda" if opts.compile is None else opts.compile
        self.timer = Timer(self.device)
        self.max_batch: List[Dict[str, Any]] = []
        self.variant_info: List[Dict[str, Any]] = []
        self.profiles: List[Dict[str, Any]] = []
        self.copy_gbps: Optional[float] = None

    # ------------------------------------------------------------ models and engines
    def _model(self, variant: Variant):
        if variant.convert_from is not None:
            return self._converted_model(variant)
        if variant.source is not None:
            from mlakit.loading import load

            model = load(variant.source, dtype=self.dtype, device=str(self.device)).model
            model.requires_grad_(False)
        else:
            model = build_random_model(variant.config, self.device, self.dtype, seed=self.opts.seed)
        if self.job is not None:  # the same weights on every rank, split before the engine is made
            from mlakit.parallel import parallelize_for_decode

            parallelize_for_decode(model, self.job.mesh)
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

    def _decode_inputs(self, model, batch: int, context: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(random tokens [b], positions [b] all at ``context - 1``)."""
        gen = torch.Generator(device="cpu").manual_seed(self.opts.seed)
        tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=gen).to(self.device)
        positions = torch.full((batch,), context - 1, dtype=torch.long, device=self.device)
        return tokens, positions

    # ------------------------------------------------------------ rows
    def _decode_row(self, model, variant: Variant, batch: int, context: int, steps: int,
                    phase: str = "decode") -> Dict[str, Any]:
        reset_peak(self.device)
        engine = self._engine(model, batch, context)
        fill_cache_random(engine.cache, context, seed=self.opts.seed + 1)
        tokens, positions = self._decode_inputs(model, batch, context)
        for _ in range(max(1, self.opts.warmup)):  # the first captures the CUDA graph
            engine.decode(tokens, positions)
        times, mean_ms = self.timer.per_call(lambda: engine.decode(tokens, positions), steps)
        ms = statistics.median(times)
        kv_bpt = engine.cache.bytes_per_token()
        nbytes = weight_bytes_per_step(model, batch) + batch * context * kv_bpt
        row = new_row(phase, variant.name, batch, context, tokens_per_s=batch / (ms * 1e-3), ms_per_step=ms,
                      mean_ms_per_step=mean_ms, kv_bytes_per_token=kv_bpt, peak_gib=peak_gib(self.device),
                      bytes_per_step=nbytes, bw_limit_ms=nbytes / (self.copy_gbps * 1e9) * 1e3,
                      bw_fraction=bandwidth_fraction(nbytes, self.copy_gbps, ms),
                      cuda_graph=engine.cuda_graph,
                      **tensor_parallel.row_fields(self.job, model, batch * context * kv_bpt))
        del engine
        return row

    def _prefill_row(self, model, variant: Variant, tokens_n: int, mode: str = "naive") -> Dict[str, Any]:
        reset_peak(self.device)
        engine = self._engine(model, 1, tokens_n, prefill_mode=mode)
        gen = torch.Generator(device="cpu").manual_seed(self.opts.seed)
        tokens = torch.randint(0, model.config.vocab_size, (1, tokens_n), generator=gen).to(self.device)
        lengths = torch.tensor([tokens_n], device=self.device)
        engine.prefill(tokens, lengths)  # warm-up
        times, _ = self.timer.per_call(lambda: engine.prefill(tokens, lengths), max(1, self.opts.prefill_reps))
        ms = statistics.median(times)
        row = new_row("prefill", variant.name, 1, tokens_n, tokens_per_s=tokens_n / (ms * 1e-3), ms_per_step=ms,
                      kv_bytes_per_token=engine.cache.bytes_per_token(), peak_gib=peak_gib(self.device),
                      note=(f"one prompt, {'un-absorbed (naive)' if mode == 'naive' else 'absorbed'} MLA"
                            if variant.config.is_mla else "one prompt"),
                      **({"tensor_parallel": self.job.world_size} if self.job is not None else {}))
        del engine
        return row

    # ------------------------------------------------------------ largest batch
    def _free_bytes(self, model) -> int:
        """Free memory for caches: the device's, or the budget less the weights."""
        if self.opts.memory_budget_gib is not None:
            return int(self.opts.memory_budget_gib * GIB) - weight_bytes(model)
        if self.device.type == "cuda":
            return device_free_bytes(self.device)
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
        if self.over_budget():
            record["note"] = "time budget spent"
            return
        estimate = estimate_max_batch(free, per_seq, int(self.opts.headroom_gib * GIB))
        if self.opts.memory_budget_gib is None and self.device.type == "cpu":
            estimate = 0
        record["estimate"] = estimate
        timed: Dict[int, Dict[str, Any]] = {}

        def fits(batch: int) -> bool:
            row = self.guard(lambda: self._decode_row(model, variant, batch, context, self.opts.max_batch_steps,
                                                      phase="decode@max-batch"),
                             "decode@max-batch", variant.name, batch, context)
            timed[batch] = row
            if row["status"] == "ok":
                return True
            if row["status"] == "OOM":
                self.rows.remove(row)  # a failed try is part of the search, not a result row
                return False
            if row["status"] == "error":
                raise SearchFailed(row["note"])
            raise BudgetSpent()

        try:
            best, tries = search_max_batch(estimate, fits)
        except BudgetSpent:
            best, tries = 0, [(b, False) for b in timed]
            record["note"] = "time budget spent"
        except SearchFailed as exc:
            best, tries = 0, [(b, False) for b in timed]
            record["note"] = f"error: {exc}"
        record.update(max_batch=best, tries=tries)
        self.log(f"max batch   {variant.name:<20s} ctx={context}: {best} (estimate {estimate}, tries {tries})")

    # ------------------------------------------------------------ profile
    def _profile(self, model, variant: Variant, batch: int, context: int) -> None:
        """Per-kernel GPU time of one eager decode step, appended to ``profile_path``."""
        path = self.opts.profile_path
        if not path or self.device.type != "cuda" or self.over_budget():
            return
        try:
            engine = self._engine(model, batch, context, cuda_graph=False)
            fill_cache_random(engine.cache, context, seed=self.opts.seed + 1)
            tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
            positions = torch.full((batch,), context - 1, dtype=torch.long, device=self.device)
            prof = profile_decode_step(engine, tokens, positions, path=path,
                                       title=f"{variant.name} eager decode step, batch {batch}, context {context}")
            self.log(f"profile     {variant.name:<20s} b={batch} ctx={context}: {prof['kernels']} kernels, "
                     f"{prof['kernel_ms']:.2f} ms ({prof['summary']})")
            self.profiles.append(dict(variant=variant.name, batch=batch, context=context, kernels=prof["kernels"],
                                      kernel_ms=prof["kernel_ms"], by_category_ms=prof["by_category_ms"]))
            del engine
        except Exception as exc:  # diagnostics never stop the bench
            self.log(f"profile of {variant.name} failed: {type(exc).__name__}: {exc}")
        free_memory(self.device)

    # ------------------------------------------------------------ one variant
    def _describe(self, variant: Variant, model) -> Dict[str, Any]:
        if variant.source:
            weights = "loaded " + variant.source
        elif variant.convert_from:
            weights = f"converted from {variant.convert_from} by mlakit.convert ({self._convert_seconds:.0f} s)"
        else:
            weights = "random normal"
        return dict(key=variant.key, name=variant.name, config=variant.config.to_dict(), weights=weights,
                    parameters=sum(p.numel() for p in model.parameters()), weight_gib=weight_bytes(model) / GIB,
                    kv_bytes_per_token=model.new_cache(1, 1).bytes_per_token())

    def _tp_skip(self, variant: Variant) -> bool:
        """Under --tensor-parallel, a variant whose heads or MLP do not split: skipped rows."""
        why = None if self.job is None else tensor_parallel.split_error(self.job, variant.config)
        for batch, context in self.opts.grid if why else ():
            self.emit(new_row("decode", variant.name, batch, context, status="skipped", note=why))
            self.tick("skipped")
        return why is not None

    def _run_variant(self, variant: Variant) -> None:
        opts = self.opts
        if self._tp_skip(variant):
            return
        self.log(f"== {variant.name}: building ({'loaded ' + variant.source if variant.source else 'random weights'})")
        model = None
        try:
            model = self._model(variant)
        except torch.OutOfMemoryError as exc:
            msg = oom_message(exc)
        if model is None:
            free_memory(self.device, collect=True)
            for batch, context in opts.grid:
                self.emit(new_row("decode", variant.name, batch, context, status="OOM", note="model: " + msg))
                self.tick("oom")
            return
        self.variant_info.append(self._describe(variant, model))
        for batch, context in opts.grid:
            self.guard(lambda: self._decode_row(model, variant, batch, context, opts.steps),
                       "decode", variant.name, batch, context)
            self.tick(f"{variant.name} {batch}x{context}")
        if opts.profile_path and self.job is None:
            batch, context = min(opts.grid)
            self._profile(model, variant, batch, context)
        if opts.max_batch_context and self.job is None:
            self._max_batch(model, variant, opts.max_batch_context)
            self.tick(f"{variant.name} max batch")
        if opts.prefill_tokens:
            self.guard(lambda: self._prefill_row(model, variant, opts.prefill_tokens),
                       "prefill", variant.name, 1, opts.prefill_tokens)
            if variant.config.is_mla:  # what the engine's choice of the naive form for prefill rests on
                self.guard(lambda: self._prefill_row(model, variant, opts.prefill_tokens, mode="absorbed"),
                           "prefill", variant.name, 1, opts.prefill_tokens)
            self.tick(f"{variant.name} prefill")
        del model
        free_memory(self.device, collect=True)

    # ------------------------------------------------------------ main
    def _plan(self) -> Tuple[ModelConfig, List[Variant]]:
        """The original's config (max_seq_len raised to the longest row) and the variants to run."""
        opts = self.opts
        original, (rank, rope), source = resolve_shape(opts.model, opts.preset)
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
        if self.job is not None:
            self.notes += tensor_parallel.notes(self.job, opts)
        return original, variants

    def run(self) -> Dict[str, Any]:
        opts = self.opts
        original, variants = self._plan()
        gpu = device_name(self.device)
        self.copy_gbps = measure_copy_gbps(self.device)
        self.log(f"{PROTOCOL} on {gpu}: copy {self.copy_gbps:.0f} GB/s")
        searches = bool(opts.max_batch_context) and self.job is None
        total_ticks = len(variants) * (len(opts.grid) + searches + bool(opts.prefill_tokens))
        if opts.hf and self.job is None:
            total_ticks += len(opts.grid) + (1 if opts.hf_static else 0)
        if opts.progress and (self.job is None or self.job.is_main):
            self.start_progress(total_ticks, PROTOCOL)
        # transformers right after the MLA variant (or the first one): the headline rows come first
        hf_after = "mla" if any(v.key == "mla" for v in variants) else variants[0].key
        try:
            for variant in variants:
                self._run_variant(variant)
                self._write_partial()
                if opts.hf and variant.key == hf_after and self.job is None:
                    run_hf_baseline(self, original, opts.grid, opts.hf_steps or opts.steps, self.dtype, self.timer,
                                    static=opts.hf_static, seed=opts.seed)
                    self._write_partial()
        finally:
            self.close_progress()
        add_ratios(self.rows)
        result = dict(protocol=PROTOCOL, gpu=gpu, device=str(self.device), dtype=opts.dtype, copy_gbps=self.copy_gbps,
                      model=opts.model or opts.preset, steps=opts.steps, warmup=opts.warmup, env=_versions(),
                      compiled=self.compile,
                      options={k: v for k, v in asdict(opts).items() if k != "profile_path"},
                      variants=self.variant_info, rows=self.rows, max_batch=self.max_batch,
                      profiles=self.profiles, notes=self.notes, elapsed_s=self.elapsed())
        if self.job is not None:  # only then: one process's JSON keeps its keys
            result["tensor_parallel"] = dict(world_size=self.job.world_size, device=self.job.device,
                                             backend="nccl" if self.device.type == "cuda" else "gloo")
        result["summary"] = summarize(result)
        self.result = result
        return result

    def _write_partial(self) -> None:
        if self.partial_path and (self.job is None or self.job.is_main):
            try:
                Path(self.partial_path).write_text(json.dumps(dict(protocol=PROTOCOL, partial=True, rows=self.rows,
                                                                   max_batch=self.max_batch), indent=1, default=str))
            except OSError:
                pass


def _versions() -> Dict[str, str]:
    """torch, transformers and triton versions, where installed."""
    env = dict(torch=torch.__version__)
    for name in ("transformers", "triton"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    return env


def run_e2e(opts: E2EOptions, log: Optional[Callable[[str], None]] = None,
            partial_path: Optional[str] = None, job=None) -> Dict[str, Any]:
    """One run; ``job`` (``mlakit.parallel.init``'s) with ``opts.tensor_parallel``."""
    bench = E2EBench(opts, log, job=job)
    bench.partial_path = partial_path
    return bench.run()


# ---------------------------------------------------------------------- CLI
def register(subparsers) -> argparse.ArgumentParser:
    """Add ``e2e`` to the ``mlakit bench`` benchmarks (``mlakit.bench.cli.run_from_args`` runs it)."""
    parser = subparsers.add_parser(
        "e2e", help="decode-e2e-v1: whole model, MHA/GQA/MQA/MLA decode and prefill",
        description="decode-e2e-v1: decode tokens/s, memory and largest batch of a model's "
                    "GQA/MHA/MQA/MLA variants, and transformers' generate, on one CUDA GPU.")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a model to load (name or path, as `mlakit generate` takes); default: --preset")
    parser.add_argument("--preset", "--shape", dest="preset", default="llama3-8b",
                        help=f"shape with random weights: {', '.join([*PRESETS, *SHAPES])} (default llama3-8b)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu (a smoke run: host timers)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default on cuda) | float16 | float32 (default on cpu)")
    parser.add_argument("--grid", type=parse_grid, default=None,
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
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="under torchrun --nproc-per-node N: each variant split over N GPUs as `mlakit generate "
                             "--tensor-parallel` splits it; rows per rank (MLA: latent cache replicated on each); no "
                             "transformers baseline, largest-batch search or --profile; docs/distributed.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


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
        tensor_parallel=args.tensor_parallel,
    )


def run_from_args(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    job = None
    if opts.tensor_parallel:  # first: without torchrun, one line saying how to start it
        from mlakit import parallel

        job = parallel.join_for_tensor_parallel(opts.device, "bench e2e")  # mutes the other ranks' stdout
    try:
        if opts.device.startswith("cuda") and not torch.cuda.is_available():
            raise MlakitError(f"{PROTOCOL} times a whole model on a CUDA GPU; none is visible "
                              "(try --device cpu --preset tiny for a smoke run)")
        result = run_e2e(opts, log=None if opts.progress else (lambda msg: print(msg, file=sys.stderr, flush=True)),
                         job=job)
        if job is None or job.is_main:
            print(write_outputs(result, args.json, args.markdown, args.plot_dir))
        if job is not None:
            parallel.barrier()  # no rank tears the group down while rank 0 still writes
    finally:
        if job is not None:
            from mlakit import parallel

            parallel.shutdown()
    return 0
