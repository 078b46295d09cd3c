"""kv-frontier-v1: quality against KV-cache bytes, the original with its cache quantised
beside MLA checkpoints with their latent quantised (../shared/PROTOCOL.md, docs/protocols.md).

A point is one (model, cache format): its cache bytes per token per layer as stored (values
plus scales, the MLA RoPE key in 16 bits) and three figures: wikitext2-smollm2-v1 ppl,
longctx-smollm2-v1 long-window ppl and passkey-v1 at 4096 tokens. Every figure is computed
with attention reading the cache's values as stored (``ForwardOptions.kv_cache_dtype``), the
prompt's own tokens included, and the passkey runs through the generation engine.

``mlakit frontier MODEL --mla CKPT ...`` prints the table, ``--json`` one object, and
``--plot-dir DIR`` writes frontier.md, frontier.png and frontier.json there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.options import ForwardOptions
from mlakit.quant import KV_CACHE_CHOICES, KV_CACHE_DTYPES, ROPE_SUFFIX, split_cache_choice

PROTOCOL = "kv-frontier-v1"
ORIGINAL_CACHES = ("bf16", "int8", "int4")  # what a user of the original can already choose
LATENT_CACHES = ("bf16", "int8", "int4")
PASSKEY_LENGTH = 4096
TARGET_SAVINGS = (0.5, 0.75, 0.875)  # fewer KV bytes than the bf16 original (the targets)


@dataclass
class FrontierPoint:
    model: str  # the source as loaded
    kind: str  # "original" or "mla"
    cache: str  # the cache format (mlakit.quant)
    bytes_per_token_layer: float  # as stored, mean over layers
    fewer_bytes: float  # against the original's bf16 cache
    ppl_512: float  # wikitext2-smollm2-v1
    ppl_long: float  # longctx-smollm2-v1, long windows
    passkey_4096: float | None  # passkey-v1 share at 4096 tokens (None: not run)
    seconds: float

    @property
    def label(self) -> str:
        name = "original" if self.kind == "original" else Path(self.model.split(" (")[0]).name
        return f"{name} {self.cache}"


@dataclass
class Windows:
    """What the figures are computed on: the protocol's windows, or other ones (tests)."""

    short: torch.Tensor  # [n, 512] wikitext2-smollm2-v1
    long: torch.Tensor  # [n, 4096] longctx-smollm2-v1
    passkey_length: int = PASSKEY_LENGTH
    passkey_trials: int | None = None  # None: the protocol's 20; 0: no passkey


@dataclass
class Frontier:
    protocol: str
    points: list[FrontierPoint]
    original_bytes_per_token_layer: float
    windows: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "original_bytes_per_token_layer": self.original_bytes_per_token_layer,
                "windows": self.windows, "seconds": self.seconds,
                "points": [{**asdict(p), "label": p.label} for p in self.points],
                "comparisons": comparisons(self.points)}


def protocol_windows(tokenizer) -> Windows:
    from mlakit import evaluate as ev

    tokens = ev.protocol_tokens(tokenizer)
    return Windows(short=ev.eval_windows(tokens), long=ev.long_windows(tokens))


def cache_bytes_per_token_layer(model, cache: str) -> float:
    """Bytes one token takes in ``model``'s cache in format ``cache``, mean over layers."""
    name, rope = split_cache_choice(cache)
    stored = model.new_cache(1, 1, dtype=torch.bfloat16, kv_cache_dtype=name, quantize_rope=rope)
    return stored.bytes_per_token() / model.config.n_layers


def window_ppl(model, windows: torch.Tensor, batch_size: int, options) -> float:
    """exp(mean next-token NLL) over ``windows [n, L]``, each from position 0, run with ``options``."""
    from mlakit.evaluate import window_nll

    nll = window_nll(model, windows, batch_size=batch_size, options=options)
    return float(torch.exp((nll / (windows.shape[0] * (windows.shape[1] - 1))).to(torch.float32)))


def measure(loaded, kind: str, cache: str, windows: Windows, original_bytes: float) -> FrontierPoint:
    """One point: ``loaded`` with its cache in format ``cache``."""
    from mlakit.passkey import evaluate_passkey

    start = time.perf_counter()
    options = ForwardOptions.for_cache(cache)
    model = loaded.model
    stored = cache_bytes_per_token_layer(model, cache)
    short = window_ppl(model, windows.short, 4, options)
    long = window_ppl(model, windows.long, 1, options)  # a 4096-token window's logits are large
    passkey = None
    if windows.passkey_trials != 0:
        result = evaluate_passkey(loaded, lengths=[windows.passkey_length], trials=windows.passkey_trials,
                                  progress=False, options=options)
        passkey = result.lengths[0].share
    return FrontierPoint(model=loaded.source, kind=kind, cache=cache, bytes_per_token_layer=stored,
                         fewer_bytes=1.0 - stored / original_bytes, ppl_512=short, ppl_long=long,
                         passkey_4096=passkey, seconds=time.perf_counter() - start)


def run_frontier(load: Callable[[str], Any], original: str, mla: Sequence[str],
                 original_caches: Sequence[str] = ORIGINAL_CACHES, latent_caches: Sequence[str] = LATENT_CACHES,
                 windows: Windows | None = None, passkey_trials: int | None = None,
                 progress: bool = True) -> Frontier:
    """Every point of the frontier: ``original`` in each of ``original_caches`` and each MLA
    checkpoint of ``mla`` in each of ``latent_caches``. ``load(ref)`` gives a loaded model
    (mlakit.loading.LoadedModel); each model is loaded once and freed before the next.
    ``windows``: None for the protocol's (from the original's tokenizer); ``passkey_trials``
    overrides theirs (0: no passkey)."""
    from tqdm.auto import tqdm

    from mlakit.passkey import TRIALS

    if not original_caches:
        raise MlakitError(f"{PROTOCOL} needs the original in at least one cache format (its bf16 bytes are the base)")
    start = time.perf_counter()
    jobs = [(original, "original", c) for c in original_caches] + [(m, "mla", c) for m in mla for c in latent_caches]
    bar = tqdm(total=len(jobs), desc=PROTOCOL, unit="point", disable=not progress)
    points: list[FrontierPoint] = []
    original_bytes = None
    for ref in dict.fromkeys(ref for ref, _, _ in jobs):
        loaded = load(ref)
        kind = "original" if ref == original else "mla"
        if kind == "original":
            original_bytes = cache_bytes_per_token_layer(loaded.model, "bf16")
            if loaded.model.config.is_mla:
                raise MlakitError(f"MODEL is the original (an MHA/GQA model); {original} is already MLA")
            if windows is None:
                windows = protocol_windows(loaded.tokenizer)
            if passkey_trials is not None:
                windows.passkey_trials = passkey_trials
        elif not loaded.model.config.is_mla:
            raise MlakitError(f"--mla {ref} is not an MLA checkpoint (convert it first: mlakit convert)")
        for _, _, cache in (j for j in jobs if j[0] == ref):
            bar.set_postfix_str(f"{kind} {cache}")
            points.append(measure(loaded, kind, cache, windows, original_bytes))
            bar.update()
        del loaded
    bar.close()
    trials = windows.passkey_trials
    return Frontier(protocol=PROTOCOL, points=points, original_bytes_per_token_layer=original_bytes,
                    windows={"short": list(windows.short.shape), "long": list(windows.long.shape),
                             "passkey_length": windows.passkey_length,
                             "passkey_trials": TRIALS if trials is None else trials},
                    seconds=time.perf_counter() - start)


# ------------------------------------------------------------------ the comparison the issue asks for
def _no_worse(a: FrontierPoint, b: FrontierPoint) -> dict[str, bool]:
    """Whether ``a`` is at least as good as ``b`` on each figure."""
    out = {"ppl_512": a.ppl_512 <= b.ppl_512, "ppl_long": a.ppl_long <= b.ppl_long}
    if a.passkey_4096 is not None and b.passkey_4096 is not None:
        out["passkey_4096"] = a.passkey_4096 >= b.passkey_4096
    return out


def comparisons(points: Sequence[FrontierPoint], savings: Sequence[float] = TARGET_SAVINGS) -> list[dict]:
    """Per target saving: mlakit's best MLA point at that saving or more (lowest wikitext2 ppl)
    against the original's quantised point with the fewest bytes at or above the MLA point's
    (the original with a quantised cache "at the same or more bytes")."""
    rows = []
    originals = sorted((p for p in points if p.kind == "original"), key=lambda p: p.bytes_per_token_layer)
    for saving in savings:
        candidates = [p for p in points if p.kind == "mla" and p.fewer_bytes >= saving - 1e-9
                      and math.isfinite(p.ppl_512)]
        if not candidates:
            rows.append({"saving": saving, "mla": None, "original": None, "no_worse": None})
            continue
        best = min(candidates, key=lambda p: p.ppl_512)
        rival = next((p for p in originals if p.bytes_per_token_layer >= best.bytes_per_token_layer), None)
        rows.append({"saving": saving, "mla": best.label, "original": rival.label if rival else None,
                     "no_worse": _no_worse(best, rival) if rival else None})
    return rows


# ------------------------------------------------------------------ output
def _passkey(p: FrontierPoint) -> str:
    return "" if p.passkey_4096 is None else f"{100 * p.passkey_4096:.0f}%"


def markdown_table(frontier: Frontier) -> str:
    head = ["model", "cache", "bytes/token/layer", "fewer bytes", "wikitext2 ppl", "long-window ppl",
            f"passkey {frontier.windows.get('passkey_length', PASSKEY_LENGTH)}"]
    lines = [f"Protocol `{frontier.protocol}` (wikitext2-smollm2-v1, longctx-smollm2-v1 long windows, passkey-v1); "
             f"bytes as stored (values + float32 scales; MLA: latent + 16-bit RoPE key), fewer bytes against the "
             f"original's bf16 cache ({frontier.original_bytes_per_token_layer:g} bytes/token/layer).", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for p in frontier.points:
        name = "original" if p.kind == "original" else f"`{p.model}`"
        lines.append(f"| {name} | {p.cache} | {p.bytes_per_token_layer:g} | {100 * p.fewer_bytes:.1f}% | "
                     f"{p.ppl_512:.2f} | {p.ppl_long:.2f} | {_passkey(p)} |")
    rows = comparisons(frontier.points)
    if any(r["mla"] for r in rows):
        lines += ["", "| fewer bytes (at least) | best MLA | original at the same or more bytes | "
                      "MLA no worse on |", "|---:|---|---|---|"]
        for r in rows:
            if r["mla"] is None:
                lines.append(f"| {100 * r['saving']:.1f}% | (no MLA point) | | |")
                continue
            verdict = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in (r["no_worse"] or {}).items())
            lines.append(f"| {100 * r['saving']:.1f}% | {r['mla']} | {r['original'] or '(none)'} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(frontier: Frontier, path: str | os.PathLike) -> None:
    """Three panels against bytes per token per layer: one line per model over its cache formats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mlakit.io import atomic_file

    panels = [("ppl_512", "wikitext2 ppl (512)"), ("ppl_long", "long-window ppl (4096)"),
              ("passkey_4096", f"passkey at {frontier.windows.get('passkey_length', PASSKEY_LENGTH)} (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    for ax, (key, title) in zip(axes, panels):
        for model in dict.fromkeys(p.model for p in frontier.points):
            series = sorted((p for p in frontier.points if p.model == model), key=lambda p: p.bytes_per_token_layer)
            values = [getattr(p, key) for p in series]
            if any(v is None for v in values):
                continue
            values = [100 * v for v in values] if key == "passkey_4096" else values
            original = series[0].kind == "original"
            label = "original (quantised K/V)" if original else Path(model.split(" (")[0]).name + " (MLA)"
            ax.plot([p.bytes_per_token_layer for p in series], values, marker="s" if original else "o",
                    linestyle="--" if original else "-", color="black" if original else None, label=label)
            for p, v in zip(series, values):
                ax.annotate(p.cache, (p.bytes_per_token_layer, v), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV bytes per token per layer (as stored)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if key != "passkey_4096":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(PROTOCOL)
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(frontier: Frontier, directory: str | os.PathLike) -> list[Path]:
    from mlakit.io import ensure_dir, write_text

    directory = ensure_dir(directory)
    md, png, js = directory / "frontier.md", directory / "frontier.png", directory / "frontier.json"
    write_text(js, json.dumps(frontier.to_dict(), indent=2) + "\n")
    plot(frontier, png)
    write_text(md, f"# KV-memory frontier\n\n{markdown_table(frontier)}\n![quality against KV bytes](frontier.png)\n")
    return [md, png, js]


# ------------------------------------------------------------------ the command
def _formats(text: str, flag: str, rope: bool = False) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    allowed = set(KV_CACHE_CHOICES if rope else KV_CACHE_DTYPES)
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        extra = f" (MLA: {ROPE_SUFFIX} quantises the RoPE key too, e.g. int4{ROPE_SUFFIX})" if rope else ""
        raise MlakitError(f"{flag} takes comma-separated formats of {', '.join(KV_CACHE_DTYPES)}{extra}, got {text!r}")
    return list(dict.fromkeys(names))


def register(subparsers) -> argparse.ArgumentParser:
    from mlakit.commands.common import MODEL_HELP, add_device_args

    parser = subparsers.add_parser(
        "frontier", help="kv-frontier-v1: quality against KV bytes, original (quantised K/V) vs MLA checkpoints",
        description="kv-frontier-v1 (PROTOCOL.md): for MODEL (the original) in each --cache-dtypes format and "
                    "each --mla checkpoint in each --latent-dtypes format, the KV bytes per token per layer as "
                    "stored (values + scales) and wikitext2-smollm2-v1 ppl, longctx-smollm2-v1 long-window ppl "
                    "and passkey-v1 at 4096 tokens (20 trials through the generation engine), each computed with "
                    "attention reading the cache as stored. Minutes per point on a GPU; on a 2-core CPU about "
                    "ten minutes per point for the default model.")
    parser.add_argument("model", metavar="MODEL", help=f"the original (MHA/GQA): {MODEL_HELP}")
    parser.add_argument("--mla", nargs="*", default=[], metavar="CKPT",
                        help="MLA checkpoints of MODEL (from mlakit convert / heal)")
    parser.add_argument("--cache-dtypes", default=",".join(ORIGINAL_CACHES), metavar="LIST",
                        help=f"the original's cache formats (default {','.join(ORIGINAL_CACHES)})")
    parser.add_argument("--latent-dtypes", default=",".join(LATENT_CACHES), metavar="LIST",
                        help=f"the MLA latent's formats (default {','.join(LATENT_CACHES)}); the RoPE key stays "
                             f"16-bit unless a format ends in {ROPE_SUFFIX} (e.g. int4{ROPE_SUFFIX})")
    parser.add_argument("--no-passkey", action="store_true", help="skip passkey-v1 (the slow part on a CPU)")
    parser.add_argument("--plot-dir", metavar="DIR", default=None,
                        help="write frontier.md, frontier.png and frontier.json to DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_args(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    from mlakit import checks
    from mlakit.loading import load

    original_caches = _formats(args.cache_dtypes, "--cache-dtypes")  # the cheap checks first
    latent_caches = _formats(args.latent_dtypes, "--latent-dtypes", rope=True)
    checks.model_ref(args.model)
    for ref in args.mla:
        checks.model_ref(ref, "--mla")
    if args.plot_dir is not None:
        checks.report_dir(args.plot_dir)
    device = checks.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))

    def load_ref(ref: str):
        loaded = load(ref, dtype=dtype, device=device)
        if loaded.tokenizer is None:
            raise MlakitError(f"{ref} has no tokenizer; {PROTOCOL} tokenises the protocol text with it")
        return loaded

    frontier = run_frontier(load_ref, args.model, args.mla, original_caches, latent_caches,
                            passkey_trials=0 if args.no_passkey else None, progress=not args.json)
    if args.plot_dir is not None:
        for path in write_report(frontier, args.plot_dir):
            if not args.json:
                print(f"wrote {path}")
    print(json.dumps(frontier.to_dict()) if args.json else markdown_table(frontier), end="\n" if args.json else "")
    return 0
