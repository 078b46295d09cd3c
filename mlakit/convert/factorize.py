"""Per-layer GQA -> MLA factorisation (float64 throughout, from calibration statistics).

Notation for one layer: ``x̄ = [x; 1]`` (attention input plus a constant for the
biases), ``Σ = E[x̄ x̄ᵀ]``, ``G`` KV heads of ``d`` dims, ``d/2`` RoPE frequencies,
rotate_half pairs ``(i, i + d/2)``.

RoPE key (``rope_spectrum``). At frequency ``i`` the keys of the ``G`` KV heads form a
complex vector ``z_i ∈ C^G`` (pair i = real + j·imag) that RoPE multiplies by
``e^{jθ_i t}``. Any unitary mix of the heads commutes with that rotation, so we
take, per frequency, the eigenbasis of the *query-weighted* key covariance
``W E[z zᴴ] W`` (``W = diag(√Q_g)``, ``Q_g`` = summed query energy of the heads
reading KV head ``g`` at that frequency): the eigenvalue of a component is the
energy of its contribution to the attention scores. The shared RoPE key keeps
the chosen components exactly (each query head gets its own mixing coefficient),
which is RoRoPE (TransMLA) made complex-unitary and query-aware.

NoPE + V (``LayerPlan``). The remaining components lose their rotation. Their
score contribution is approximated by ``Re(q̄ y ρ)`` with ``ρ_{h,i} = E[e^{jθ_i Δ}]``
over the calibrated attention distances ``Δ`` of head ``h`` (``ρ ≈ 1`` for slow
frequencies, ``≈ 0`` for fast ones: the MMSE constant). Keys of those components
and the values of all KV heads are compressed jointly into the latent by PCA in
an error metric: keys whitened by the covariance of the queries that read them
(score error), values by ``Σ_h Wo_hᵀ Wo_h`` (output error), keys weighted by
``alpha`` against values. Per-head up-projections follow exactly (GQA groups:
every query head of a group gets its KV head's rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlakit.errors import MlakitError


VALUE_FIT_MIX = 1e-3


def _aug(linear: torch.nn.Linear) -> torch.Tensor:
    """``[out, in + 1]`` float64: weight and bias (zeros when there is none)."""
    w = linear.weight.detach().double().cpu()
    b = linear.bias.detach().double().cpu() if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w, b[:, None]], dim=1)


def _sqrt_psd(matrix: torch.Tensor, rel_eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(``M^{1/2}``, pseudo-inverse of ``M^{1/2}``) of a symmetric PSD matrix."""
    if matrix.numel() == 0:
        return matrix.clone(), matrix.clone()
    evals, evecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    evals = evals.clamp(min=0)
    keep = evals > rel_eps * max(float(evals.max()), 1e-300)
    root = evals.sqrt()
    inv = torch.where(keep, 1 / root.clamp(min=1e-300), torch.zeros_like(root))
    return (evecs * root) @ evecs.T, (evecs * inv) @ evecs.T


@dataclass
class RopeSpectrum:
    """Per frequency ``i``: eigenvalues ``lam [d/2, G]`` (descending), eigenvectors
    ``U [d/2, G, G]`` (complex, columns), weights ``w [d/2, G]``, key rows ``Zk [d/2, G, in+1]``."""
    lam: torch.Tensor
    U: torch.Tensor
    w: torch.Tensor
    Zk: torch.Tensor


def _complex_rows(a: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """``[d/2, heads, in+1]`` complex rows ``row(i) + j·row(i + d/2)`` of each head."""
    half = head_dim // 2
    a = a.view(n_heads, head_dim, -1)
    return torch.complex(a[:, :half], a[:, half:]).transpose(0, 1)


def rope_spectrum(attn, sigma: torch.Tensor, query_weighted: bool = True) -> RopeSpectrum:
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    sig = sigma.to(torch.complex128)
    Zk = _complex_rows(_aug(attn.wk), G, d)  # [d/2, G, in+1]
    Zq = _complex_rows(_aug(attn.wq), H, d)  # [d/2, H, in+1]
    ck = Zk @ sig @ Zk.conj().transpose(1, 2)  # [d/2, G, G]
    q_energy = torch.einsum("fhi,ij,fhj->fh", Zq, sig, Zq.conj()).real.clamp(min=0)  # [d/2, H]
    Q = q_energy.view(d // 2, G, H // G).sum(-1)  # [d/2, G]
    if not query_weighted:
        Q = torch.ones_like(Q)
    w = (Q + 1e-12 * Q.max().clamp(min=1e-300)).sqrt()
    ckw = w[:, :, None] * ck * w[:, None, :]
    lam, U = torch.linalg.eigh((ckw + ckw.conj().transpose(1, 2)) / 2)
    return RopeSpectrum(lam=lam.flip(-1).clamp(min=0), U=U.flip(-1), w=w, Zk=Zk)


def rotation_expectation(dist: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``ρ [h, d/2] = E[e^{jθ_i Δ}]`` over the calibrated distance distribution ``dist [h, L]``."""
    delta = torch.arange(dist.shape[1], dtype=torch.float64)
    angles = inv_freq.double()[:, None] * delta[None]  # [d/2, L]
    return torch.complex(dist @ angles.cos().T, dist @ angles.sin().T)  # [h, d/2]


@dataclass
class LayerPlan:
    """Everything of one layer before the latent rank is fixed."""
    pairs: list[tuple[int, int]]  # (frequency, component) of each rotary pair of the shared key
    nope: list[tuple[int, int]]  # the other components
    spectrum: torch.Tensor  # eigenvalues of the joint NoPE-key/V metric covariance, descending
    basis: torch.Tensor  # its eigenvectors (columns)
    metric_rows: torch.Tensor  # M: [n_nope*2 + G*d, in+1], whitened NoPE keys then values
    key_pinv: torch.Tensor  # pseudo-inverse of the key metric root (incl. alpha) [2 n_nope, 2 n_nope]
    value_pinv: list[torch.Tensor]  # per KV head [d, d]
    T: torch.Tensor  # [H, 2 n_nope, d]: query of head h -> its NoPE query components
    R: torch.Tensor  # [H, p, d]: query of head h -> its rotary query
    rope_rows: torch.Tensor  # [p, in+1] rows of the shared RoPE key
    sigma: torch.Tensor  # [in+1, in+1] the layer's input second moments


def plan_layer(attn, sigma: torch.Tensor, spec: RopeSpectrum, counts: list[int], rho: torch.Tensor | None,
               alpha: float = 1.0) -> LayerPlan:
    """Fix the shared RoPE key (``counts[i]`` top components at frequency ``i``) and the
    joint NoPE-key/V metric of one layer. ``rho [H, d/2]`` (None: 1, i.e. just unrotated)."""
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    half, group = d // 2, H // G
    pairs = [(i, c) for i in range(half) for c in range(counts[i])]
    nope = [(i, c) for i in range(half) for c in range(counts[i], G)]
    p = 2 * len(pairs)
    gidx = torch.arange(H) // group
    coef = (spec.U.conj()[:, gidx, :] / spec.w[:, gidx, None]).permute(1, 0, 2)  # [H, d/2, G]: q' = a q

    def rows_and_maps(comps: list[tuple[int, int]], rho_h: torch.Tensor | None, interleave: bool):
        """Key rows [2n, in+1] and the query maps [H, 2n, d] of components ``comps``; real
        parts then imaginary parts (rotary layout) or re/im interleaved (NoPE)."""
        n = len(comps)
        rows = torch.zeros(2 * n, sigma.shape[0], dtype=torch.float64)
        maps = torch.zeros(H, 2 * n, d, dtype=torch.float64)
        if n == 0:
            return rows, maps
        fi = torch.tensor([i for i, _ in comps])
        ci = torch.tensor([c for _, c in comps])
        y = torch.einsum("ng,ngk->nk", spec.U[fi, :, ci].conj() * spec.w[fi], spec.Zk[fi])  # [n, in+1]
        a = coef[:, fi, ci]  # [H, n]
        if rho_h is not None:
            a = a * rho_h[:, fi].conj()
        re_idx = torch.arange(n) * 2 if interleave else torch.arange(n)
        im_idx = re_idx + 1 if interleave else re_idx + n
        rows[re_idx], rows[im_idx] = y.real, y.imag
        maps[:, re_idx, fi], maps[:, re_idx, fi + half] = a.real, -a.imag
        maps[:, im_idx, fi], maps[:, im_idx, fi + half] = a.imag, a.real
        return rows, maps

    rope_rows, R = rows_and_maps(pairs, None, interleave=False)
    key_rows, T = rows_and_maps(nope, rho, interleave=True)
    n2 = key_rows.shape[0]
    # metrics: score error for keys (queries that read them), output error for values
    Aq = _aug(attn.wq).view(H, d, -1)
    scale2 = attn.scale ** 2  # the source's softmax scale (1/sqrt(d), or Gemma's query_pre_attn_scalar)
    cq = torch.zeros(n2, n2, dtype=torch.float64)
    for h in range(H):
        qh = Aq[h] @ sigma @ Aq[h].T  # [d, d]
        cq += scale2 * T[h] @ qh @ T[h].T
    key_root, key_pinv = _sqrt_psd(cq)
    key_root, key_pinv = alpha * key_root, key_pinv / alpha
    wo = attn.wo.weight.detach().double().cpu().view(-1, H, d)  # [dim, H, d]
    Av = _aug(attn.wv).view(G, d, -1)
    v_rows, value_pinv = [], []
    for g in range(G):
        heads = wo[:, g * group:(g + 1) * group].reshape(-1, d)  # [dim * group, d]
        root, pinv = _sqrt_psd(heads.T @ heads)
        v_rows.append(root @ Av[g])
        value_pinv.append(pinv)
    M = torch.cat([key_root @ key_rows, *v_rows], dim=0)  # [n2 + G d, in+1]
    cov = M @ sigma @ M.T
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    return LayerPlan(pairs=pairs, nope=nope, spectrum=evals.flip(0).clamp(min=0), basis=evecs.flip(1),
                     metric_rows=M, key_pinv=key_pinv, value_pinv=value_pinv, T=T, R=R, rope_rows=rope_rows,
                     sigma=sigma)


def max_rank(plan: LayerPlan) -> int:
    return plan.metric_rows.shape[0]


def build_layer(attn, plan: LayerPlan, rank: int, nope_dim: int,
                sigma_attn: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MLA weights (float64) of one layer at latent ``rank``: ``wq``, ``wkv_a``, ``wkv_b``
    (+ biases), in the layout of ``mlakit.attention.MLAttention``."""
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    group = H // G
    if not 1 <= rank <= max_rank(plan):
        raise MlakitError(f"latent rank {rank} is outside [1, {max_rank(plan)}] for this layer")
    p = plan.R.shape[1]
    n2 = plan.T.shape[1]
    U = plan.basis[:, :rank]  # [n2 + G d, r]
    latent_rows = U.T @ plan.metric_rows  # [r, in+1]
    B = plan.key_pinv @ U[:n2]  # [n2, r]: NoPE key components from the latent
    s_ratio = math.sqrt(nope_dim + p) * attn.scale  # the source's softmax scale folded into the queries
    Aq = _aug(attn.wq).view(H, d, -1)
    if sigma_attn is not None:
        # values: least squares under the attention-averaged inputs each group's heads see:
        # W_g = A_g Σ̃ Eᵀ (E Σ̃ Eᵀ)⁻¹ (E = the latent map); the Wo metric cancels in an unconstrained fit
        Av = _aug(attn.wv).view(G, d, -1)
        value_refit = []
        for g in range(G):
            # a little of the plain input covariance keeps the fit well posed on few calibration
            # tokens (and exact whenever the latent holds the values exactly)
            sig = sigma_attn[g if sigma_attn.shape[0] > 1 else 0].double()
            sig = sig + VALUE_FIT_MIX * (sig.trace() / plan.sigma.trace()) * plan.sigma
            root = _sqrt_psd(sig)[0]  # min ||(A - W E) root||: least squares on the square root
            solution = torch.linalg.lstsq((latent_rows @ root).T, (Av[g] @ root).T, driver="gelsd").solution
            value_refit.append(solution.T)
    q_rows, kv_b = [], []
    for h in range(H):
        g = h // group
        if nope_dim:
            q_rows.append(s_ratio * Aq[h])  # NoPE query = the source query of the head
            kv_b.append(plan.T[h].T @ B)  # [d, r]
        q_rows.append(s_ratio * plan.R[h] @ Aq[h])
        if sigma_attn is None:
            kv_b.append(plan.value_pinv[g] @ U[n2 + g * d: n2 + (g + 1) * d])  # [d, r]
        else:
            kv_b.append(value_refit[g])
    wq = torch.cat(q_rows, 0)
    wkv_a = torch.cat([latent_rows, plan.rope_rows], 0)
    out = {"wq.weight": wq[:, :-1], "wq.bias": wq[:, -1], "wkv_a.weight": wkv_a[:, :-1], "wkv_a.bias": wkv_a[:, -1],
           "wkv_b.weight": torch.cat(kv_b, 0)}
    return out
