"""KV-cache formats as data, and their PyTorch quantise / dequantise references.

A format says how one cached vector (an MLA latent row, a RoPE key, one head's key
or value) is stored. The 16-bit formats store the values as they are. The quantised
ones store, per token, ``channels`` values of ``bits`` bits and one float32 scale per
group of ``group_size`` consecutive channels (no zero point):

    scale[g] = max(|x[c]| for c in group g) / qmax          (int8, fp8; 0 for an all-zero group)
    scale[g] = e[g] / -8                                     (int4: e[g] the group's signed extreme,
                                                              the larger of max and -min, max on a tie)
    q[c]     = clamp(round(x[c] / scale[g]), -qmax, qmax)    (int8; round half away from 0)
    q[c]     = clamp(round(x[c] / scale[g]), -8, 7)          (int4; round half away from 0)
    q[c]     = e4m3(clamp(x[c] / scale[g], -448, 448))       (fp8: round to nearest even)
    x'[c]    = q[c] * scale[g]

int4 uses all 16 levels, as llama.cpp's q4_0 does: the extreme lands on -8 (the scale
is negative when the extreme is positive), the rest on [-8, 7]. Against a symmetric
[-7, 7] the step is 7/8 as large; on the default model's K/V (wikitext2-smollm2-v1, CPU)
ppl 33.27 -> 32.48 (on an equalized, rotated MLA latent, whose groups are near-Gaussian,
42.36 -> 42.65: docs/protocols.md). int4 packs two channels per byte, channel 2j in the low nibble and
2j + 1 in the high nibble, each as ``q + 8`` (0..15; 8 is zero). A last group may be
partial (channels not a multiple of the group size).

Scales are float32: a 16-bit scale saves 1-2% of the bytes but under/overflows for
tiny or huge groups (fp16: absmax < 1e-5 or > 8e6), which a cache must not do silently.

Bytes per token of an MLA layer at rank 512 + rope 64 (RoPE key kept 16-bit):
bf16 1152; fp8 / int8 (groups of 64) 512 + 8 * 4 + 128 = 672 (42% fewer); int4
(groups of 32) 256 + 16 * 4 + 128 = 448 (61% fewer). Relative Frobenius error of the
round trip, measured on 4096 x 512 unit normals (and with 1% of the values x10):
int8 g32 0.54% (1.0%), g64 0.59% (1.3%), g128 0.65% (1.7%); fp8 g64 2.5% (1.9%: its
3-bit mantissa dominates, the group size barely matters); int4 g32 8.6% (14.5%), g64 9.5%
(19.5%), g128 10.4% (25.7%) (the symmetric 15-level int4 of earlier versions: 9.7%, 10.8%, 11.8%). Scale bytes over value bytes: 6.3% at g64 for 8 bits, 25% at g32
for 4 bits -- see tests/test_quant.py for the bounds.

Bottom layer: imports only torch and mlakit.errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlakit.errors import MlakitError

KV_CACHE_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4")
ROPE_SUFFIX = "+rope"  # MLA: the shared RoPE key quantised too (else kept 16-bit), e.g. int4+rope
# what --kv-cache-dtype takes
KV_CACHE_CHOICES = KV_CACHE_DTYPES + tuple(n + ROPE_SUFFIX for n in ("fp8", "int8", "int4"))

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class CacheFormat:
    """How a cache stores one vector per token (see the module docstring)."""

    name: str  # one of KV_CACHE_DTYPES, or "auto" (the model's dtype)
    bits: int  # bits per stored value
    storage_dtype: torch.dtype  # dtype of the values buffer (int4: uint8, two values per byte)
    group_size: int = 0  # channels per scale; 0: not quantised, no scales
    qmax: float = 0.0  # largest quantised magnitude (127, 8, 448; int4: levels -8..7)
    scale_dtype: torch.dtype = torch.float32

    @property
    def quantized(self) -> bool:
        return self.group_size > 0

    @property
    def top_level(self) -> float:
        """The largest quantised value: ``qmax``, or for int4 ``qmax - 1`` (q4_0's levels -8..7)."""
        return self.qmax - 1 if self.bits == 4 else self.qmax

    @property
    def stores_turned(self) -> bool:
        """Whether RoPE keys (MLA's, with ``+rope``; an attention's keys, RoPE'd over all their dims)
        and the original's values are stored turned in this format (``cache_turn``): the integer
        formats, whose one step per group a vector's few large channels make coarse for the rest.
        fp8 rounds each value relative to itself; turning mixes the large errors into small values."""
        return self.quantized and self.name != "fp8"

    def stored_channels(self, channels: int) -> int:
        """Entries of the values buffer per vector of ``channels`` (int4: bytes, two per byte)."""
        if self.bits == 4:
            if channels % 2:
                raise MlakitError(f"int4 cache needs an even number of channels, got {channels}")
            return channels // 2
        return channels

    def groups(self, channels: int) -> int:
        """Scales per vector of ``channels`` (0 for a 16-bit format)."""
        return -(-channels // self.group_size) if self.quantized else 0

    def bytes_per_token(self, channels: int) -> int:
        """Bytes one vector of ``channels`` takes, values plus scales."""
        values = self.stored_channels(channels) * torch.empty((), dtype=self.storage_dtype).element_size()
        scales = self.groups(channels) * torch.empty((), dtype=self.scale_dtype).element_size()
        return values + scales


FORMATS = {
    "bf16": CacheFormat("bf16", 16, torch.bfloat16),
    "fp16": CacheFormat("fp16", 16, torch.float16),
    "fp8": CacheFormat("fp8", 8, torch.float8_e4m3fn, group_size=64, qmax=FP8_MAX),
    "int8": CacheFormat("int8", 8, torch.int8, group_size=64, qmax=127.0),
    "int4": CacheFormat("int4", 4, torch.uint8, group_size=32, qmax=8.0),
}


def split_cache_choice(choice: str) -> tuple[str, bool]:
    """A ``--kv-cache-dtype`` choice as ``(format name, quantise the RoPE key)``: ``"int4+rope"`` ->
    ``("int4", True)``, ``"int8"`` -> ``("int8", False)``."""
    return choice.removesuffix(ROPE_SUFFIX), choice.endswith(ROPE_SUFFIX)


def cache_format(name: str | CacheFormat | None, model_dtype: torch.dtype = torch.float32) -> CacheFormat:
    """The format of ``--kv-cache-dtype name``; ``None`` or ``"auto"``: unquantised in ``model_dtype``."""
    if isinstance(name, CacheFormat):
        return name
    if name is None or name == "auto":
        return CacheFormat("auto", torch.empty((), dtype=model_dtype).element_size() * 8, model_dtype)
    if name not in FORMATS:
        raise MlakitError(f"unknown kv cache dtype {name!r}; choose one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return FORMATS[name]


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x [..., C]`` as ``[..., G, group]`` (zero-padded last group), float32 (float64 stays)."""
    channels = x.shape[-1]
    groups = -(-channels // group)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = torch.nn.functional.pad(x.to(wide), (0, groups * group - channels))
    return x.view(*x.shape[:-1], groups, group)


def quantize(x: torch.Tensor, fmt: CacheFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., C]`` -> ``(values [..., stored_channels(C)], scales [..., groups(C)])``."""
    if not fmt.quantized:
        raise MlakitError(f"format {fmt.name} is not quantised")
    channels = x.shape[-1]
    fmt.stored_channels(channels)  # checks int4's even channel count
    g = _grouped(x, fmt.group_size)  # [..., G, group]
    if fmt.bits == 4:  # the signed extreme onto -8 (positive on a tie): 16 levels
        top, bottom = g.amax(-1), g.amin(-1)
        scales = (torch.where(top >= -bottom, top, bottom) / -fmt.qmax).to(fmt.scale_dtype)  # [..., G]
    else:
        scales = (g.abs().amax(-1) / fmt.qmax).to(fmt.scale_dtype)  # [..., G]
    # quantise with the scale as stored; an all-zero group has scale 0 and values 0
    s = scales.to(g.dtype)[..., None]
    y = torch.where(s != 0, g / torch.where(s != 0, s, 1.0), 0.0)  # [..., G, group]
    y = y.flatten(-2)[..., :channels]  # [..., C]
    if fmt.name == "fp8":
        return y.clamp(-fmt.qmax, fmt.qmax).to(torch.float8_e4m3fn), scales
    q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-fmt.qmax, fmt.top_level)  # round half away from 0
    if fmt.bits == 8:
        return q.to(torch.int8), scales
    nib = (q + 8).to(torch.uint8)  # [..., C], 0..15
    return nib[..., 0::2] | (nib[..., 1::2] << 4), scales


def unpack_int4(values: torch.Tensor) -> torch.Tensor:
    """Packed int4 bytes ``[..., C / 2]`` -> signed values ``[..., C]`` (int8)."""
    lo = (values & 0xF).to(torch.int8) - 8
    hi = (values >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize(values: torch.Tensor, scales: torch.Tensor, fmt: CacheFormat,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(values, scales)`` as ``quantize`` gives them -> ``x' [..., C]`` in ``dtype`` (math in float32;
    float64 when ``dtype`` is)."""
    if not fmt.quantized:
        return values.to(dtype)
    q = unpack_int4(values) if fmt.bits == 4 else values
    channels = q.shape[-1]
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    g = _grouped(q.to(wide), fmt.group_size)  # [..., G, group]
    x = (g * scales.to(wide)[..., None]).flatten(-2)[..., :channels]
    return x.to(dtype)


def fake_quantize(x: torch.Tensor, name: str | CacheFormat | None) -> torch.Tensor:
    """``x`` as a cache of format ``name`` would give it back (same dtype), with the gradient
    passed straight through the rounding: what a forward without a cache sees of a quantised
    one (evaluation through the cache, quantisation-aware healing). None / "auto": ``x``."""
    fmt = cache_format(name, x.dtype)
    if fmt.name == "auto":
        return x
    if fmt.quantized:
        values, scales = quantize(x.detach(), fmt)
        stored = dequantize(values, scales, fmt, x.dtype)
    else:
        stored = x.detach().to(fmt.storage_dtype).to(x.dtype)
    return x + (stored - x).detach() if x.requires_grad else stored


# A RoPE key in an integer format is stored turned: k @ T, with T a fixed orthogonal matrix,
# and the query turned alike (q @ T), which leaves every score q . k as it was. RoPE keys carry
# their energy in a few frequency pairs, and a group's scale set by them rounds the rest away;
# turned, the energy spreads over all channels (measured: docs/protocols.md, "RoPE key"). The
# original's values are stored turned too (v @ T, read back as stored @ T.T): the rounding an
# orthogonal matrix folded into wv / wo would give, with the weights unchanged.

_CACHE_TURNS: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _draw_cache_turn(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    turn = (q * torch.sign(torch.diagonal(r))).to(device=device, dtype=dtype)  # signs fixed: one matrix per draw
    _CACHE_TURNS[dim, device, dtype] = turn
    return turn


def cache_turn(dim: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed orthogonal ``[dim, dim]`` matrix ``T`` an integer-format cache stores RoPE keys (and
    the original's values) turned by (``k @ T``; a query scored against the stored key is turned
    alike; ``k = stored @ T.T``): a seeded Gaussian draw made
    orthogonal by QR in float64 on the CPU (the same draw everywhere; caches are never kept, so a
    write and its reads always share one ``T``), then cast. Made once per (dim, device, dtype) and
    shared: a forward pass asks for it in every layer (no copy to the device each time), so it must
    not be written to."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    turn = _CACHE_TURNS.get((dim, device, dtype))
    if turn is None:
        # a seeded draw cannot be traced; once made, a turn is a constant to a compiled graph. Disabled
        # here, not by a decorator: at import that would load torch._dynamo (~1.3 s) into every command
        turn = torch.compiler.disable(_draw_cache_turn)(dim, device, dtype)
    return turn


def turned(x: torch.Tensor, turn: torch.Tensor, back: bool = False) -> torch.Tensor:
    """``x [..., p] @ turn`` (``back``: ``@ turn.T``, the turn undone), in ``turn``'s dtype: where an
    integer-format cache turns what it stores (or a query scored against it) (``cache_turn``)."""
    return x.to(turn.dtype) @ (turn.T if back else turn)


def turn_width(dtype: torch.dtype) -> torch.dtype:
    """The dtype a vector of ``dtype`` is turned in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_quantize_turned(x: torch.Tensor, name: str | CacheFormat | None) -> torch.Tensor:
    """``fake_quantize`` of what a cache stores turned (a RoPE key, the original's keys and values,
    ``[..., d]``) as the cache gives it back: turned, rounded and turned back in a format that
    ``stores_turned``, as ``fake_quantize`` in the others."""
    fmt = cache_format(name, x.dtype)
    if not fmt.stores_turned:
        return fake_quantize(x, fmt)
    turn = cache_turn(x.shape[-1], x.device, turn_width(x.dtype))
    return turned(fake_quantize(turned(x, turn), fmt), turn, back=True).to(x.dtype)
