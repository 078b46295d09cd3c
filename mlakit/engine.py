"""Generation: batched prompts with per-sequence positions, greedy or sampled, streamed.

A static cache is sized once (batch x (longest prompt + new tokens)); the prompts
are right-padded and prefilled together, then every step feeds one token per
sequence at that sequence's own position. Finished sequences keep stepping
(their tokens are discarded) so shapes never change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mlakit.cache import ModelCache
from mlakit.model import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    greedy: bool = False  # argmax; the other sampling settings are ignored
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None  # None: the model's EOS tokens

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError("temperature must be > 0 (or use greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ``[b]`` from the last logits ``[b, vocab]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _pad_right(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    return tokens, lengths


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    cache: ModelCache | None = None) -> Iterator[list[int | None]]:
    """Yield, after each step, the new token of every sequence (None once it stopped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    tokens, lengths = _pad_right(prompts, device)
    total = int(lengths.max()) + params.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens ({total}) exceed the model's max_seq_len {model.config.max_seq_len}")
    if cache is None:
        cache = model.new_cache(len(prompts), total)
    else:
        cache.reset()
    stop = set(model.config.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    logits = model(tokens, cache=cache, logits_at=lengths - 1)[:, -1]  # [b, vocab]
    positions = lengths.clone()  # [b] position of each sequence's next token
    finished = [False] * len(prompts)
    for _ in range(params.max_new_tokens):
        next_tokens = sample_next(logits, params, generator)  # [b]
        step: list[int | None] = []
        for i, token in enumerate(next_tokens.tolist()):
            step.append(None if finished[i] else token)
            finished[i] = finished[i] or token in stop
        yield step
        if all(finished):
            return
        logits = model(next_tokens[:, None], positions[:, None], cache)[:, -1]
        positions += 1


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
             on_step: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """The generated tokens of every prompt (stop token included when one was hit)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
        if on_step is not None:
            on_step(step)
    return outputs
