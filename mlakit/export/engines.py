"""Which stock engines run an MLA model's export, and on which device.

What an engine accepts is decided by the shape the export writes: one
``kv_lora_rank`` for every layer (per-layer ranks are padded to the largest, see
``hf_deepseek``), ``qk_rope_head_dim`` (at least 2) and the number of query heads.
MLA runs in the engines as MQA over the latent cache: the key of that MQA is the
latent plus the RoPE key (``kv_lora_rank + qk_rope_head_dim`` values, vLLM's
"head size"), the value is the latent (``kv_lora_rank``).

The facts, with where they come from:

- transformers ``DeepseekV3ForCausalLM``: any shape, CPU or GPU (measured here:
  ``tests/test_export_hf.py`` loads every supported shape and compares logits).
- vLLM: its MLA backends accept head size 576 (512 + 64) or 320 (256 + 64) only
  (``MLACommonBackend.get_supported_head_sizes``), one ``kv_lora_rank`` for all
  layers; its DeepSeek model code builds no attention biases. From source, not
  measured here.
- FlashMLA (DeepSeek's decode kernel, used by vLLM and SGLang): 576 = 512 + 64 only.
  From source, not measured here.
- llama.cpp CUDA flash attention (``ggml-cuda/fattn.cu`` of the llama.cpp in
  llama-cpp-python 0.3.36): for MLA's K/V head sizes it has kernels for 576/512
  (with at least 2 query heads) and 320/256 (query heads a multiple of 32); for every
  other shape the flash-attention op is not supported on the GPU and the scheduler
  runs it on the CPU (with ``flash_attn`` auto, llama.cpp then turns flash attention
  off; a quantised V cache forces it on). From source, not measured here.
- llama.cpp on the CPU: any shape (measured here: ``tests/test_export_gguf.py``).
- llama.cpp with a quantised cache (``type_k = type_v`` q8_0 / q4_0; MLA models must
  use one type for both, the V cache being a view of the K cache's first
  ``kv_lora_rank`` values): the block size (32) must divide ``kv_lora_rank +
  qk_rope_head_dim`` and ``kv_lora_rank``; V quantised needs flash attention
  (llama.cpp enables it). From source, and measured here on the CPU
  (``tests/test_export_gguf.py``, docs/export.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mlakit.config import ModelConfig
from mlakit.errors import MlakitError

# (kv_lora_rank, qk_rope_head_dim) of the shapes vLLM's MLA backends take: head sizes 576 and 320
VLLM_SHAPES = ((512, 64), (256, 64))
FLASHMLA_SHAPE = (512, 64)
LLAMACPP_QUANT_BLOCK = 32  # q8_0 and q4_0 blocks
MEASURED_HF = "measured here: tests/test_export_hf.py"
MEASURED_GGUF = "measured here: tests/test_export_gguf.py"
FROM_SOURCE = "from source, not measured here"


@dataclass(frozen=True)
class ExportShape:
    """What the export writes: DeepSeek-V3's single ``kv_lora_rank`` and RoPE key."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    n_heads: int
    padded_from: list[int] | None  # per-layer ranks padded to kv_lora_rank (None: one rank already)

    @property
    def head_size(self) -> int:  # vLLM's name: the MQA key over the latent cache
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class EngineFit:
    engine: str
    format: str  # the export that engine reads: hf-deepseek or gguf
    runs: bool
    device: str  # where it runs ("" when it does not)
    detail: str
    evidence: str  # MEASURED_* or FROM_SOURCE

    def line(self) -> str:
        verdict = f"yes, {self.device}" if self.runs else "no"
        return f"{self.engine} ({self.format}): {verdict}: {self.detail} ({self.evidence})"

    def to_dict(self) -> dict:
        return asdict(self)


def export_shape(config: ModelConfig) -> ExportShape:
    if not config.is_mla:
        raise MlakitError(f"engines run MLA exports; this model is {config.gqa_variant} (convert it first)")
    ranks = config.kv_lora_ranks()
    return ExportShape(kv_lora_rank=max(ranks), qk_rope_head_dim=max(config.qk_rope_head_dim, 2),
                       n_heads=config.n_heads, padded_from=ranks if len(set(ranks)) > 1 else None)


def _export_refusal(config: ModelConfig, fmt: str) -> str | None:
    """Why ``mlakit export --format fmt`` refuses this model (None: it exports)."""
    from mlakit.export.hf_deepseek import check_exportable, rope_spec

    try:
        check_exportable(config)
        rope_spec(config)
    except MlakitError as e:
        return str(e)
    if fmt == "gguf" and (config.qkv_bias or config.o_bias):
        return "llama.cpp's deepseek2 has no attention biases"
    return None


def _vllm(config: ModelConfig, shape: ExportShape) -> EngineFit:
    head, r, p = shape.head_size, shape.kv_lora_rank, shape.qk_rope_head_dim
    sizes = " or ".join(f"{a + b} ({a}+{b})" for a, b in VLLM_SHAPES)
    padded = f"; per-layer ranks {shape.padded_from} padded to {r}" if shape.padded_from else ""
    if (r, p) not in VLLM_SHAPES:
        return EngineFit("vLLM", "hf-deepseek", False, "", f"its MLA backends take head size {sizes} only; this "
                         f"export has {head} (kv_lora_rank {r} + rope {p}){padded}", FROM_SOURCE)
    if config.qkv_bias or config.o_bias:
        return EngineFit("vLLM", "hf-deepseek", False, "", f"head size {head} fits, but its DeepSeek code builds no "
                         "attention biases (attention_bias: true)", FROM_SOURCE)
    from mlakit.export.hf_deepseek import rope_spec

    if rope_spec(config).factor != 1.0:
        return EngineFit("vLLM", "hf-deepseek", False, "", f"head size {head} fits, but the export's linear RoPE "
                         "scaling is rewritten by vLLM to its YaRN variant (convert with RoPE frequencies starting "
                         "at the source's first)", FROM_SOURCE)
    return EngineFit("vLLM", "hf-deepseek", True, "GPU", f"head size {head} (kv_lora_rank {r} + rope {p}){padded}; "
                     "heads must divide by --tensor-parallel-size", FROM_SOURCE)


def _flashmla(shape: ExportShape) -> EngineFit:
    r, p = FLASHMLA_SHAPE
    ok = (shape.kv_lora_rank, shape.qk_rope_head_dim) == FLASHMLA_SHAPE
    detail = f"head size {r + p} ({r}+{p}) only" + ("" if ok else f"; this export has {shape.head_size}")
    return EngineFit("FlashMLA (in vLLM / SGLang)", "hf-deepseek", ok, "GPU (Hopper, Blackwell)" if ok else "",
                     detail, FROM_SOURCE)


def _llamacpp_cuda(shape: ExportShape) -> EngineFit:
    k, v, h = shape.head_size, shape.kv_lora_rank, shape.n_heads
    if (k, v) == (576, 512) and h >= 2:
        ok, why = True, f"K/V head sizes 576/512, {h} query heads"
    elif (k, v) == (320, 256) and h % 32 == 0:
        ok, why = True, f"K/V head sizes 320/256 with {h} query heads (a multiple of 32)"
    else:
        ok = False
        why = (f"K/V head sizes {k}/{v}" + (f" need query heads a multiple of 32 (has {h})" if (k, v) == (320, 256)
                                              else " (its MLA kernels: 576/512, or 320/256 with 32k query heads)")
               + ": the flash-attention op runs on the CPU (llama.cpp's auto mode then turns flash attention "
                 "off; a quantised cache keeps it on)")
    return EngineFit("llama.cpp CUDA flash attention", "gguf", ok, "GPU" if ok else "", why, FROM_SOURCE)


def _llamacpp_quant(shape: ExportShape) -> EngineFit:
    b, k, v = LLAMACPP_QUANT_BLOCK, shape.head_size, shape.kv_lora_rank
    bad = [f"{name} {n}" for name, n in (("kv_lora_rank + rope", k), ("kv_lora_rank", v)) if n % b]
    if bad:
        r, p = -(-v // b) * b, -(-shape.qk_rope_head_dim // b) * b
        return EngineFit("llama.cpp quantised cache (q8_0/q4_0)", "gguf", False, "",
                         f"its {b}-value blocks must divide {' and '.join(bad)} (K = latent + RoPE key, V = a view "
                         f"of the latent); export with --quantised-cache to pad to {r} + {p} (exact)",
                         MEASURED_GGUF + " (CPU)")
    return EngineFit("llama.cpp quantised cache (q8_0/q4_0)", "gguf", True, "CPU",
                     f"type_k = type_v (one cache: K = latent + RoPE key, V = a view of it), flash attention on; "
                     f"{k} and {v} are multiples of {b}", MEASURED_GGUF + " (CPU)")


def engines_for(config: ModelConfig) -> list[EngineFit]:
    """Which stock engines run ``mlakit export`` of a model of this config, and on which device."""
    shape = export_shape(config)
    fits: list[EngineFit] = []
    hf_refusal, gguf_refusal = _export_refusal(config, "hf-deepseek"), _export_refusal(config, "gguf")
    if hf_refusal:
        fits.append(EngineFit("transformers, vLLM, SGLang", "hf-deepseek", False, "",
                              f"not exportable: {hf_refusal}", "mlakit export refuses it"))
    else:
        fits.append(EngineFit("transformers DeepseekV3ForCausalLM", "hf-deepseek", True, "CPU or GPU",
                              "any shape", MEASURED_HF))
        fits += [_vllm(config, shape), _flashmla(shape)]
    if gguf_refusal:
        fits.append(EngineFit("llama.cpp", "gguf", False, "", f"not exportable: {gguf_refusal}",
                              "mlakit export refuses it"))
    else:
        fits.append(EngineFit("llama.cpp CPU", "gguf", True, "CPU", "any shape", MEASURED_GGUF))
        fits += [_llamacpp_cuda(shape), _llamacpp_quant(shape)]
    return fits


def engine_lines(config: ModelConfig, fmt: str | None = None) -> list[str]:
    """``engines_for`` as printed lines (only those reading ``fmt`` when given)."""
    return [fit.line() for fit in engines_for(config) if fmt is None or fit.format == fmt]
