"""Model configuration: one dataclass for every decoder-only model mlakit runs.

The attention kind is a property of the model: ``"gqa"`` covers MHA
(``n_kv_heads == n_heads``), GQA and MQA (``n_kv_heads == 1``); ``"mla"`` is
DeepSeek-V2/V3 multi-head latent attention. Configs are saved as JSON beside
the safetensors weights (``mlakit.json``) and loading refuses unknown or
missing keys, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlakit.errors import MlakitError

CONFIG_FILENAME = "mlakit.json"
FORMAT_VERSION = 1

ATTENTION_KINDS = ("gqa", "mla")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names (Gemma 3 `layer_types`)
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama) | GeGLU with tanh GELU (Gemma)


@dataclass
class ModelConfig:
    # --- shape ---
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    # --- details of the source family ---
    arch: str = "llama"  # the family the weights came from: llama | mistral | qwen2 | ...
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF configs.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # bias on the query/key/value projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    sliding_window: int | None = None  # each query of a sliding layer sees at most this many keys
    # Per layer "full_attention" | "sliding_attention" (Gemma 3: 5 local : 1 global). None: every
    # layer alike, sliding exactly when sliding_window is set (Mistral).
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: the global RoPE
    qk_norm: bool = False  # RMSNorm over each head's query and key before RoPE (Qwen3, Gemma 3)
    embedding_scale: float | None = None  # token embeddings are multiplied by this (Gemma: sqrt(dim))
    mlp_activation: str = "silu"  # the gate's activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    sandwich_norms: bool = False  # Gemma: RMSNorm on the attention's and the MLP's outputs too
    query_pre_attn_scalar: float | None = None  # softmax scale 1/sqrt(this) instead of 1/sqrt(qk dim) (Gemma)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # --- attention kind ---
    attention: str = "gqa"
    # MLA (DeepSeek-V2/V3 names). kv_lora_rank may be one int or one int per layer.
    kv_lora_rank: int | list[int] | None = None
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int | None = None
    latent_norm: bool = False  # RMSNorm on the latent (DeepSeek's kv_a_layernorm)
    # Which of the source model's RoPE frequencies (indices into the head_dim // 2
    # frequencies of `rope_inv_freq(head_dim)`) each rotary pair of the shared RoPE
    # key uses; repeats allowed. None: the standard frequencies of qk_rope_head_dim.
    qk_rope_freq_indices: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise MlakitError(f"invalid model config: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "intermediate_size"):
            need(getattr(self, name) > 0, f"{name} must be positive")
        need(self.mlp_activation in MLP_ACTIVATIONS,
             f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}")
        if self.layer_types is not None:
            need(len(self.layer_types) == self.n_layers,
                 f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            need(all(t in LAYER_TYPES for t in self.layer_types), f"layer_types must be in {LAYER_TYPES}")
            need("sliding_attention" not in self.layer_types or self.sliding_window is not None,
                 "sliding_attention layers need sliding_window")
        need(self.sliding_window is None or self.sliding_window >= 1, "sliding_window must be >= 1")
        need(self.query_pre_attn_scalar is None or self.query_pre_attn_scalar > 0,
             "query_pre_attn_scalar must be positive")
        need(self.attention in ATTENTION_KINDS, f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", "default")
            need(rope_type in ROPE_TYPES, f"rope_scaling type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if self.attention == "gqa":
            need(1 <= self.n_kv_heads <= self.n_heads, "n_kv_heads must be in [1, n_heads]")
            need(self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads")
            need(self.head_dim % 2 == 0, "head_dim must be even for RoPE")
            return
        need(self.kv_lora_rank is not None, "MLA needs kv_lora_rank")
        ranks = self.kv_lora_ranks()
        need(len(ranks) == self.n_layers, f"kv_lora_rank has {len(ranks)} entries for {self.n_layers} layers")
        need(all(r >= 1 for r in ranks), "kv_lora_rank must be >= 1")
        need(self.qk_rope_head_dim >= 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even and >= 0")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim must be >= 0")
        need(self.qk_nope_head_dim + self.qk_rope_head_dim > 0, "queries and keys need at least one dimension")
        need(self.v_head_dim > 0, "v_head_dim must be positive")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        need(not (self.qk_norm and self.q_lora_rank), "qk_norm MLA has no low-rank query (q_lora_rank)")
        if self.qk_rope_freq_indices is not None:
            need(len(self.qk_rope_freq_indices) == self.qk_rope_head_dim // 2,
                 "qk_rope_freq_indices needs one index per rotary pair (qk_rope_head_dim // 2)")
            need(all(0 <= i < self.head_dim // 2 for i in self.qk_rope_freq_indices),
                 "qk_rope_freq_indices must index the head_dim // 2 source frequencies")

    # --------------------------------------------------------------- derived
    @property
    def is_mla(self) -> bool:
        return self.attention == "mla"

    @property
    def gqa_variant(self) -> str:
        """MHA, GQA-n or MQA: a readable name of the attention kind."""
        if self.is_mla:
            return "MLA"
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        if self.n_kv_heads == 1:
            return "MQA"
        return f"GQA-{self.n_kv_heads}"

    def layer_type(self, layer: int) -> str:
        """``"full_attention"`` or ``"sliding_attention"``: which mask and RoPE table a layer uses."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: it sees every earlier key)."""
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    def kv_lora_ranks(self) -> list[int]:
        """The latent rank of every layer (MLA only)."""
        if isinstance(self.kv_lora_rank, int):
            return [self.kv_lora_rank] * self.n_layers
        return list(self.kv_lora_rank or [])

    def kv_values_per_token(self, layer: int) -> int:
        """Values one token keeps in the cache of one layer."""
        if self.is_mla:
            return self.kv_lora_ranks()[layer] + self.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def kv_values_per_token_total(self) -> int:
        return sum(self.kv_values_per_token(i) for i in range(self.n_layers))

    @property
    def softmax_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim
        return 1.0 / math.sqrt(qk_dim)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise MlakitError(f"config format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown = sorted(set(data) - names)
        missing = sorted(required - set(data))
        if unknown or missing:
            parts = []
            if unknown:
                parts.append(f"unknown keys {unknown}")
            if missing:
                parts.append(f"missing keys {missing}")
            raise MlakitError("invalid model config: " + "; ".join(parts))
        return cls(**data)

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "ModelConfig":
        path = Path(directory) / CONFIG_FILENAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MlakitError(f"{path} not found") from None
        except json.JSONDecodeError as e:
            raise MlakitError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- presets
# Shapes only: weights come from a checkpoint or random init (benchmarks).
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        intermediate_size=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
        bos_token_id=1, eos_token_ids=[2],
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, rope_theta=500000.0, max_seq_len=131072, norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_ids=[128001, 128009],
    ),
    "llama3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
        intermediate_size=8192, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_ids=[128001, 128009],
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise MlakitError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}") from None
