"""passkey-v1 (part of longctx-smollm2-v1 in ``shared/PROTOCOL.md``): find a hidden number.

For each prompt length N in 1024, 4096, 7680 tokens and each trial i = 0..19: a 5-digit
key from ``random.Random(i).randint(10000, 99999)`` hidden at depth i/19 of a filler made
of one sentence repeated; the prompt's length is brought to N tokens (within 16) by the
number of repeats. Greedy decoding of 8 new tokens through the engine (static cache,
prefill, then the absorbed MLA decode step, on CUDA the kernels and the CUDA graph);
a trial succeeds when the key's digits appear in the decoded new tokens.

Prompts are tokenised with ``add_special_tokens=False``, as the perplexity protocols'
text is. The key goes between filler sentences: after ``round(i / 19 * repeats)`` of them.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlakit.errors import MlakitError

PROTOCOL = "passkey-v1"
LENGTHS = (1024, 4096, 7680)
TRIALS = 20
NEW_TOKENS = 8
LENGTH_TOLERANCE = 16
HEAD = "Below is a long text. Somewhere in it is a secret number.\n"
FILLER = "The quick brown fox jumps over the lazy dog, and the day goes on. "
KEY_SENTENCE = "Remember this: the secret number is {key}. "
QUESTION = "\nQuestion: what is the secret number?\nAnswer: the secret number is"


def trial_key(trial: int) -> int:
    return random.Random(trial).randint(10000, 99999)


def key_depth(trial: int, trials: int = TRIALS) -> float:
    return trial / (trials - 1) if trials > 1 else 0.0


def prompt_text(key: int, repeats: int, depth: float) -> str:
    before = round(depth * repeats)
    return HEAD + FILLER * before + KEY_SENTENCE.format(key=key) + FILLER * (repeats - before) + QUESTION


@dataclass
class PasskeyPrompt:
    length_target: int
    trial: int
    key: int
    depth: float
    repeats: int  # filler sentences
    ids: list[int]
    text: str


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def build_prompt(tokenizer: Any, length: int, trial: int, trials: int = TRIALS) -> PasskeyPrompt:
    """The prompt of one trial: the number of filler repeats whose whole prompt comes
    closest to ``length`` tokens (tokenised whole, since merges may cross sentences)."""
    key, depth = trial_key(trial), key_depth(trial, trials)
    base = _n_tokens(tokenizer, prompt_text(key, 0, depth))
    per_sentence = max(1, _n_tokens(tokenizer, FILLER * 8) / 8)
    repeats = max(0, round((length - base) / per_sentence))

    counts: dict[int, int] = {}

    def distance(r: int) -> int:
        if r not in counts:
            counts[r] = _n_tokens(tokenizer, prompt_text(key, r, depth))
        return abs(counts[r] - length)

    # the count is near-linear in the repeats: walk to the closest
    while repeats > 0 and distance(repeats - 1) < distance(repeats):
        repeats -= 1
    while distance(repeats + 1) < distance(repeats):
        repeats += 1
    text = prompt_text(key, repeats, depth)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if abs(len(ids) - length) > LENGTH_TOLERANCE:
        raise MlakitError(f"passkey prompt of {len(ids)} tokens cannot be brought within {LENGTH_TOLERANCE} of "
                          f"{length} with this tokenizer")
    return PasskeyPrompt(length, trial, key, depth, repeats, ids, text)


def key_found(key: int, new_text: str) -> bool:
    return str(key) in new_text


@dataclass
class PasskeyLength:
    length_target: int
    successes: int
    trials: int
    share: float
    prompt_tokens_min: int
    prompt_tokens_max: int
    seconds: float
    found: list[bool] = field(default_factory=list)  # per trial
    outputs: list[str] = field(default_factory=list)  # the decoded new tokens per trial


@dataclass
class PasskeyResult:
    protocol: str
    model: str
    lengths: list[PasskeyLength]
    seconds: float

    def share(self, length: int) -> float:
        return next(r.share for r in self.lengths if r.length_target == length)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_length(loaded, length: int, trials: int = TRIALS, progress: bool = False, options=None) -> PasskeyLength:
    """All trials at one prompt length, one prompt at a time through one engine (its
    CUDA graphs are captured once and replayed for every trial)."""
    from tqdm.auto import tqdm

    from mlakit.engine import Engine, SamplingParams, generate_batch

    start = time.perf_counter()
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [build_prompt(tokenizer, length, i, trials) for i in range(trials)]
    longest = max(len(p.ids) for p in prompts)
    if longest + NEW_TOKENS > model.config.max_seq_len:
        raise MlakitError(f"{PROTOCOL} at {length} tokens needs {longest + NEW_TOKENS} positions; the model has "
                          f"max_seq_len {model.config.max_seq_len}")
    from mlakit.options import DEFAULT

    engine = Engine(model, 1, longest + NEW_TOKENS, options=options or DEFAULT)  # e.g. a quantised cache
    # up to 8 new tokens; generation stops early only at the model's end-of-sequence token
    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True)
    found, outputs = [], []
    for prompt in tqdm(prompts, desc=f"{PROTOCOL} {length}", unit="trial", disable=not progress, leave=False):
        tokens, _ = generate_batch(model, [prompt.ids], params, engine=engine)
        text = tokenizer.decode([t for t in tokens[0].tolist() if t >= 0], skip_special_tokens=True)  # -1: padding
        outputs.append(text)
        found.append(key_found(prompt.key, text))
    lengths = [len(p.ids) for p in prompts]
    return PasskeyLength(length_target=length, successes=sum(found), trials=trials, share=sum(found) / trials,
                         prompt_tokens_min=min(lengths), prompt_tokens_max=max(lengths),
                         seconds=time.perf_counter() - start, found=found, outputs=outputs)


def evaluate_passkey(loaded, lengths=None, trials: int | None = None, progress: bool = True,
                     options=None) -> PasskeyResult:
    """passkey-v1 at ``lengths`` (default the protocol's) with ``trials`` trials each (default 20)."""
    lengths, trials = lengths or LENGTHS, trials or TRIALS
    if loaded.tokenizer is None:
        raise MlakitError(f"{PROTOCOL} tokenises its prompts with the model's tokenizer, and the model has none")
    start = time.perf_counter()
    rows = [run_length(loaded, n, trials, progress, options) for n in lengths]
    return PasskeyResult(protocol=PROTOCOL, model=loaded.source, lengths=rows, seconds=time.perf_counter() - start)


def format_passkey(result: PasskeyResult) -> str:
    parts = ", ".join(f"{r.length_target}: {100 * r.share:.0f}% ({r.successes}/{r.trials}, "
                      f"{r.prompt_tokens_min}-{r.prompt_tokens_max} tokens)" for r in result.lengths)
    return f"[{result.protocol}] {result.model}: passkey {parts}"
