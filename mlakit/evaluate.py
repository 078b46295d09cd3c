"""Protocol perplexity: wikitext2-smollm2-v1 of ``shared/PROTOCOL.md``.

- text: ``shared/data/wikitext-2-raw/wiki.test.raw`` (UTF-8, ``\\r\\n`` -> ``\\n``),
  tokenised whole with the model's tokenizer, ``add_special_tokens=False``;
- calibration (for the converter): token ids ``[0, 32768)`` only;
- evaluation: 40 non-overlapping windows of 512 tokens from token 131072, each run
  from an empty cache; loss = mean next-token NLL over the 511 predicted positions of
  all windows; ppl = exp(loss) in float32.
"""

from __future__ import annotations

import math
import os
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


_TOKEN_CACHE: dict[tuple[str, int], torch.Tensor] = {}


def protocol_tokens(tokenizer: Any) -> torch.Tensor:
    """All token ids ``[n]`` of the protocol text (cached per tokenizer in this process)."""
    if tokenizer is None:
        raise MlakitError("the model has no tokenizer: the protocol tokenises text with the model's tokenizer")
    path = data_path()
    key = (str(path), id(tokenizer))
    if key not in _TOKEN_CACHE:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        ids = tokenizer(text, add_special_tokens=False).input_ids
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def calibration_tokens(tokenizer: Any, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` (default all 32768) ids of the calibration range."""
    start, end = CALIB_RANGE
    n = end - start if n_tokens is None else n_tokens
    if not 0 < n <= end - start:
        raise MlakitError(f"calibration tokens must be in [1, {end - start}] (the protocol's range), got {n}")
    return protocol_tokens(tokenizer)[start:start + n]


def eval_windows(tokens: torch.Tensor) -> torch.Tensor:
    """``[40, 512]`` evaluation windows."""
    end = EVAL_START + EVAL_WINDOWS * EVAL_WINDOW_LEN
    if tokens.numel() < end:
        raise MlakitError(f"the protocol text has {tokens.numel()} tokens, fewer than the {end} it needs")
    return tokens[EVAL_START:end].view(EVAL_WINDOWS, EVAL_WINDOW_LEN)


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


def kv_figures(config) -> tuple[float, int, float]:
    """(values per token per layer (mean), values per token (all layers), KV saving vs 384)."""
    total = config.kv_values_per_token_total()
    per_layer = total / config.n_layers
    return per_layer, total, 1.0 - per_layer / BASELINE_VALUES_PER_TOKEN_LAYER


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
               options=None) -> torch.Tensor:
    """Summed next-token NLL (float64) over all windows ``[n, L]``, each from position 0.
    ``options`` (mlakit.options.ForwardOptions; None: the default) runs the forward, e.g.
    through top-k sparse attention (a masked dense computation: the reference, not fast)."""
    from mlakit.options import DEFAULT
    from tqdm.auto import tqdm

    device = model.device
    total = torch.zeros((), dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=f"eval {PROTOCOL}", unit="batch", disable=not progress, leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch[:, :-1], options=options or DEFAULT).float()  # [b, L-1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.double().cpu()
    return total


def evaluate(loaded, batch_size: int = 4, progress: bool = True, options=None) -> EvalResult:
    """wikitext2-smollm2-v1 perplexity of a loaded model (original or converted); ``options``
    as in ``window_nll``."""
    import time

    start = time.perf_counter()
    windows = eval_windows(protocol_tokens(loaded.tokenizer))
    nll_sum = window_nll(loaded.model, windows, batch_size, progress, options=options)
    n = windows.shape[0] * (windows.shape[1] - 1)
    loss = (nll_sum / n).to(torch.float32)
    ppl = float(torch.exp(loss))
    per_layer, total, saving = kv_figures(loaded.model.config)
    return EvalResult(protocol=PROTOCOL, model=loaded.source, ppl=ppl, nll=float(loss), tokens=n,
                      windows=windows.shape[0], kv_values_per_token_layer=per_layer, kv_values_per_token=total,
                      kv_saving=saving, seconds=time.perf_counter() - start)


def format_result(result: EvalResult) -> str:
    finite = math.isfinite(result.ppl)
    return (f"[{result.protocol}] {result.model}: ppl {result.ppl:.2f}{'' if finite else ' (not finite)'} "
            f"over {result.tokens} tokens; KV {result.kv_values_per_token_layer:g} values/token/layer, "
            f"saving {100 * result.kv_saving:.1f}%")
