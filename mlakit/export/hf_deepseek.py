"""Export an mlakit MLA model as a stock DeepSeek-V3 Hugging Face checkpoint.

The target is what ``transformers.DeepseekV3ForCausalLM`` (and vLLM / SGLang /
llama.cpp's ``deepseek2``) compute, with every layer dense. mlakit's MLA is a
superset of it; the differences are removed by *exact* rewrites of the weights
(``to_deepseek``), never by retraining:

1. **No latent norm.** DeepSeek always applies an RMSNorm to the latent
   (``kv_a_layernorm``); converted models have none. ``RMSNorm(y) = w * y /
   sqrt(mean(y^2) + eps)`` is linear where ``mean(y^2) << eps``: we store
   ``y = alpha * c`` (alpha folded into the latent rows of ``kv_a_proj`` and its
   bias) and ``w = sqrt(eps) / alpha``, so the norm returns
   ``c / sqrt(1 + alpha^2 mean(c^2) / eps)``. alpha comes from a *data-free
   worst case*: the attention input is itself RMS-normalised, ``h = g * x_hat``
   with ``|x_hat|^2 <= dim``, so ``|c| <= sigma_max(W_c diag(g)) sqrt(dim) + |b|``
   for every possible input. With ``alpha^2 max mean(c^2) = DELTA * eps`` the
   relative deviation from the linear map is ``<= DELTA / 2`` (5e-10) for *all*
   inputs, far below float32 rounding; ``alpha c`` stays far above float32 /
   bfloat16's smallest normal (1e-38; NOT float16's: serve in bf16 or fp32).
2. **eps.** transformers builds ``kv_a_layernorm`` / ``q_a_layernorm`` with a
   fixed eps of 1e-6, while vLLM, SGLang and llama.cpp use ``rms_norm_eps``.
   The export therefore always writes ``rms_norm_eps = 1e-6``, and where the
   source model used another eps it scales the residual stream by
   ``beta = sqrt(1e-6 / eps_src)`` (embeddings, ``o_proj``, ``down_proj``; the
   tied head compensates in the final norm weight): ``RMSNorm(beta x; beta^2 eps)
   = RMSNorm(x; eps)`` exactly. A real latent / query norm of the source is moved
   to the new eps the same way (its input rows scaled).
3. **Query bias without q-LoRA** (Qwen2-converted): DeepSeek's ``q_proj`` has no
   bias; its ``q_a_proj`` does (``attention_bias``). The query becomes a q-LoRA of
   rank ``dim + 1``: ``q_a_proj = [alpha I; 0]`` with bias ``[0; alpha]`` (a
   constant channel), ``q_a_layernorm`` linearised as in 1., ``q_b_proj = [W_q, b_q]``.
   ``attention_bias=true`` also gives ``kv_a_proj_with_mqa`` its (latent and RoPE
   key) bias and ``o_proj`` a bias (zeros unless the model has one). Only
   transformers is known to build these biases (see docs/export.md).
4. **Per-layer ranks**: DeepSeek has one ``kv_lora_rank``; smaller layers are
   padded with zero latent channels (zero rows of ``kv_a_proj``, zero columns of
   ``kv_b_proj``): exact, but the cache of the padded layers grows.
5. **RoPE**: the weights are written in DeepSeek's interleaved pair layout with
   ``rope_interleave=true`` (the one layout every engine reads; the inverse of
   the loader's row permutation). The shared key's frequencies must be
   ``theta'^(-2i/p) / factor`` for some ``theta'`` (and a linear scaling
   ``factor``): mlakit's ``qk_rope_freq_indices`` i_k select source frequencies
   ``theta^(-2 i_k / d)``; that is representable iff the indices are an
   arithmetic progression ``i_k = i_0 + s k`` (``theta' = theta^(s p / d)``,
   ``factor = theta^(2 i_0 / d)``); anything else is refused.
6. The softmax scale is ``(qk_nope + qk_rope)^-0.5`` in both (no YaRN mscale).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlakit import loading
from mlakit.config import ModelConfig
from mlakit.errors import MlakitError
from mlakit.io import atomic_dir
from mlakit.model import Transformer
from mlakit.rope import mla_rope_inv_freq

HF_LATENT_EPS = 1e-6  # transformers' DeepseekV3 builds kv_a_layernorm / q_a_layernorm with this eps
DELTA = 1e-9  # alpha^2 * (worst-case mean square of the latent) / eps: relative error <= DELTA / 2
FREQ_RTOL = 1e-6  # frequencies must match to float32-rounding level


# ------------------------------------------------------------------ key map
def _inverse_maps() -> tuple[dict[str, str], dict[str, str]]:
    """mlakit -> HF names: the inverse of the loader's one key map (DeepSeek variant)."""
    top = {v: k for k, v in loading._HF_TOP_KEYS.items()}
    layer = {v: k for k, v in {**loading._HF_LAYER_KEYS, **loading._DEEPSEEK_LAYER_KEYS}.items()}
    return top, layer


_TOP, _LAYER = _inverse_maps()
_MLAKIT_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def mlakit_key_to_hf(name: str) -> str:
    """HF DeepSeek-V3 tensor name of an mlakit tensor name (checked against the loader's map)."""
    if name in _TOP:
        hf = _TOP[name]
    else:
        match = _MLAKIT_LAYER_RE.fullmatch(name)
        if not match or match.group(2) not in _LAYER:
            raise MlakitError(f"tensor {name!r} has no DeepSeek-V3 name")
        layer, module, kind = match.groups()
        hf = f"model.layers.{layer}.{_LAYER[module]}.{kind}"
    assert loading.hf_key_to_mlakit(hf, "deepseek_v3") == name, (name, hf)
    return hf


def half_to_interleaved_rotation(rows: int) -> torch.Tensor:
    """Row order that turns mlakit's rotate_half pairs ``(i, i + rows/2)`` into
    DeepSeek's interleaved pairs ``(2i, 2i+1)``: the inverse of the loader's permutation."""
    if rows == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.argsort(loading.interleaved_to_half_rotation(rows))


# ------------------------------------------------------------------ RoPE
@dataclass
class RopeSpec:
    theta: float
    factor: float  # linear scaling factor (1.0: none)
    max_rel_err: float  # max relative difference of the engine's frequencies from mlakit's


def engine_inv_freq(spec: RopeSpec, rope_dim: int) -> torch.Tensor:
    """The frequencies transformers (and llama.cpp) compute for theta / linear factor, float32."""
    inv = 1.0 / (spec.theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim))
    return inv / spec.factor


def rope_spec(config: ModelConfig) -> RopeSpec:
    """theta' and linear factor that reproduce the shared RoPE key's frequencies, or MlakitError."""
    p = config.qk_rope_head_dim
    if p == 0:
        return RopeSpec(config.rope_theta, 1.0, 0.0)
    target = mla_rope_inv_freq(config).double()
    n = p // 2
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    indices = config.qk_rope_freq_indices
    if indices is not None and kind in ("default", "linear"):
        steps = {b - a for a, b in zip(indices, indices[1:])}
        if len(steps) > 1:
            raise MlakitError(
                f"the RoPE key uses source frequencies {indices} (qk_rope_freq_indices): DeepSeek's RoPE needs "
                "frequencies theta'^(-2i/p), i.e. indices in arithmetic progression i0 + s*k; this model cannot be "
                "exported exactly (convert with --rope-frequencies deepseek)")
        step = steps.pop() if steps else 1
        d = config.head_dim
        theta = config.rope_theta ** (step * p / d)
        factor = config.rope_theta ** (2 * indices[0] / d) * (scaling.get("factor", 1.0) if kind == "linear" else 1.0)
    else:  # standard frequencies of p dims, or a non-geometric source scaling: fit and check
        f0 = target[0].item()
        ratio = (target[-1] / target[0]).item() ** (1 / (n - 1)) if n > 1 else config.rope_theta ** (-2 / p)
        theta = ratio ** (-p / 2)
        factor = 1.0 / f0
        if indices is None and kind in ("default", "linear"):
            theta = config.rope_theta
            factor = scaling.get("factor", 1.0) if kind == "linear" else 1.0
    if abs(factor - 1.0) < 1e-12:
        factor = 1.0
    spec = RopeSpec(float(theta), float(factor), 0.0)
    got = engine_inv_freq(spec, p).double()
    spec.max_rel_err = ((got - target).abs() / target.abs()).max().item()
    if spec.max_rel_err > FREQ_RTOL:
        raise MlakitError(
            f"the RoPE key's frequencies ({'llama3-scaled ' if kind == 'llama3' else ''}source frequencies "
            f"{indices if indices is not None else 'of ' + str(p) + ' dims'}) are not theta'^(-2i/p) for any theta' "
            f"(best fit off by {spec.max_rel_err:.1e}); DeepSeek's RoPE cannot represent them")
    return spec


# ------------------------------------------------------------------ the rewrite
@dataclass
class DeepseekForm:
    """A model rewritten into DeepSeek-V3's function: HF config fields and HF-named tensors (float64)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    linearised_bound: float = 0.0  # worst-case relative error of any linearised norm (0: none)
    rope: RopeSpec | None = None


def check_exportable(config: ModelConfig) -> None:
    if not config.is_mla:
        raise MlakitError(f"export needs an MLA model; this one is {config.gqa_variant} "
                          "(convert it to MLA first)")
    if config.mlp_bias:
        raise MlakitError("DeepSeek-V3 has no MLP biases (mlp_bias=true cannot be exported)")
    if config.sliding_window is not None:
        raise MlakitError("DeepSeek-V3 has no sliding-window attention (sliding_window cannot be exported)")
    # what Qwen3 / Gemma 3 add has no DeepSeek-V3 counterpart (the config would load but compute another model)
    family = {"qk_norm": config.qk_norm, "sandwich_norms": config.sandwich_norms,
              "embedding_scale": config.embedding_scale is not None, "layer_types": config.layer_types is not None,
              "mlp_activation": config.mlp_activation != "silu", "rope_local_theta": config.rope_local_theta is not None,
              "query_pre_attn_scalar": config.query_pre_attn_scalar is not None}
    found = [name for name, present in family.items() if present]
    if found:
        raise MlakitError(f"DeepSeek-V3 cannot express this model's {', '.join(found)} ({config.arch}): "
                          "it runs in mlakit only")


def _max_norm_sq(weight: torch.Tensor, gain: torch.Tensor, dim: int, bias: torch.Tensor | None) -> float:
    """Worst case of |W h + b|^2 over every h = gain * x_hat with |x_hat|^2 <= dim."""
    sigma = torch.linalg.matrix_norm(weight * gain[None, :], ord=2).item()
    b = bias.norm().item() if bias is not None else 0.0
    return (sigma * math.sqrt(dim) + b) ** 2


def to_deepseek(model: Transformer, rms_norm_eps: float = HF_LATENT_EPS, min_nope_dim: int = 0,
                cache_block: int = 1) -> DeepseekForm:
    """Rewrite ``model`` into DeepSeek-V3 form (see the module docstring).

    ``rms_norm_eps``: the eps the target engine uses for every norm (1e-6 for the
    HF export; the source eps for GGUF, where the file carries it). ``min_nope_dim``:
    pad ``qk_nope_head_dim`` with zero channels up to this (llama.cpp needs >= 1);
    the softmax scale change is folded into the query. ``cache_block``: pad
    ``kv_lora_rank`` and ``qk_rope_head_dim`` with zero channels to multiples of it
    (32: what llama.cpp's q8_0 / q4_0 cache blocks need); the RoPE pairs added come
    after the model's, on the same progression of frequencies (exact; the cache grows).
    """
    cfg = model.config
    check_exportable(cfg)
    rewrite = _Rewrite(model, rms_norm_eps, min_nope_dim, cache_block)
    form = DeepseekForm(config={}, tensors={}, rope=rope_spec(cfg))
    if rewrite.rope and rewrite.rope_out != rewrite.rope:  # the pairs added continue the progression
        form.rope = RopeSpec(form.rope.theta ** (rewrite.rope_out / rewrite.rope), form.rope.factor,
                             form.rope.max_rel_err)
    form.notes.extend(rewrite.notes(form.rope))
    out = rewrite.outer_tensors()
    for i, r in enumerate(rewrite.ranks):
        out.update(rewrite.layer_tensors(i, r))
    form.linearised_bound = rewrite.worst
    if rewrite.worst:
        q_bias = " / query bias" if rewrite.has_q_bias and not cfg.q_lora_rank else ""
        form.notes.append(f"norms linearised (no latent norm{q_bias} in the source): worst-case relative error "
                          f"{rewrite.worst:.1e} over all inputs")
    form.tensors = {mlakit_key_to_hf(k): v for k, v in out.items()}
    form.config = _hf_config(cfg, form, rms_norm_eps=rewrite.e_t, q_lora_rank=rewrite.q_lora,
                             kv_lora_rank=rewrite.r_max, nope=rewrite.nope_out, rope=rewrite.rope_out,
                             attention_bias=rewrite.attention_bias)
    return form


class _Rewrite:
    """One ``to_deepseek`` call: the source's tensors (float64, mlakit names), the target's
    shapes, and the worst-case relative error of the norms made linear so far."""

    def __init__(self, model: Transformer, rms_norm_eps: float, min_nope_dim: int, cache_block: int = 1) -> None:
        cfg = self.cfg = model.config
        self.sd = {k: v.detach().to("cpu", torch.float64) for k, v in model.state_dict().items()}
        self.dim, self.h = cfg.dim, cfg.n_heads
        self.e_src, self.e_t = cfg.norm_eps, rms_norm_eps
        self.beta = math.sqrt(self.e_t / self.e_src)
        self.ranks = cfg.kv_lora_ranks()
        self.cache_block = cache_block
        self.r_max = -(-max(self.ranks) // cache_block) * cache_block
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.nope_out = max(self.nope, min_nope_dim)
        # transformers and llama.cpp need a RoPE key (zero channels if there is none), of whole pairs
        pairs = math.lcm(2, cache_block)
        self.rope_out = -(-max(self.rope, 2) // pairs) * pairs
        # folds the softmax-scale change of padding
        self.q_scale = math.sqrt((self.nope_out + self.rope_out) / (self.nope + self.rope))
        self.has_q_bias = "layers.0.attention.wq.bias" in self.sd
        self.q_lora = cfg.q_lora_rank if cfg.q_lora_rank else (self.dim + 1 if self.has_q_bias else None)
        self.attention_bias = cfg.qkv_bias or cfg.o_bias
        self.worst = 0.0

    def notes(self, spec: RopeSpec) -> list[str]:
        """What the rewrite changes, one line each (beside the exact function)."""
        cfg, notes = self.cfg, []
        e_src, e_t, rope = self.e_src, self.e_t, self.rope
        if self.cache_block > 1 and (self.r_max, self.rope_out) != (max(self.ranks), max(rope, 2)):
            notes.append(f"kv_lora_rank {max(self.ranks)} + rope {rope} padded to {self.r_max} + {self.rope_out} "
                         f"(multiples of {self.cache_block}) with zero channels (exact; cache "
                         f"{(max(self.ranks) + rope) * cfg.n_layers} -> {(self.r_max + self.rope_out) * cfg.n_layers} "
                         "values/token)")
        if self.beta != 1.0:
            notes.append(f"rms_norm_eps {e_src:g} -> {e_t:g}: residual stream scaled by {self.beta:.6g} (exact)")
        if len(set(self.ranks)) > 1:
            notes.append(f"per-layer kv_lora_rank {self.ranks} padded to {self.r_max} with zero latent channels "
                         f"(exact; cache {sum(self.ranks) + rope * cfg.n_layers} -> "
                         f"{(self.r_max + rope) * cfg.n_layers} values/token)")
        if self.nope_out != self.nope:
            notes.append(f"qk_nope_head_dim {self.nope} padded to {self.nope_out} with zeros; softmax scale folded "
                         "into q")
        if rope == 0:
            notes.append(f"no RoPE key: qk_rope_head_dim padded to {self.rope_out} with zeros; softmax scale folded "
                         "into q")
        if self.has_q_bias and not cfg.q_lora_rank:
            notes.append(f"query bias carried by a q-LoRA of rank {self.dim + 1} (constant channel)")
        if spec.factor != 1.0 or spec.theta != cfg.rope_theta:
            notes.append(f"RoPE key frequencies = theta {spec.theta:.6g}, linear factor {spec.factor:.6g} "
                         f"(max rel. difference {spec.max_rel_err:.1e})")
        return notes

    def linearised(self, max_sq_mean: float) -> tuple[float, torch.Tensor]:
        """alpha and the norm weight value sqrt(eps)/alpha for a norm made linear."""
        e_t = self.e_t
        alpha = math.sqrt(DELTA * e_t / max(max_sq_mean, 1e-30))
        self.worst = max(self.worst, 0.5 * alpha ** 2 * max_sq_mean / e_t)
        return alpha, torch.tensor(math.sqrt(e_t) / alpha, dtype=torch.float64)

    def q_rows(self, w: torch.Tensor) -> torch.Tensor:
        """Per-head query rows [nope, rope] -> [nope zero-padded, rope interleaved (zero-padded)], scaled."""
        h, nope, rope = self.h, self.nope, self.rope
        w = w.view(h, nope + rope, *w.shape[1:])
        w_nope, w_rope = w[:, :nope], w[:, nope:][:, half_to_interleaved_rotation(rope)]
        w = torch.cat([w.new_zeros(h, self.nope_out - nope, *w.shape[2:]), w_nope, w_rope,
                       w.new_zeros(h, self.rope_out - rope, *w.shape[2:])], dim=1)
        return (w * self.q_scale).reshape(h * (self.nope_out + self.rope_out), *w.shape[2:])

    def outer_tensors(self) -> dict[str, torch.Tensor]:
        """The embeddings, the final norm and the head (untied)."""
        sd, cfg, out = self.sd, self.cfg, {}
        out["tok_embeddings.weight"] = sd["tok_embeddings.weight"] * self.beta
        out["norm.weight"] = sd["norm.weight"] / self.beta if cfg.tie_embeddings else sd["norm.weight"]
        if not cfg.tie_embeddings:
            out["output.weight"] = sd["output.weight"]
        return out

    def layer_tensors(self, i: int, r: int) -> dict[str, torch.Tensor]:
        """Layer ``i`` (latent rank ``r``): norms, MLP, output projection, query, latent and RoPE key."""
        sd, out = self.sd, {}
        s = f"layers.{i}."
        a = s + "attention."
        gain = sd[s + "attention_norm.weight"]
        for name in ("attention_norm.weight", "ffn_norm.weight", "feed_forward.w1.weight", "feed_forward.w3.weight"):
            out[s + name] = sd[s + name]
        out[s + "feed_forward.w2.weight"] = sd[s + "feed_forward.w2.weight"] * self.beta
        # output projection (its bias, if the layout has one, is zero unless the model has one)
        out[a + "wo.weight"] = sd[a + "wo.weight"] * self.beta
        if self.attention_bias:
            out[a + "wo.bias"] = sd.get(a + "wo.bias", torch.zeros(self.dim, dtype=torch.float64)) * self.beta
        out.update(self.query(a, gain))
        out.update(self.latent(a, r, gain))
        return out

    def query(self, a: str, gain: torch.Tensor) -> dict[str, torch.Tensor]:
        """The query of attention ``a``: q-LoRA (its norm moved to the target eps), the query bias
        as a q-LoRA of rank dim + 1 (a constant channel, its norm made linear), or one projection."""
        sd, cfg, dim, out = self.sd, self.cfg, self.dim, {}
        if cfg.q_lora_rank:
            g = math.sqrt(self.e_t / self.e_src)  # move the real q norm to the target eps, exactly
            out[a + "wq_a.weight"] = sd[a + "wq_a.weight"] * g
            if self.attention_bias:
                out[a + "wq_a.bias"] = sd.get(a + "wq_a.bias", torch.zeros(self.q_lora, dtype=torch.float64)) * g
            out[a + "q_norm.weight"] = sd[a + "q_norm.weight"]
            out[a + "wq_b.weight"] = self.q_rows(sd[a + "wq_b.weight"])
        elif self.has_q_bias:
            max_h_sq = dim * gain.square().max().item()  # |h|^2 <= dim * max gain^2
            alpha, w_norm = self.linearised((max_h_sq + 1.0) / (dim + 1))
            wa = torch.zeros(dim + 1, dim, dtype=torch.float64)
            wa[:dim] = torch.eye(dim, dtype=torch.float64) * alpha
            ba = torch.zeros(dim + 1, dtype=torch.float64)
            ba[dim] = alpha
            out[a + "wq_a.weight"], out[a + "wq_a.bias"] = wa, ba
            out[a + "q_norm.weight"] = w_norm.expand(dim + 1).clone()
            out[a + "wq_b.weight"] = self.q_rows(torch.cat([sd[a + "wq.weight"], sd[a + "wq.bias"][:, None]], dim=1))
        else:
            out[a + "wq.weight"] = self.q_rows(sd[a + "wq.weight"])
        return out

    def latent(self, a: str, r: int, gain: torch.Tensor) -> dict[str, torch.Tensor]:
        """The latent and RoPE key of attention ``a`` (rank ``r`` padded to the largest), the latent
        norm (the source's moved to the target eps, or one made linear) and the up-projection."""
        sd, out = self.sd, {}
        dim, h, r_max, e_t, e_src = self.dim, self.h, self.r_max, self.e_t, self.e_src
        nope, rope, v_dim, nope_out, rope_out = self.nope, self.rope, self.v_dim, self.nope_out, self.rope_out
        w = sd[a + "wkv_a.weight"]
        b = sd.get(a + "wkv_a.bias")
        w_lat, w_rope = w[:r], w[r:][half_to_interleaved_rotation(rope)]
        b_lat = b[:r] if b is not None else None
        b_rope = b[r:][half_to_interleaved_rotation(rope)] if b is not None else None
        if self.cfg.latent_norm:
            # RMSNorm_rmax([g c, 0]; e_t) * w' == RMSNorm_r(c; e_src) * w  with g^2 = (r_max/r) e_t/e_src
            g = math.sqrt(r_max / r * e_t / e_src)
            norm_w = torch.cat([sd[a + "kv_norm.weight"] * math.sqrt(r / r_max),
                                torch.ones(r_max - r, dtype=torch.float64)])
        else:
            max_sq = _max_norm_sq(w_lat, gain, dim, b_lat) / r_max
            g, w_value = self.linearised(max_sq)
            norm_w = w_value.expand(r_max).clone()
        pad = torch.zeros(r_max - r, dim, dtype=torch.float64)
        rope_pad = torch.zeros(rope_out - rope, dim, dtype=torch.float64)
        out[a + "wkv_a.weight"] = torch.cat([w_lat * g, pad, w_rope, rope_pad])
        if self.attention_bias:
            zeros = torch.zeros(r + rope, dtype=torch.float64)
            b_lat = b_lat if b_lat is not None else zeros[:r]
            b_rope = b_rope if b_rope is not None else zeros[:rope]
            out[a + "wkv_a.bias"] = torch.cat([b_lat * g, torch.zeros(r_max - r, dtype=torch.float64), b_rope,
                                               torch.zeros(rope_out - rope, dtype=torch.float64)])
        out[a + "kv_norm.weight"] = norm_w
        wkv_b = sd[a + "wkv_b.weight"].view(h, nope + v_dim, r)
        if nope_out != nope:
            wkv_b = torch.cat([wkv_b.new_zeros(h, nope_out - nope, r), wkv_b], dim=1)
        wkv_b = torch.cat([wkv_b, wkv_b.new_zeros(h, nope_out + v_dim, r_max - r)], dim=2)
        out[a + "wkv_b.weight"] = wkv_b.reshape(h * (nope_out + v_dim), r_max)
        return out


def _hf_config(cfg: ModelConfig, form: DeepseekForm, rms_norm_eps: float, q_lora_rank: int | None,
               kv_lora_rank: int, nope: int, rope: int, attention_bias: bool) -> dict[str, Any]:
    spec = form.rope
    assert spec is not None
    scaling = None if spec.factor == 1.0 else {"rope_type": "linear", "type": "linear", "factor": spec.factor}
    rope_parameters = {"rope_type": "default" if scaling is None else "linear", "rope_theta": spec.theta}
    if scaling is not None:
        rope_parameters["factor"] = spec.factor
    eos = cfg.eos_token_ids
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        # all layers dense: no MoE layer is built (first_k_dense_replace == num_hidden_layers)
        "first_k_dense_replace": cfg.n_layers,
        "moe_layer_freq": 1,
        "n_routed_experts": 1,
        "n_shared_experts": 0,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "kv_lora_rank": kv_lora_rank,
        "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": cfg.v_head_dim,
        "head_dim": rope,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": spec.theta,
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "rope_interleave": True,
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


# ------------------------------------------------------------------ writing
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf_deepseek(model: Transformer, path: str | os.PathLike, tokenizer: Any | None = None,
                       dtype: str = "float32", overwrite: bool = False, cache_block: int = 1) -> DeepseekForm:
    """Write ``model`` as a DeepSeek-V3 HF directory (config.json, model.safetensors, tokenizer files).
    ``cache_block``: as ``to_deepseek``'s (zero channels padding the cache's shape).

    Everything is written to a temporary sibling directory that is renamed into
    place once complete: an interrupted export leaves no half-written output.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise MlakitError(f"dtype must be one of {sorted(DTYPES)}")
    if dtype == "float16":
        raise MlakitError("float16 cannot hold the export's scaled latent weights (values near 1e-9); "
                          "use float32 or bfloat16 (same exponent range as float32)")
    form = to_deepseek(model, cache_block=cache_block)
    path = Path(path)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        config = dict(form.config, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in form.tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "mlakit export"})
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return form
