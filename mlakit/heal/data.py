"""Training text for healing, without leaks from the evaluation range.

By default the teacher writes it: sampled continuations (temperature ~1, top-p 0.95)
of short prompts, generated in large batches with ``mlakit.engine``. The prompts are
a built-in list of a few dozen diverse openings plus, when the protocol text is here,
short snippets of the protocol's *calibration* range (token ids [0, 32768)), never of
the evaluation range [131072, 151552). Generated text is cached on disk under
``$MLAKIT_CACHE_DIR/heal`` (default ``~/.cache/mlakit/heal``), keyed by the teacher's
weights and every generation setting, so the sweep over KV savings generates once.

``--data FILE`` (text, ``.pt`` or ``.npy`` of token ids) replaces the generated text. The
protocol's evaluation file is refused unless ``--data-range`` excludes the evaluation
range, and any data containing evaluation-range text (32-token n-grams of it) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mlakit.errors import MlakitError
from mlakit.io import atomic_file, write_text
from mlakit.evaluate import CALIB_RANGE, EVAL_START, EVAL_WINDOW_LEN, EVAL_WINDOWS

EVAL_RANGE = (EVAL_START, EVAL_START + EVAL_WINDOWS * EVAL_WINDOW_LEN)  # [131072, 151552)
DATA_VERSION = 2  # bump when the generation procedure changes: old caches are then ignored
#                  (2: top-p draws without sorting; same distribution, other tokens for a seed)

# Short openings across genres and topics: the teacher continues each one many times
# (sampling at temperature 1 makes the continuations differ).
BUILTIN_PROMPTS = [
    "The history of the Roman Empire",
    "In 1969, the first humans",
    "Photosynthesis is the process by which",
    "Once upon a time, in a small village by the sea,",
    "The recipe calls for two cups of flour,",
    "def quicksort(arr):",
    "Dear hiring manager,",
    "The stock market fell sharply on Monday after",
    "The mitochondria is",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "Q: What causes the seasons on Earth?\nA:",
    "The following is an interview with a jazz musician about",
    "Abstract: We propose a new method for",
    "The village of Ashcombe is a civil parish in",
    "How to change a flat tyre: first,",
    "The band released their second studio album in",
    "In mathematics, a prime number is",
    "The football match ended in a draw after",
    "Breaking news: scientists have discovered",
    "The French Revolution began in 1789 when",
    "My favourite way to spend a Sunday morning is",
    "The train pulled into the station and",
    "Climate change affects agriculture in several ways.",
    "Review: The new smartphone has a",
    "The king summoned his advisers and said,",
    "Water boils at 100 degrees Celsius because",
    "import numpy as np\n\n",
    "The museum's collection includes paintings by",
    "During the Second World War, the battalion",
    "To whom it may concern,",
    "The hurricane made landfall near",
    "Tips for learning a new language:",
    "The cathedral was built in the 13th century and",
    "She opened the letter and read:",
    "The species is found in the forests of",
    "A balanced diet should include",
    "The election results showed that",
    "The song was written by",
    "According to the latest census, the population of",
    "The ship sailed from Portsmouth in",
    "In the beginning, the universe was",
    "The school was founded in 1852 by",
    "The novel tells the story of",
    "Step 3: Connect the red wire to",
    "The river flows north through",
    "The film received mixed reviews from critics, who",
]


@dataclass
class TeacherDataOptions:
    tokens: int = 4_000_000  # distinct tokens to generate
    seq_len: int = 512  # training window length
    batch: int | None = None  # sequences generated together (None: default_gen_batch)
    temperature: float = 1.0
    top_p: float = 0.95
    snippet_fraction: float = 0.5  # share of prompts cut from the protocol's calibration range
    max_prompt_len: int = 48
    doc_tokens: int | None = None  # new tokens per document at most (None: seq_len - max_prompt_len)
    seed: int = 0
    max_minutes: float | None = None  # stop generating after about this long (fewer tokens); not in the cache key

    RUNTIME_ONLY = ("max_minutes",)
    # options newer than text already cached: in the cache key only when set, so that text stays valid
    KEY_WHEN_SET = ("doc_tokens",)

    def check(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise MlakitError(f"--gen-batch must be at least 1, got {self.batch}")
        if self.tokens < self.seq_len:
            raise MlakitError(f"the teacher must generate at least one window ({self.seq_len} tokens), "
                              f"got {self.tokens}")
        if not 0 <= self.snippet_fraction <= 1:
            raise MlakitError(f"the snippet fraction must be in [0, 1], got {self.snippet_fraction}")
        if self.seq_len <= self.max_prompt_len:
            raise MlakitError(f"--seq-len must exceed the longest prompt ({self.max_prompt_len})")
        if self.doc_tokens is not None and not 1 <= self.doc_tokens <= self.seq_len - self.max_prompt_len:
            raise MlakitError(f"--doc-tokens must be in [1, {self.seq_len - self.max_prompt_len}] (--seq-len minus "
                              f"the longest prompt), got {self.doc_tokens}")

    @property
    def new_tokens_per_document(self) -> int:
        return self.seq_len - self.max_prompt_len if self.doc_tokens is None else self.doc_tokens


GEN_BATCH_CPU = 256
GEN_BATCH_MAX = 2048
GEN_CACHE_SHARE = 0.25  # of the GPU's memory, for the teacher's KV cache while it writes


def default_gen_batch(teacher, seq_len: int, tokens: int | None = None) -> int:
    """Sequences the teacher writes together when none is given: 256 on the CPU; on a GPU
    the largest power of two up to 2048 whose KV cache fits in a quarter of its memory;
    with ``tokens``, at most the power of two >= 4 x the windows asked (at least 8), so a
    small request does not wait for hundreds of sequences it will not keep (a batch runs
    until its longest row ends).

    Larger batches write faster on a GPU until the step is bound by reading the cache
    (default model, H200, random weights, ``scripts/device/gen_speed.py``: 168k tokens/s at
    batch 1024, 198k at 4096). At 512 tokens the default model's cache is 11.8 MB per
    sequence: 2048 on an H200 (141 GB), 1024 on an 80 GB H100, 512 on a 24 GB card."""
    if teacher.device.type != "cuda":
        batch = GEN_BATCH_CPU
    else:
        per_sequence = teacher.new_cache(1, 1).bytes_per_token() * seq_len  # the engine's cache: the model's dtype
        budget = GEN_CACHE_SHARE * torch.cuda.get_device_properties(teacher.device).total_memory
        batch = GEN_BATCH_MAX
        while batch > 1 and batch * per_sequence > budget:
            batch //= 2
    if tokens is not None:
        # rows that stop early yield less than a window each, hence the factor 4
        wanted = 4 * -(-tokens // seq_len)
        batch = min(batch, max(8, 1 << (wanted - 1).bit_length()))
    return batch


def cache_root() -> Path:
    return Path(os.environ.get("MLAKIT_CACHE_DIR", Path.home() / ".cache" / "mlakit")) / "heal"


def model_fingerprint(model) -> str:
    """A hash of a model's config and weights (cheap: per-tensor sums on the model's device)."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    digest.update(str(model.dtype).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().double()
            digest.update(f"{name}{tuple(t.shape)}{t.sum().item():.12e}{t.square().sum().item():.12e}".encode())
    return digest.hexdigest()[:20]


# ------------------------------------------------------------------ prompts
def _calibration_ids(tokenizer) -> torch.Tensor | None:
    from mlakit.evaluate import calibration_tokens

    try:
        return calibration_tokens(tokenizer)
    except MlakitError:
        return None  # no protocol text here: built-in prompts only


def make_prompts(tokenizer, n: int, options: TeacherDataOptions, batch_index: int,
                 calib: torch.Tensor | None) -> list[list[int]]:
    """``n`` prompts (token ids) for one generation batch, a pure function of the seed and
    the batch index. Snippets come from the calibration range only."""
    rng = random.Random(options.seed * 7919 + batch_index)
    builtin = [tokenizer(p, add_special_tokens=False).input_ids[: options.max_prompt_len] for p in BUILTIN_PROMPTS]
    builtin = [p for p in builtin if p]
    prompts = []
    for _ in range(n):
        if calib is not None and rng.random() < options.snippet_fraction:
            length = rng.randint(8, options.max_prompt_len)
            start = rng.randrange(0, min(calib.numel(), CALIB_RANGE[1]) - length)  # inside [0, 32768)
            prompts.append(calib[start:start + length].tolist())
        else:
            prompts.append(list(rng.choice(builtin)))
    return prompts


# ------------------------------------------------------------------ generation
def teacher_data(teacher, tokenizer, options: TeacherDataOptions, progress: bool = True,
                 log=print, stats: dict | None = None) -> torch.Tensor:
    """``[n, seq_len]`` windows of teacher-written text (from the cache when it has them).

    ``stats`` (a dict, filled in) receives how the text was generated: seconds, tokens/s,
    whether it came from the cache, whether ``max_minutes`` cut it short. A cut-short text
    is cached too, but only reused by calls that also set ``max_minutes``."""
    options.check()
    if options.batch is None:
        options = replace(options, batch=default_gen_batch(teacher, options.seq_len, options.tokens))
    stats = {} if stats is None else stats
    if tokenizer is None:
        raise MlakitError("the teacher has no tokenizer, so it cannot be prompted: give --data FILE of token ids")
    calib = _calibration_ids(tokenizer) if options.snippet_fraction > 0 else None
    key_options = {k: v for k, v in asdict(options).items() if k not in TeacherDataOptions.RUNTIME_ONLY
                   and not (k in TeacherDataOptions.KEY_WHEN_SET and v is None)}
    key_data = {"version": DATA_VERSION, "teacher": model_fingerprint(teacher), "options": key_options,
                "prompts": hashlib.sha256("\x00".join(BUILTIN_PROMPTS).encode()).hexdigest()[:16],
                "snippets": None if calib is None else hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16],
                "device": teacher.device.type}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root() / f"teacher-{key}.pt"
    if path.exists():
        try:
            meta = _read_meta(path.with_suffix(".json"))
            generation = meta.get("generation", {})
            if generation.get("complete", True) or options.max_minutes is not None:
                saved = torch.load(path, weights_only=True)
                log(f"teacher text: {saved.numel():,} tokens from the cache ({path})"
                    + (f"; generated in {generation['seconds']:.0f}s, {generation['tokens_per_second']:,.0f} "
                       "tokens/s" if "seconds" in generation else ""))
                stats.update(generation, cached=True)
                return saved.long()
        except (OSError, RuntimeError, KeyError, TypeError, ValueError):
            pass  # a damaged cache file is regenerated
    windows, generation = _generate(teacher, tokenizer, options, calib, progress)
    log(f"teacher text: {generation['tokens']:,} tokens ({generation['new_tokens']:,} sampled) in "
        f"{generation['seconds']:.0f}s: {generation['tokens_per_second']:,.0f} tokens/s (batch {options.batch}"
        f"{', compiled' if generation['compiled'] else ''})"
        + ("" if generation["complete"] else f"; stopped after {options.max_minutes:g} minutes "
           f"({options.tokens:,} asked)"))
    stats.update(generation, cached=False)
    try:
        with atomic_file(path, overwrite=True, lock=False) as tmp:
            torch.save(windows.to(torch.int32), tmp)  # a plain tensor: read back with weights_only=True
        write_text(path.with_suffix(".json"), json.dumps({**key_data, "generation": generation}, indent=2) + "\n",
                   lock=False)
    except (OSError, MlakitError):
        pass  # a read-only cache only costs time
    return windows


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _generate(teacher, tokenizer, options: TeacherDataOptions, calib: torch.Tensor | None,
              progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    from tqdm.auto import tqdm

    from mlakit.engine import Engine, SamplingParams, generate_batch

    start = time.perf_counter()
    max_new = options.new_tokens_per_document
    batch = options.batch
    fast = teacher.device.type == "cuda"  # the engine's fast mode: on the CPU it measured slower
    # one engine (one CUDA graph) for all batches
    engine = Engine(teacher, batch, options.max_prompt_len + max_new, compile=fast)
    stream: list[int] = []
    new_tokens = 0
    bar = tqdm(total=options.tokens, desc="teacher text", unit="tok", unit_scale=True, disable=not progress)
    batch_index = 0
    complete = True
    while len(stream) < options.tokens:
        if options.max_minutes is not None and batch_index > 0:
            elapsed = time.perf_counter() - start
            if elapsed + elapsed / batch_index > 60 * options.max_minutes:  # the next batch would end too late
                complete = False
                break
        prompts = make_prompts(tokenizer, batch, options, batch_index, calib)
        params = SamplingParams(max_new_tokens=max_new, temperature=options.temperature, top_p=options.top_p,
                                seed=options.seed * 1_000_003 + batch_index)
        tokens, counts = generate_batch(teacher, prompts, params, engine=engine)  # [batch, max_new], [batch]
        before = len(stream)
        for prompt, row, count in zip(prompts, tokens.tolist(), counts.tolist()):
            stream += prompt + row[:count]  # documents are packed; a finished one ends with its EOS
            new_tokens += count
        bar.update(min(len(stream), options.tokens) - min(before, options.tokens))
        batch_index += 1
    bar.close()
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)
    seconds = time.perf_counter() - start
    n = len(stream) // options.seq_len
    n = min(n, -(-options.tokens // options.seq_len))
    windows = torch.tensor(stream[: n * options.seq_len], dtype=torch.long).view(n, options.seq_len)
    # tokens/s: everything the batches produced (prompts + samples); the windows keep up to ``tokens`` of it
    stats = {"tokens": windows.numel(), "new_tokens": new_tokens, "batch": batch, "batches": batch_index,
             "seconds": seconds,
             "tokens_per_second": len(stream) / seconds, "new_tokens_per_second": new_tokens / seconds,
             "compiled": fast, "complete": complete}
    return windows, stats


# ------------------------------------------------------------------ user data
def parse_range(text: str | None) -> tuple[int, int | None] | None:
    """``"A:B"`` (either side may be empty) -> ``(A, B)``."""
    if text is None:
        return None
    try:
        a, b = text.split(":")
        start, end = int(a) if a.strip() else 0, int(b) if b.strip() else None
    except ValueError:
        raise MlakitError(f"--data-range takes A:B token indices like 0:131072, got {text!r}") from None
    if start < 0 or (end is not None and end <= start):
        raise MlakitError(f"--data-range {text!r} is empty or negative")
    return start, end


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_protocol_file(path: Path) -> bool:
    """Is ``path`` the protocol's evaluation text (same file, or same bytes)?"""
    from mlakit.evaluate import data_path

    try:
        protocol = data_path()
    except MlakitError:
        return False
    if path.resolve() == protocol.resolve():
        return True
    return path.stat().st_size == protocol.stat().st_size and _sha256(path) == _sha256(protocol)


NGRAM = 32


def _ngram_hashes(ids: torch.Tensor, n: int = NGRAM) -> torch.Tensor:
    """A polynomial hash of every ``n``-gram of ``ids [L]`` (int64, wrapping)."""
    ids = ids.reshape(-1).long()
    m = ids.numel() - n + 1
    if m <= 0:
        return torch.empty(0, dtype=torch.long)
    h = torch.zeros(m, dtype=torch.long)
    for k in range(n):
        h = h * 1_000_003 + ids[k:k + m] + 1
    return h


def eval_overlap(ids: torch.Tensor, tokenizer) -> int:
    """How many of 80 probes (32-token n-grams, every 256 tokens of the evaluation range)
    occur in ``ids``; 0 when the protocol text is not here."""
    from mlakit.evaluate import protocol_tokens

    try:
        protocol = protocol_tokens(tokenizer)
    except MlakitError:
        return 0
    start, end = EVAL_RANGE
    probes = torch.stack([protocol[o:o + NGRAM] for o in range(start, end - NGRAM + 1, 256)])
    probe_hashes = torch.stack([_ngram_hashes(p)[0] for p in probes])
    return int(torch.isin(probe_hashes, _ngram_hashes(ids.cpu())).sum())


def load_data_file(path: str | os.PathLike, tokenizer, seq_len: int, data_range: str | None = None,
                   vocab_size: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` windows of a user's data: text (tokenised with the teacher's
    tokenizer, no special tokens) or token ids (``.pt`` / ``.npy``), cut to ``--data-range``."""
    path = Path(path)
    if not path.is_file():
        raise MlakitError(f"--data {path} is not a file")
    span = parse_range(data_range)
    if path.suffix in (".pt", ".npy"):
        if path.suffix == ".pt":
            ids = torch.load(path, map_location="cpu", weights_only=True)
        else:
            import numpy as np

            ids = torch.from_numpy(np.load(path))
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise MlakitError(f"{path} must hold one integer tensor of token ids")
        ids = ids.reshape(-1).long()
    else:
        if tokenizer is None:
            raise MlakitError(f"{path} is text, but the teacher has no tokenizer: give token ids (.pt or .npy)")
        if is_protocol_file(path):
            lo, hi = span if span is not None else (0, None)
            if (hi is None or hi > EVAL_RANGE[0]) and lo < EVAL_RANGE[1]:
                raise MlakitError(f"{path} is the protocol's evaluation text: training on it leaks the "
                                  f"evaluation range [{EVAL_RANGE[0]}, {EVAL_RANGE[1]}); pass --data-range "
                                  f"A:B outside it (e.g. 0:{EVAL_RANGE[0]})")
            from mlakit.evaluate import protocol_tokens

            ids = protocol_tokens(tokenizer)  # the same tokenisation, cached in this process
        else:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
            ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if span is not None:
        ids = ids[span[0]:span[1]]
    if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise MlakitError(f"{path} holds token ids outside the model's vocabulary [0, {vocab_size})")
    if tokenizer is not None:
        hits = eval_overlap(ids, tokenizer)
        if hits >= 2:
            raise MlakitError(f"{path} contains text of the protocol's evaluation range ({hits} of 80 probes "
                              f"found): training on it would leak the evaluation; cut it with --data-range")
    n = ids.numel() // seq_len
    if n == 0:
        raise MlakitError(f"{path} holds {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def describe(windows: torch.Tensor) -> dict[str, Any]:
    return {"windows": windows.shape[0], "seq_len": windows.shape[1], "tokens": windows.numel()}
