"""``convert``: a GQA-family model -> an MLA model with a smaller KV cache, no training."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mlakit.config import ModelConfig
from mlakit.convert.calibrate import LayerStats, LayerStore, calibrate
from mlakit.convert.factorize import build_layer, plan_layer, rope_spectrum, rotation_expectation
from mlakit.convert.qk_norm import source_attention, split_weights
from mlakit.convert.ranks import (
    DEFAULT_KV_SAVING, RANK_ALLOCATIONS, ROPE_FREQUENCIES, Budget, allocate_ranks, frequency_scores, make_budget,
    select_frequencies,
)
from mlakit.errors import MlakitError
from mlakit.loading import build_model
from mlakit.model import Transformer
from mlakit.rope import rope_inv_freq

DEFAULT_CALIB_TOKENS = 8192
ROPE_SELECTIONS = ("energy", "rotation")
NOPE_ROTATIONS = ("expected", "none")
CONVERTIBLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# free: any budget (--kv-saving / --kv-lora-rank); vllm: kv_lora_rank 512 or 256 with a 64-dim RoPE key in every
# layer, the shapes vLLM's MLA backends take (mlakit.export.engines)
RANK_SHAPES = ("free", "vllm")


@dataclass
class ConvertOptions:
    kv_saving: float | None = None  # fraction of the source's cache saved (default 0.5)
    kv_lora_rank: int | None = None  # explicit budget (with rope_dim)
    rope_dim: int | None = None
    rank_allocation: str = "uniform"
    calib_tokens: int | None = DEFAULT_CALIB_TOKENS  # None: the whole protocol calibration range (32768)
    calib_seq_len: int = 512
    alpha: float = 30.0  # weight of the key (score) error against the value (output) error (measured: 1, 3, 10, 30)
    rope_selection: str = "rotation"  # energy | rotation (energy x what leaving it unrotated costs)
    # free: any (frequency, component) pairs, repeats allowed; deepseek: one component per frequency on an
    # arithmetic progression of frequencies, which stock DeepSeek-V3 engines (and the exports) can represent
    rope_frequencies: str | None = None  # None: "deepseek" with rank_shape "vllm", else "free"
    rank_shape: str = "free"  # free | vllm (RANK_SHAPES)
    nope_rotation: str = "expected"  # expected: E[e^{jθΔ}] folded into NoPE queries; none: plain unrotated
    value_fit: str = "attention"  # attention: value up-projections refit on attention-averaged inputs; pca
    query_weighted: bool = True  # RoPE PCA weighted by query energy
    min_rank_fraction: float = 0.5  # adaptive: no layer gets less than this fraction of the uniform rank
    # hadamard: rotate each block of 32 latent channels (exact; a quantised latent cache loses less:
    # mlakit.convert.rotate); none: the principal-component basis as factorised
    latent_rotation: str = "none"
    batch_size: int = 4
    progress: bool = True
    # keep per-layer statistics in this directory instead of memory (convert_checkpoint uses a temporary one)
    spill_dir: str | None = None

    def __post_init__(self) -> None:
        if self.rope_frequencies is None:
            self.rope_frequencies = "deepseek" if self.rank_shape == "vllm" else "free"

    def check(self) -> None:
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise MlakitError(f"--rank-allocation must be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}")
        if self.rope_frequencies not in ROPE_FREQUENCIES:
            raise MlakitError(f"--rope-frequencies must be one of {ROPE_FREQUENCIES}, got {self.rope_frequencies!r}")
        if self.rope_selection not in ROPE_SELECTIONS:
            raise MlakitError(f"rope selection must be one of {ROPE_SELECTIONS}")
        if self.nope_rotation not in NOPE_ROTATIONS:
            raise MlakitError(f"nope rotation must be one of {NOPE_ROTATIONS}")
        if self.alpha <= 0:
            raise MlakitError("alpha must be positive")
        from mlakit.convert.rotate import ROTATIONS

        if self.latent_rotation not in ROTATIONS:
            raise MlakitError(f"--latent-rotation must be one of {', '.join(ROTATIONS)}, got {self.latent_rotation!r}")
        if self.rank_shape not in RANK_SHAPES:
            raise MlakitError(f"--rank-shape must be one of {RANK_SHAPES}, got {self.rank_shape!r}")
        if self.rank_shape == "vllm":
            self._check_vllm()

    def _check_vllm(self) -> None:
        from mlakit.export.engines import VLLM_SHAPES

        ranks = sorted({r for r, _ in VLLM_SHAPES}, reverse=True)
        rope = VLLM_SHAPES[0][1]
        if self.kv_saving is not None:
            raise MlakitError(f"--rank-shape vllm sets the budget (kv_lora_rank {' or '.join(map(str, ranks))} + "
                              f"RoPE {rope}); give no --kv-saving")
        if self.kv_lora_rank is not None and self.kv_lora_rank not in ranks:
            raise MlakitError(f"--rank-shape vllm takes --kv-lora-rank {' or '.join(map(str, ranks))}, "
                              f"got {self.kv_lora_rank}")
        if self.rope_dim is not None and self.rope_dim != rope:
            raise MlakitError(f"--rank-shape vllm takes --rope-dim {rope} (vLLM's head sizes: "
                              f"{', '.join(f'{r} + {rope}' for r in ranks)}), got {self.rope_dim}")
        if self.rank_allocation != "uniform":
            raise MlakitError("--rank-shape vllm needs --rank-allocation uniform (vLLM has one kv_lora_rank "
                              "for all layers)")
        if self.rope_frequencies != "deepseek":
            raise MlakitError("--rank-shape vllm needs --rope-frequencies deepseek (stock DeepSeek engines rotate "
                              "the RoPE key with one frequency per pair)")


@dataclass
class ConvertSummary:
    source_values_per_token_layer: int
    values_per_token_layer: float
    kv_saving: float  # against the source's own cache
    rope_dim: int
    ranks: list[int]
    rope_freq_indices: list[int]
    calib_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        ranks = self.ranks
        rank_text = str(ranks[0]) if len(set(ranks)) == 1 else f"{min(ranks)}..{max(ranks)} per layer: {ranks}"
        return [
            f"budget      {self.values_per_token_layer:g} values/token/layer (source {self.source_values_per_token_layer}),"
            f" KV saving {100 * self.kv_saving:.1f}%",
            f"rope dim    {self.rope_dim} (frequencies {self.rope_freq_indices})",
            f"latent rank {rank_text}",
            f"calibration {self.calib_tokens} tokens",
            "time        " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
        ]


def check_source(config: ModelConfig) -> None:
    if config.is_mla:
        raise MlakitError("the source is already an MLA model")
    if config.arch not in CONVERTIBLE:
        raise MlakitError(f"converting {config.arch!r} models is not supported (supported: {', '.join(CONVERTIBLE)})")
    if config.head_dim % 2:
        raise MlakitError("head_dim must be even")


def resolve_budget(config: ModelConfig, options: ConvertOptions) -> Budget:
    if options.rank_shape == "vllm":
        return vllm_budget(config, options.kv_lora_rank)
    return make_budget(config.n_kv_heads, config.head_dim, options.kv_saving, options.kv_lora_rank, options.rope_dim)


def vllm_budget(config: ModelConfig, kv_lora_rank: int | None = None) -> Budget:
    """``--rank-shape vllm``: kv_lora_rank 512 + RoPE 64 where that saves cache against the
    source, else 256 + 64; refused when neither does (or ``kv_lora_rank`` is given and does not)."""
    from mlakit.export.engines import VLLM_SHAPES

    full = 2 * config.n_kv_heads * config.head_dim
    shapes = [(r, p) for r, p in VLLM_SHAPES if kv_lora_rank in (None, r)]
    saving = [(r, p) for r, p in shapes if r + p < full]
    if not saving:
        sizes = " or ".join(f"{r} + {p} = {r + p}" for r, p in shapes)
        raise MlakitError(
            f"--rank-shape vllm: vLLM's MLA shapes ({sizes} values per token per layer) save nothing against this "
            f"model's cache of {full} ({config.n_kv_heads} KV heads x {config.head_dim} x 2); convert with "
            "--kv-saving instead (any shape: transformers and llama.cpp run it)")
    r, p = saving[0]
    if p > config.head_dim:
        raise MlakitError(f"--rank-shape vllm needs a {p}-dim RoPE key of one pair per source frequency: "
                          f"head_dim {config.head_dim} has only {config.head_dim // 2} frequencies")
    from mlakit.export.hf_deepseek import check_exportable

    try:  # what the conversion will be: a DeepSeek-V3 export must exist for vLLM to run it
        check_exportable(config.replace(attention="mla", kv_lora_rank=r, qk_rope_head_dim=p,
                                        qk_nope_head_dim=config.head_dim, v_head_dim=config.head_dim,
                                        q_lora_rank=None, latent_norm=False, query_pre_attn_scalar=None,
                                        qk_rope_freq_indices=list(range(p // 2))))
    except MlakitError as e:
        raise MlakitError(f"--rank-shape vllm: the converted model could not be exported for vLLM: {e}") from None
    return Budget(values_per_layer=r + p, rope_dim=p)


@dataclass
class Analysis:
    """Calibration-dependent, budget-independent work (reused across a sweep)."""
    stats: LayerStore  # LayerStats per layer (on disk with ConvertOptions.spill_dir)
    spectra: LayerStore  # factorize.RopeSpectrum per layer (likewise)
    lams: list[torch.Tensor]  # [d/2, G] per layer: score energy of each RoPE component (the spectra's lam)
    rho: list[torch.Tensor]  # [H, d/2] per layer: E[e^{jθΔ}]
    calib_tokens: int
    seconds: float


def analyse(model: Transformer, tokens: torch.Tensor, options: ConvertOptions) -> Analysis:
    from tqdm.auto import tqdm

    options.check()
    check_source(model.config)
    start = time.perf_counter()
    stats = calibrate(model, tokens, seq_len=options.calib_seq_len, batch_size=options.batch_size,
                      progress=options.progress, store=LayerStore(options.spill_dir, prefix="stats"))
    spectra = LayerStore(options.spill_dir, prefix="spectrum")
    lams, rho = [], []
    for l in tqdm(range(len(stats)), desc="rope spectra", disable=not options.progress, leave=False):
        st = stats[l]
        spectrum = rope_spectrum(source_attention(model.layers[l].attention), st.sigma, options.query_weighted)
        # the RoPE of this layer's type (Gemma 3's sliding layers have their own base)
        inv_freq = rope_inv_freq(model.config, model.config.head_dim, model.config.layer_type(l))
        rho.append(rotation_expectation(st.dist, inv_freq))
        lams.append(spectrum.lam)
        spectra.append(spectrum)
    return Analysis(stats, spectra, lams, rho, st.tokens, time.perf_counter() - start)


def convert_model(model: Transformer, analysis: Analysis, options: ConvertOptions) -> tuple[Transformer, ConvertSummary]:
    """The MLA model at ``options``' budget from a source model and its analysis."""
    from tqdm.auto import tqdm

    options.check()
    config = model.config
    budget = resolve_budget(config, options)
    start = time.perf_counter()
    G, d = config.n_kv_heads, config.head_dim
    weights = None
    if options.rope_selection == "rotation":
        weights = [1 - r.abs().pow(2).mean(0) for r in analysis.rho]  # [d/2] per layer
    scores = frequency_scores(analysis.lams, weights)
    counts = select_frequencies(scores, budget.rope_dim // 2, options.rope_frequencies)

    def plan(l: int, stats: LayerStats):
        rho = analysis.rho[l] if options.nope_rotation == "expected" else None
        return plan_layer(source_attention(model.layers[l].attention), stats.sigma, analysis.spectra[l], counts, rho, options.alpha)

    # Plans are large (the joint metric rows and eigenvectors of a layer), so they are made
    # one layer at a time and dropped after use; adaptive ranks need every layer's
    # spectrum first, so that allocation plans every layer twice.
    n_layers, half = config.n_layers, d // 2
    n_nope = half * G - sum(counts)  # complex components left without rotation
    full_rank = 2 * n_nope + G * d  # the joint NoPE-key/V metric's dimension (plan_layer)
    spectra = None
    if options.rank_allocation != "uniform":
        layers = tqdm(range(n_layers), desc="spectra", disable=not options.progress, leave=False)
        spectra = [plan(l, analysis.stats[l]).spectrum for l in layers]
    ranks = allocate_ranks(spectra, budget.rank, options.rank_allocation, [full_rank] * n_layers,
                           max(1, int(options.min_rank_fraction * budget.rank)))
    if options.rank_shape == "vllm" and set(ranks) != {budget.rank}:  # cannot happen where the shape saves cache
        raise MlakitError(f"--rank-shape vllm: the source holds at most rank {max(ranks)}, not {budget.rank}")
    nope_dim = d if n_nope else 0
    freq_indices = [i for i in range(half) for _ in range(counts[i])]
    mla_config = config.replace(
        attention="mla", kv_lora_rank=ranks[0] if len(set(ranks)) == 1 else ranks, qk_rope_head_dim=budget.rope_dim,
        qk_nope_head_dim=nope_dim, v_head_dim=d, q_lora_rank=None, latent_norm=False,
        qk_rope_freq_indices=freq_indices, query_pre_attn_scalar=None,  # the source's scale is folded into wq
    )
    dtype = model.dtype
    state = {k: v for k, v in model.state_dict().items() if ".attention." not in k}
    for l in tqdm(range(n_layers), desc="factorise", disable=not options.progress, leave=False):
        attn, stats = model.layers[l].attention, analysis.stats[l]
        sigma_attn = stats.sigma_attn if options.value_fit == "attention" else None
        layer = build_layer(source_attention(attn), plan(l, stats), ranks[l], nope_dim, sigma_attn)
        if config.qk_norm:
            layer = split_weights(attn, layer)
        for name, tensor in layer.items():
            if name.endswith(".bias") and not config.qkv_bias:
                continue
            state[f"layers.{l}.attention.{name}"] = tensor.to(dtype)
        state[f"layers.{l}.attention.wo.weight"] = attn.wo.weight.detach()
        if attn.wo.bias is not None:
            state[f"layers.{l}.attention.wo.bias"] = attn.wo.bias.detach()
    mla = build_model(mla_config, state, dtype=dtype, device=model.device)  # shares the non-attention tensors
    full = 2 * G * d
    values = mla_config.kv_values_per_token_total() / config.n_layers
    summary = ConvertSummary(
        source_values_per_token_layer=full, values_per_token_layer=values, kv_saving=1 - values / full,
        rope_dim=budget.rope_dim, ranks=ranks, rope_freq_indices=freq_indices, calib_tokens=analysis.calib_tokens,
        seconds={"calibrate": analysis.seconds, "factorise": time.perf_counter() - start},
    )
    return mla, summary


def convert(model: Transformer, tokens: torch.Tensor, options: ConvertOptions) -> tuple[Transformer, ConvertSummary]:
    """Calibrate ``model`` on ``tokens`` and convert it at ``options``' budget."""
    options.check()
    check_source(model.config)
    resolve_budget(model.config, options)  # bad budgets fail before the calibration
    mla, summary = convert_model(model, analyse(model, tokens, options), options)
    if options.latent_rotation != "none":  # an exact change of the latent's basis (mlakit.convert.rotate)
        from mlakit.convert.rotate import transform_latent

        n = tokens.numel() // options.calib_seq_len * options.calib_seq_len
        transform_latent(mla, options.latent_rotation, tokens[:n].view(-1, options.calib_seq_len))
    return mla, summary


def convert_checkpoint(source: str, out: str | None, options: ConvertOptions, device: str = "cpu",
                       overwrite: bool = False, log=print) -> ConvertSummary:
    """``mlakit convert``: load ``source``, calibrate on the protocol's calibration range,
    convert, and write an mlakit checkpoint to ``out`` (atomically). The whole run holds
    the lock of ``out``, so a second conversion toward it fails at once, not at the end."""
    import contextlib

    from mlakit.io import check_output, output_lock

    options.check()
    with output_lock(out) if out is not None else contextlib.nullcontext():
        if out is not None:
            check_output(out, overwrite, directory=True)
        return _convert_checkpoint(source, out, options, device, overwrite)


def _convert_checkpoint(source: str, out: str | None, options: ConvertOptions, device: str,
                        overwrite: bool) -> ConvertSummary:
    from mlakit.evaluate import calibration_tokens
    from mlakit.io import scratch_dir
    from mlakit.loading import load, save_checkpoint

    start = time.perf_counter()
    loaded = load(source, dtype=torch.float32, device=device)
    check_source(loaded.model.config)
    resolve_budget(loaded.model.config, options)
    tokens = calibration_tokens(loaded.tokenizer, options.calib_tokens)
    load_seconds = time.perf_counter() - start
    with scratch_dir("convert") as spill:  # a killed run's spill directory is removed by the next run
        model, summary = convert(loaded.model, tokens,
                                 options if options.spill_dir else dataclasses.replace(options, spill_dir=str(spill)))
    summary.seconds = {"load": load_seconds, **summary.seconds}
    if out is not None:
        t = time.perf_counter()
        save_checkpoint(model, out, loaded.tokenizer, overwrite=overwrite)
        summary.seconds["save"] = time.perf_counter() - t
    summary.seconds["total"] = time.perf_counter() - start
    return summary
