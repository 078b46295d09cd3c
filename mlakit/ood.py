"""ood-smollm2-v1: perplexity on English text that is not wikitext (docs/protocols.md).

Two kinds of prose, both Project Gutenberg texts of the Canterbury compression corpus as
shipped in the PyPI source distribution ``Brotli==1.1.0`` (``tests/testdata/``), so any
machine gets them with pip and no hub:

- ``fiction``: ``alice29.txt``, Lewis Carroll, *Alice's Adventures in Wonderland*
  (39,357 tokens of the default model);
- ``expository``: ``lcet10.txt``, the proceedings of the Library of Congress Workshop
  on Electronic Texts, 1992 (92,856 tokens).

Each text: read as UTF-8, ``\\r\\n`` -> ``\\n``, tokenised whole with the model's tokenizer,
``add_special_tokens=False``. Calibration (anything fitted to data): token ids
``[0, 8192)`` only. Evaluation: 32 non-overlapping windows of 512 tokens from token 16384
(``[16384, 32768)``), each from an empty cache; loss = mean next-token NLL over the 511
predicted positions of all windows, float32; ppl = exp(loss) per text. The summary ppl
is exp of the mean of the texts' losses.

``scripts/fetch_ood_text.py`` (``fetch`` below) downloads the sdist, checks its SHA-256,
and writes the two files to ``data/ood/`` of the repository; reading checks each file's
SHA-256, so every machine measures the same text.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError

PROTOCOL = "ood-smollm2-v1"
PACKAGE = "brotli==1.1.0"
SDIST_NAME = "Brotli-1.1.0.tar.gz"
SDIST_SHA256 = "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724"
MEMBER_DIR = "Brotli-1.1.0/tests/testdata"
CALIB_RANGE = (0, 8192)
EVAL_START = 16384
EVAL_WINDOWS = 32
EVAL_WINDOW_LEN = 512


@dataclass(frozen=True)
class OodText:
    name: str  # the kind of text
    file: str
    sha256: str
    title: str


TEXTS = (
    OodText("fiction", "alice29.txt", "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
            "Lewis Carroll, Alice's Adventures in Wonderland"),
    OodText("expository", "lcet10.txt", "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
            "Library of Congress Workshop on Electronic Texts, proceedings (1992)"),
)
REPO_DIR = Path(__file__).resolve().parents[1] / "data" / "ood"


def text_by_name(name: str) -> OodText:
    for text in TEXTS:
        if text.name == name:
            return text
    raise MlakitError(f"no out-of-domain text {name!r}; the texts are {', '.join(t.name for t in TEXTS)}")


def ood_dir() -> Path:
    """Where the texts are: ``$MLAKIT_OOD_DIR``, else ``data/ood`` of the working directory
    or of the repository, else ``~/.cache/mlakit/ood``."""
    env = os.environ.get("MLAKIT_OOD_DIR")
    if env:
        return Path(env)
    candidates = [Path.cwd() / "data" / "ood", REPO_DIR,
                  Path(os.environ.get("MLAKIT_CACHE_DIR", Path.home() / ".cache" / "mlakit")) / "ood"]
    for path in candidates:
        if all((path / t.file).exists() for t in TEXTS):
            return path
    return REPO_DIR


def available() -> bool:
    directory = ood_dir()
    return all((directory / t.file).exists() for t in TEXTS)


def read_text(path: Path, sha256: str | None = None) -> str:
    """A text as the protocol reads it; with ``sha256``, only the exact file."""
    if not path.exists():
        raise MlakitError(f"{path} is missing: run scripts/fetch_ood_text.py (or set MLAKIT_OOD_DIR)")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise MlakitError(f"{path} is not the file {PROTOCOL} measures (SHA-256 differs); fetch it again")
    return data.decode("utf-8").replace("\r\n", "\n")


def text_tokens(tokenizer: Any, name: str) -> torch.Tensor:
    """All token ids ``[n]`` of one text (cached per tokenizer in this process)."""
    from mlakit.evaluate import text_token_ids

    if tokenizer is None:
        raise MlakitError(f"{PROTOCOL} tokenises text with the model's tokenizer, and the model has none")
    spec = text_by_name(name)
    return text_token_ids(tokenizer, ood_dir() / spec.file, lambda path: read_text(path, spec.sha256))


def calibration_tokens(tokenizer: Any, name: str, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` (default all 8192) ids of a text's calibration range."""
    start, end = CALIB_RANGE
    n = end - start if n_tokens is None else n_tokens
    if not 0 < n <= end - start:
        raise MlakitError(f"{PROTOCOL} calibration tokens must be in [1, {end - start}], got {n}")
    return text_tokens(tokenizer, name)[start:start + n]


def eval_windows(tokens: torch.Tensor) -> torch.Tensor:
    """``[32, 512]`` evaluation windows of one text."""
    end = EVAL_START + EVAL_WINDOWS * EVAL_WINDOW_LEN
    if tokens.numel() < end:
        raise MlakitError(f"the text has {tokens.numel()} tokens, fewer than the {end} {PROTOCOL} needs")
    return tokens[EVAL_START:end].view(EVAL_WINDOWS, EVAL_WINDOW_LEN)


@dataclass
class OodResult:
    protocol: str
    model: str
    ppl: float  # exp(mean of the texts' losses)
    texts: dict[str, dict[str, float]]  # name -> {"ppl", "nll", "tokens"}
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_ood(loaded, batch_size: int = 4, progress: bool = True,
                 windows: dict[str, torch.Tensor] | None = None, options=None) -> OodResult:
    """ood-smollm2-v1 of a loaded model. ``windows``: other windows per text (tests)."""
    from mlakit.evaluate import position_nll, protocol_name

    start = time.perf_counter()
    if windows is None:
        windows = {t.name: eval_windows(text_tokens(loaded.tokenizer, t.name)) for t in TEXTS}
    texts = {}
    for name, w in windows.items():
        n = w.shape[0] * (w.shape[1] - 1)
        loss = (position_nll(loaded.model, w, batch_size, progress, desc=f"{PROTOCOL} {name}", options=options).sum() / n)
        loss = loss.to(torch.float32)
        texts[name] = {"ppl": float(torch.exp(loss)), "nll": float(loss), "tokens": n}
    mean_loss = torch.tensor([t["nll"] for t in texts.values()], dtype=torch.float32).mean()
    return OodResult(protocol=protocol_name(PROTOCOL, loaded.model.config), model=loaded.source,
                     ppl=float(torch.exp(mean_loss)), texts=texts,
                     seconds=time.perf_counter() - start)


def format_ood(result: OodResult) -> str:
    parts = ", ".join(f"{name} {t['ppl']:.2f}" for name, t in result.texts.items())
    return f"[{result.protocol}] {result.model}: ppl {parts} (mean {result.ppl:.2f})"


# ------------------------------------------------------------------ fetching the texts
def fetch(dest: Path | None = None, python: str | None = None) -> Path:
    """Download ``Brotli==1.1.0``'s sdist with pip, check it, and write the two texts to
    ``dest`` (default ``data/ood`` of the repository), each checked and written atomically."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    dest = Path(dest or REPO_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST_NAME
        if done.returncode != 0 or not sdist.exists():
            raise MlakitError(f"pip download {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
            raise MlakitError(f"{SDIST_NAME} has another SHA-256 than {SDIST_SHA256}")
        with tarfile.open(sdist) as tar:
            for spec in TEXTS:
                data = tar.extractfile(f"{MEMBER_DIR}/{spec.file}").read()
                if hashlib.sha256(data).hexdigest() != spec.sha256:
                    raise MlakitError(f"{spec.file} in {SDIST_NAME} has another SHA-256 than expected")
                _write_atomic(dest / spec.file, data)
    return dest


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp sibling, fsync, rename: a reader never sees half a file."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
