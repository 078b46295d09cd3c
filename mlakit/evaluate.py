"""Protocol perplexity: wikitext2-smollm2-v1 of ``shared/PROTOCOL.md``.

- text: ``shared/data/wikitext-2-raw/wiki.test.raw`` (UTF-8, ``\\r\\n`` -> ``\\n``),
  tokenised whole with the model's tokenizer, ``add_special_tokens=False``;
- calibration (for the converter): token ids ``[0, 32768)`` only;
- evaluation: 40 non-overlapping windows of 512 tokens from token 131072, each run
  from an empty cache; loss = mean next-token NLL over the 511 predicted positions of
  all windows; ppl = exp(loss) in float32;

and the long-window half of longctx-smollm2-v1: the same evaluation range cut into 5
windows of 4096 tokens, each from an empty cache, loss = mean NLL over the 4095 predicted
positions of each window, with the loss also bucketed by the predicted token's position
in its window (how much the model gains from distant context). The passkey half is
``mlakit.passkey``; out-of-domain text is ``mlakit.ood``; all of them together, ``mlakit.protocols``.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError

PROTOCOL = "wikitext2-smollm2-v1"
DATA_RELPATH = Path("shared/data/wikitext-2-raw/wiki.test.raw")
CALIB_RANGE = (0, 32768)
EVAL_START = 131072
EVAL_WINDOWS = 40
EVAL_WINDOW_LEN = 512
BASELINE_VALUES_PER_TOKEN_LAYER = 384  # the default model's GQA cache: 2 x 3 x 64
# The protocols are defined on the default model's tokenizer. The same text and token ranges
# through another family's tokenizer are that family's protocol (docs/protocols.md): the
# Gemma 3 tokenizer gives wikitext2-gemma3-270m-v1, longctx-gemma3-270m-v1, ood-gemma3-270m-v1.
FAMILY_TAGS = {"gemma3": "gemma3-270m"}


def data_path() -> Path:
    """The protocol's text: ``$MLAKIT_DATA_FILE``, else ``shared/data/...`` beside or above
    the working directory or the repository."""
    env = os.environ.get("MLAKIT_DATA_FILE")
    if env:
        path = Path(env)
        if not path.exists():
            raise MlakitError(f"MLAKIT_DATA_FILE={env} does not exist")
        return path
    repo = Path(__file__).resolve().parents[1]
    candidates = []
    for base in (Path.cwd(), repo):
        candidates += [base / DATA_RELPATH, base.parent / DATA_RELPATH]
    for path in candidates:
        if path.exists():
            return path
    raise MlakitError(f"the protocol text {DATA_RELPATH} was not found (looked beside and above {repo}); "
                      "set MLAKIT_DATA_FILE to wiki.test.raw")


# Token ids of whole texts per tokenizer object, held weakly: an entry goes with its
# tokenizer. (Keyed by id() they outlived it, and a later tokenizer at the same address
# was handed the dead one's ids: in CI a tiny test tokenizer's ids scored the default
# model at 387 instead of 29.60.)
_TEXT_TOKENS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def text_token_ids(tokenizer: Any, path: Path, read: Callable[[Path], str]) -> torch.Tensor:
    """All token ids ``[n]`` of the text ``read(path)`` (cached per tokenizer and file in this process)."""
    try:
        per_file = _TEXT_TOKENS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced is tokenised every time
        per_file = {}
    if str(path) not in per_file:
        ids = tokenizer(read(path), add_special_tokens=False).input_ids
        per_file[str(path)] = torch.tensor(ids, dtype=torch.long)
    return per_file[str(path)]


def protocol_tokens(tokenizer: Any) -> torch.Tensor:
    """All token ids ``[n]`` of the protocol text (cached per tokenizer in this process)."""
    if tokenizer is None:
        raise MlakitError("the model has no tokenizer: the protocol tokenises text with the model's tokenizer")
    return text_token_ids(tokenizer, data_path(), lambda path: path.read_text(encoding="utf-8").replace("\r\n", "\n"))


def calibration_tokens(tokenizer: Any, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` (default all 32768) ids of the calibration range."""
    start, end = CALIB_RANGE
    n = end - start if n_tokens is None else n_tokens
    if not 0 < n <= end - start:
        raise MlakitError(f"calibration tokens must be in [1, {end - start}] (the protocol's range), got {n}")
    return protocol_tokens(tokenizer)[start:start + n]


def protocol_windows(tokens: torch.Tensor, windows: int, window_len: int) -> torch.Tensor:
    """``[windows, window_len]``: consecutive windows of the evaluation range, from token 131072."""
    end = EVAL_START + windows * window_len
    if tokens.numel() < end:
        raise MlakitError(f"the protocol text has {tokens.numel()} tokens, fewer than the {end} it needs")
    return tokens[EVAL_START:end].view(windows, window_len)


def eval_windows(tokens: torch.Tensor) -> torch.Tensor:
    """``[40, 512]`` evaluation windows."""
    return protocol_windows(tokens, EVAL_WINDOWS, EVAL_WINDOW_LEN)


@dataclass
class EvalResult:
    protocol: str
    model: str
    ppl: float
    nll: float
    tokens: int  # predicted positions
    windows: int
    kv_values_per_token_layer: float  # mean over layers
    kv_values_per_token: int  # summed over layers
    kv_saving: float  # vs the default model's 384 values per token per layer
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def protocol_name(name: str, config) -> str:
    """The name a protocol goes by for a model of ``config``'s family (``FAMILY_TAGS``)."""
    tag = FAMILY_TAGS.get(config.arch)
    return name.replace("smollm2", tag) if tag else name


def kv_figures(config) -> tuple[float, int, float]:
    """(values per token per layer (mean), values per token (all layers), KV saving against
    the original's cache): the original is the default model (384 values per token per
    layer), or for another family (``FAMILY_TAGS``) its own K/V cache, which a converted
    config keeps in ``n_kv_heads`` and ``head_dim``."""
    total = config.kv_values_per_token_total()
    per_layer = total / config.n_layers
    base = 2 * config.n_kv_heads * config.head_dim if config.arch in FAMILY_TAGS else BASELINE_VALUES_PER_TOKEN_LAYER
    return per_layer, total, 1.0 - per_layer / base


@torch.inference_mode()
def position_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                 desc: str = PROTOCOL, options=None) -> torch.Tensor:
    """Next-token NLL ``[L - 1]`` (float64) summed over all windows ``[n, L]``, each run from
    position 0; entry j is the loss of predicting the window's token j + 1. The loss itself
    is computed in float32 whatever the model's dtype. ``options`` (mlakit.options.ForwardOptions;
    None: the default) runs the forward: through a quantised cache's values as stored, or
    top-k sparse attention (a masked dense computation: the reference, not fast)."""
    from mlakit.options import DEFAULT
    from tqdm.auto import tqdm

    device = model.device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)  # [L-1]
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=f"eval {desc}", unit="batch", disable=not progress, leave=False):
        batch = windows[start:start + batch_size].to(device)  # [b, L]
        logits = model(batch[:, :-1], options=options or DEFAULT).float()  # [b, L-1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="none").view(batch.shape[0], -1)  # [b, L-1]
        total += nll.sum(dim=0).double().cpu()
        del logits, nll
    return total


def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
               options=None) -> torch.Tensor:
    """Summed next-token NLL (float64) over all windows ``[n, L]``, each from position 0."""
    return position_nll(model, windows, batch_size, progress, options=options).sum()


def evaluate(loaded, batch_size: int = 4, progress: bool = True, options=None) -> EvalResult:
    """wikitext2-smollm2-v1 perplexity of a loaded model (original or converted); ``options``
    as in ``position_nll``."""
    import time

    start = time.perf_counter()
    windows = eval_windows(protocol_tokens(loaded.tokenizer))
    nll_sum = window_nll(loaded.model, windows, batch_size, progress, options=options)
    n = windows.shape[0] * (windows.shape[1] - 1)
    loss = (nll_sum / n).to(torch.float32)
    ppl = float(torch.exp(loss))
    per_layer, total, saving = kv_figures(loaded.model.config)
    return EvalResult(protocol=protocol_name(PROTOCOL, loaded.model.config), model=loaded.source, ppl=ppl, nll=float(loss), tokens=n,
                      windows=windows.shape[0], kv_values_per_token_layer=per_layer, kv_values_per_token=total,
                      kv_saving=saving, seconds=time.perf_counter() - start)


def format_result(result: EvalResult) -> str:
    finite = math.isfinite(result.ppl)
    return (f"[{result.protocol}] {result.model}: ppl {result.ppl:.2f}{'' if finite else ' (not finite)'} "
            f"over {result.tokens} tokens; KV {result.kv_values_per_token_layer:g} values/token/layer, "
            f"saving {100 * result.kv_saving:.1f}%")


# ------------------------------------------------------------------ longctx-smollm2-v1: long windows
LONG_PROTOCOL = "longctx-smollm2-v1"
LONG_WINDOWS = 5
LONG_WINDOW_LEN = 4096
# buckets of the predicted token's position j in its window (j = 1 .. 4095): the loss at
# long range against the loss with little context
POSITION_BUCKETS = ((1, 512), (512, 1024), (1024, 2048), (2048, 4096))


def long_windows(tokens: torch.Tensor) -> torch.Tensor:
    """``[5, 4096]``: the wikitext2 evaluation range ``[131072, 151552)`` in long windows."""
    return protocol_windows(tokens, LONG_WINDOWS, LONG_WINDOW_LEN)


@dataclass
class LongWindowResult:
    protocol: str
    model: str
    ppl: float
    nll: float
    tokens: int  # predicted positions
    windows: int
    window_len: int
    # "[a,b)" -> {"nll", "ppl", "tokens"} over the predicted tokens at window positions a <= j < b
    by_position: dict[str, dict[str, float]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bucket_losses(nll_by_position: torch.Tensor, windows: int,
                  buckets=POSITION_BUCKETS) -> dict[str, dict[str, float]]:
    """The mean loss per bucket of predicted positions, from ``nll_by_position [L - 1]``
    (entry j - 1 is the summed loss of predicting token j)."""
    out = {}
    for lo, hi in buckets:
        hi = min(hi, nll_by_position.numel() + 1)
        if lo >= hi:
            continue
        n = (hi - lo) * windows
        loss = (nll_by_position[lo - 1:hi - 1].sum() / n).to(torch.float32)
        out[f"[{lo},{hi})"] = {"nll": float(loss), "ppl": float(torch.exp(loss)), "tokens": n}
    return out


def evaluate_long_window(loaded, progress: bool = True, windows: torch.Tensor | None = None,
                         options=None) -> LongWindowResult:
    """longctx-smollm2-v1's long-window perplexity: windows one at a time (a 4096-token
    window's float32 logits alone take 0.8 GB for the default model's vocabulary).
    ``windows``: other windows than the protocol's (tests)."""
    import time

    start = time.perf_counter()
    if windows is None:
        windows = long_windows(protocol_tokens(loaded.tokenizer))
    by_position = position_nll(loaded.model, windows, batch_size=1, progress=progress, desc=LONG_PROTOCOL,
                               options=options)
    n = windows.shape[0] * (windows.shape[1] - 1)
    loss = (by_position.sum() / n).to(torch.float32)
    return LongWindowResult(protocol=protocol_name(LONG_PROTOCOL, loaded.model.config), model=loaded.source, ppl=float(torch.exp(loss)), nll=float(loss),
                            tokens=n, windows=windows.shape[0], window_len=windows.shape[1],
                            by_position=bucket_losses(by_position, windows.shape[0]),
                            seconds=time.perf_counter() - start)


def format_long_window(result: LongWindowResult) -> str:
    buckets = ", ".join(f"{k} {v['ppl']:.2f}" for k, v in result.by_position.items())
    return (f"[{result.protocol}] {result.model}: long-window ppl {result.ppl:.2f} over {result.windows} x "
            f"{result.window_len} tokens; by position {buckets}")
