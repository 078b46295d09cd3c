"""A change of basis of the MLA latent that leaves the model exact and makes its cache
quantise well.

The converter's latent comes out in principal-component order: channel 0 carries far more
energy than channel 31. A quantised cache scales each group of 32 (int4) or 64 (int8)
consecutive channels by its largest value, so in a group that holds a dominant channel the
others round to a few levels. Measured on the default model converted at 50% (H200,
kv-frontier-v1): an int4 latent takes wikitext2 ppl from 40.8 to 142 (the original's int4
K/V: 29.6 -> 33.2). Rotating every block of ``BLOCK`` channels by a Hadamard matrix with
random signs spreads each block's energy evenly over its channels (the incoherence
processing of QuIP / QuaRot), and the model absorbs the rotation exactly:

    latent' = latent R                (R orthogonal, block-diagonal)
    wkv_a'  = R^T wkv_a  (the latent rows; wkv_a_key too for QK-norm models)
    wkv_b'  = wkv_b diag(gamma) R     (the latent norm's gamma folded in first, then set to 1:
                                       RMSNorm(l R) = RMSNorm(l) R for an orthogonal R)

The rotation stays inside blocks, so the span of the first k x ``BLOCK`` channels is
unchanged: runtime ranks (``mlakit.elastic``) and the sparse index's channels that are
multiples of the block select the same subspace as before (exactly).
"""

from __future__ import annotations

import torch

from mlakit.attention import MLAttention
from mlakit.errors import MlakitError

BLOCK = 32  # the int4 format's group; int8's group of 64 holds two blocks
ROTATIONS = ("none", "hadamard", "equalize", "equalize+hadamard")


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix ``[n, n]`` (float64), ``n`` a power of two."""
    if n < 1 or n & (n - 1):
        raise MlakitError(f"a Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def block_rotation(rank: int, block: int = BLOCK, seed: int = 0) -> torch.Tensor:
    """Orthogonal ``[rank, rank]`` (float64): a Hadamard matrix with random column signs per
    full block of ``block`` channels; a random orthogonal matrix for a shorter last block."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, rank, block):
        n = min(block, rank - start)
        if n == block and not n & (n - 1):
            signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
            parts.append(hadamard(n) * signs)
        else:
            q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            parts.append(q * torch.sign(torch.diagonal(r)))
    return torch.block_diag(*parts)


@torch.no_grad()
def rotate_layer(attn: MLAttention, rotation: torch.Tensor) -> None:
    """Apply ``rotation`` ``[r, r]`` to one MLA layer's latent (in place, exact up to rounding)."""
    if attn.fused_input is not None:
        raise MlakitError("rotate the latent before fusing projections (mlakit.speed.fuse_projections)")
    r = attn.kv_lora_rank
    w_b = attn.wkv_b.weight
    rot = rotation.to(w_b.device)
    linears = [attn.wkv_a] + ([attn.wkv_a_key] if attn.qk_norm else [])
    for linear in linears:  # latent' = R^T latent: the latent rows of the input projection
        w = linear.weight
        w[:r] = (rot.T @ w[:r].double()).to(w.dtype)
        if linear.bias is not None:
            linear.bias[:r] = (rot.T @ linear.bias[:r].double()).to(linear.bias.dtype)
    b = w_b.double()
    if attn.kv_norm is not None:  # fold gamma into the up-projection: the norm then commutes with R
        b = b * attn.kv_norm.weight.double()
        attn.kv_norm.weight.fill_(1.0)
    w_b.copy_((b @ rot).to(w_b.dtype))


@torch.no_grad()
def scale_layer(attn: MLAttention, scale: torch.Tensor) -> None:
    """Multiply the cached latent's channel i by ``scale[i]`` and divide ``wkv_b``'s column i by
    it (in place, exact up to rounding): through the latent norm's gamma where there is one."""
    r = attn.kv_lora_rank
    scale = scale.to(attn.wkv_b.weight.device, torch.float64)
    if attn.kv_norm is not None:
        attn.kv_norm.weight.copy_((attn.kv_norm.weight.double() * scale).to(attn.kv_norm.weight.dtype))
    else:
        for linear in [attn.wkv_a] + ([attn.wkv_a_key] if attn.qk_norm else []):
            linear.weight[:r] = (linear.weight[:r].double() * scale[:, None]).to(linear.weight.dtype)
            if linear.bias is not None:
                linear.bias[:r] = (linear.bias[:r].double() * scale).to(linear.bias.dtype)
    w_b = attn.wkv_b.weight
    w_b.copy_((w_b.double() / scale).to(w_b.dtype))


@torch.no_grad()
def latent_stds(model, tokens: torch.Tensor) -> list[torch.Tensor | None]:
    """Per layer, the standard deviation of each cached latent channel over ``tokens [n, L]``
    (float64; None for a layer that is not MLA): the calibration the equalisation divides by."""
    from mlakit.options import DEFAULT

    sums: dict[int, list] = {}  # layer -> [sum, sum of squares, count]

    def record(index: int, attn: MLAttention):
        def hook(module, args, out):
            latent = out[..., :attn.kv_lora_rank].double()
            if attn.kv_norm is not None:
                latent = attn.kv_norm(latent)
            latent = latent.reshape(-1, latent.shape[-1])
            total, squares, n = sums.get(index, (0.0, 0.0, 0))
            sums[index] = [total + latent.sum(0), squares + latent.pow(2).sum(0), n + latent.shape[0]]
        return hook

    handles = [layer.attention.wkv_a.register_forward_hook(record(i, layer.attention))
               for i, layer in enumerate(model.layers) if isinstance(layer.attention, MLAttention)]
    try:
        for window in tokens:
            model(window[None].to(model.device), options=DEFAULT)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for i in range(len(model.layers)):
        if i not in sums:
            out.append(None)
            continue
        total, squares, n = sums[i]
        mean = total / n
        out.append((squares / n - mean.pow(2)).clamp_min(0).sqrt().cpu())
    return out


def equalize_latent(model, tokens: torch.Tensor):
    """Scale every cached latent channel to unit standard deviation on the calibration ``tokens``
    (in place, exact; returns the model). The converter's channels differ by up to ~100x in
    energy inside one group of 32, so one scale per group rounds the small ones away; a channel
    with little energy carries as much of the output through a large ``wkv_b`` column."""
    for attn, std in zip((layer.attention for layer in model.layers), latent_stds(model, tokens)):
        if std is not None:
            scale_layer(attn, 1.0 / std.clamp_min(std.max() * 1e-6))
    return model


def transform_latent(model, kind: str, tokens: torch.Tensor | None = None, seed: int = 0):
    """``kind`` of ``ROTATIONS`` applied to ``model`` (in place): the equalisation needs the
    calibration ``tokens``. equalize+hadamard needs a model without a latent norm (its gamma
    holds the equalisation, and the rotation commutes with the norm only at gamma = 1)."""
    if kind not in ROTATIONS:
        raise MlakitError(f"latent transform must be one of {', '.join(ROTATIONS)}, got {kind!r}")
    if kind.startswith("equalize"):
        if tokens is None:
            raise MlakitError("the latent equalisation needs calibration tokens")
        if kind.endswith("hadamard") and model.config.latent_norm:
            raise MlakitError("equalize+hadamard needs an MLA model without a latent norm; use one or the other")
        equalize_latent(model, tokens)
    if kind.endswith("hadamard"):
        rotate_latent(model, seed=seed)
    return model


def rotate_latent(model, block: int = BLOCK, seed: int = 0):
    """Rotate the latent of every MLA layer of ``model`` (in place; returns it). The model
    computes the same function; its cache quantises with less error (module docstring)."""
    if not model.config.is_mla:
        raise MlakitError("the latent rotation is for MLA models (convert the model first)")
    for index, layer in enumerate(model.layers):
        attn = layer.attention
        if isinstance(attn, MLAttention):
            rotate_layer(attn, block_rotation(attn.kv_lora_rank, block, seed + index))
    return model
