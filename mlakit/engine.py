"""Generation: batched prompts with per-sequence positions, greedy or sampled, streamed.

A static cache is sized once (batch x (longest prompt + new tokens)); the prompts
are right-padded and prefilled together, then every step feeds one token per
sequence at that sequence's own position. Finished sequences keep stepping
(their tokens are discarded) so shapes never change; on CUDA the step is one
CUDA-graph replay (see ``Engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mlakit.model import Transformer
from mlakit.options import DEFAULT, ForwardOptions
from mlakit.speed import capture_graph, compiled_block_call, fuse_projections


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
        if not self.temperature > 0 and not self.greedy:  # NaN too
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
    probs = logits.softmax(dim=-1)  # [b, vocab]
    if params.top_p is not None and params.top_p < 1:
        return sample_top_p(probs, params.top_p, generator)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling without sorting: a token ``[b]`` drawn from ``probs [b, vocab]``
    restricted to the nucleus (the most likely tokens, in order, until the tokens before
    one already cover ``top_p``; the first always stays), renormalised.

    Token ``i`` is in the nucleus exactly when the mass of the tokens more likely than it
    is below ``top_p``. Draw from the candidates (all tokens at first) and keep the draw if
    it is in the nucleus; otherwise every token no more likely than the draw is outside
    the nucleus too, so drop them and draw again. The candidates always hold the whole
    nucleus, so an accepted draw follows ``probs`` restricted to it: the same distribution
    as sorting and masking (which costs a sort of the logits, 3.7 ms for 1024 x 49152 on
    an H200). The first draw is accepted with probability >= ``top_p``; each round costs a
    few passes over ``probs`` and one host sync (whether any row is left)."""
    out = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)  # [b]
    pending = torch.ones_like(out, dtype=torch.bool)  # [b]
    candidates, floor = probs, None  # floor [b, 1]: after a rejection, candidates are the tokens above it
    while True:
        draw = torch.multinomial(candidates, 1, generator=generator)  # [b, 1]
        p_draw = probs.gather(-1, draw)  # [b, 1]
        above = probs.masked_fill(probs <= p_draw, 0.0).sum(dim=-1)  # [b]: mass more likely than the draw
        accept = pending & (above < top_p)
        out = torch.where(accept, draw[:, 0], out)
        pending = pending & ~accept
        if not bool(pending.any()):
            return out
        floor = torch.where(pending[:, None], p_draw, -1.0 if floor is None else floor)  # done rows: any token
        candidates = probs.masked_fill(probs <= floor, 0.0)


def _pad_right(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    return tokens, lengths


SPAN_BUCKET_MIN = 128  # the smallest number of cache slots a CUDA-graph step attends over


class Engine:
    """Static-cache inference for a fixed batch: prefill, then one-token decode steps.

    The cache is sized once (``batch`` x ``max_len``). MLA models prefill in the
    naive (decompressed) form and decode in the absorbed form, as DeepSeek and vLLM
    do: a long prompt is compute-bound and the decompressed form does fewer FLOPs
    per token, while a decode step is bound by reading the cache, which the
    absorbed form reads once per sequence instead of once per head.
    (``prefill_mode="absorbed"`` prefills through the absorbed kernel too, causal
    within the prompt; ``mlakit bench e2e`` times both forms.)

    On CUDA the decode step is captured as a CUDA graph and replayed: all its
    inputs live in static buffers (tokens, positions, the cache, the lengths), so no
    step reads a value on the host and nothing is re-captured as positions advance.
    A graph attends over a fixed number of cache slots; a caller that knows how far
    its sequences reach (``decode(..., span=)``, as ``generate`` does) gets the graph
    of the smallest span bucket that covers it (128, 256, 512, ... slots, at most
    ``max_len``; one capture per bucket), so early steps of a long generation do
    not read the empty end of the cache. Without ``span`` a step attends over the
    whole cache.

    ``compile=True`` is the fast mode for a fixed model: the projections that share an
    input run as one matmul each (``fuse_projections``, which changes the model in
    place, without extra memory) and the decode step's blocks go through
    ``torch.compile`` (``compiled_block_call``; the first step compiles, under a
    minute for an 8B model on a GPU). Both remove small kernels, which dominate a
    batch-1 step once the CUDA graph has removed the launch overhead.

    ``options.sparse_topk`` (MLA) decodes with top-k sparse attention; the prefill stays
    dense. ``options.latent_ranks`` (MLA, elastic checkpoints) runs sequence ``i`` at its own
    runtime rank; the engine keeps the ranks in a static buffer (``set_latent_ranks``
    changes them between requests without re-capturing a graph). The cache keeps its
    full width: per-sequence ranks save compute reads only where a kernel skips the
    zero channels, and memory only with paged, variable-width storage (not done).
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, cuda_graph: bool | None = None,
                 cache_dtype: torch.dtype | None = None, compile: bool = False,
                 compile_backend: str = "inductor", prefill_mode: str = "naive",
                 options: ForwardOptions = DEFAULT) -> None:
        if max_len > model.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
        self.model = model
        # MLA: prefill decompressed ("naive", the default) or "absorbed"; decode is absorbed.
        # ``options`` carries the rest (kernels on/off) into both.
        self.batch = batch
        self.max_len = max_len
        self.device = model.device
        self.latent_ranks = None  # [batch] int32, a static buffer (None: every sequence at full rank)
        if options.latent_ranks is not None:
            self.latent_ranks = torch.zeros(batch, dtype=torch.int32, device=self.device)
            self.set_latent_ranks(options.latent_ranks)
        options = options.replace(latent_ranks=self.latent_ranks)
        self.prefill_options = options.replace(mla_path=prefill_mode, sparse_topk=None)  # prefill: dense
        self.decode_options = options.replace(mla_path="absorbed")
        self.cache = model.new_cache(batch, max_len, dtype=cache_dtype, kv_cache_dtype=options.kv_cache_dtype,
                                     quantize_rope=options.quantize_rope)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self._tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # [b, 1]
        self._positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # [b, 1]
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # span bucket -> (graph, logits)
        self._pool = None  # the graphs share one memory pool: they never run at the same time
        self._block_fn = None
        if compile:
            fuse_projections(model)
            self._block_fn = compiled_block_call(compile_backend)

    def reset(self) -> None:
        self.cache.reset()

    def set_latent_ranks(self, ranks: Sequence[int] | torch.Tensor) -> None:
        """The runtime rank of each of the ``batch`` sequences (for the next prefill; an engine
        made with ``options.latent_ranks`` only)."""
        if self.latent_ranks is None:
            raise ValueError("this engine runs at full rank: make it with options.latent_ranks to set ranks")
        ranks = torch.as_tensor(ranks, dtype=torch.int32).flatten()
        if ranks.numel() != self.batch or bool((ranks < 1).any()):
            raise ValueError(f"latent ranks: one rank >= 1 per sequence ({self.batch}), got {ranks.tolist()}")
        self.latent_ranks.copy_(ranks.to(self.device))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts ``tokens [b, s]`` of ``lengths [b]`` from an empty
        cache; return the logits of each prompt's last token ``[b, vocab]``."""
        if int(lengths.max()) > self.max_len:
            raise ValueError(f"prompt of {int(lengths.max())} tokens exceeds the engine's max_len {self.max_len}")
        self.cache.reset()
        return self.model(tokens, cache=self.cache, options=self.prefill_options, logits_at=lengths - 1)[:, -1]

    def span_bucket(self, span: int | None) -> int:
        """The cache slots a CUDA-graph step attends over for ``span``: the smallest of
        ``SPAN_BUCKET_MIN`` x 2^k that covers it, at most ``max_len`` (None: ``max_len``)."""
        if span is None:
            return self.max_len
        bucket = SPAN_BUCKET_MIN
        while bucket < span:
            bucket *= 2
        return min(bucket, self.max_len)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """One step: ``tokens [b]`` at ``positions [b]`` -> logits ``[b, vocab]``.
        ``span``, if given, must be at least ``max(positions) + 1`` (the caller knows it
        on the host; nothing checks it): attention then reads only the cache slots up to
        it (rounded up to a bucket under CUDA graphs) instead of the whole cache.
        The returned tensor is overwritten by the next step under CUDA graphs."""
        self._tokens.copy_(tokens.view(-1, 1))
        self._positions.copy_(positions.view(-1, 1))
        if not self.cuda_graph:
            return self._step(span)  # None: the furthest position, read on the host
        kv_len = self.span_bucket(span)
        if kv_len not in self._graphs:
            self._capture(kv_len)
        graph, logits = self._graphs[kv_len]
        graph.replay()
        return logits

    def _step(self, kv_len: int | None) -> torch.Tensor:
        return self.model(self._tokens, self._positions, self.cache, self.decode_options, kv_len=kv_len,
                          block_fn=self._block_fn)[:, -1]

    def _capture(self, kv_len: int) -> None:
        # The warm-up runs write this step's own tokens at this step's own positions,
        # exactly what the replay that follows writes again, so they leave the cache as
        # the step will. A shared pool may hand one graph's scratch memory to another
        # graph's output: harmless, since a step's logits are read before the next step
        # replays any graph.
        graph, logits = capture_graph(lambda: self._step(kv_len), pool=self._pool)
        self._pool = self._pool or graph.pool()
        self._graphs[kv_len] = (graph, logits)


# generate_batch asks the device whether every sequence has stopped only every this many
# steps: each question waits for the GPU to finish the queued work, and the host could
# otherwise queue the next steps meanwhile. The cost is up to this many wasted steps
# after the last sequence stopped (their tokens are discarded; without a seed they still
# draw from torch's global generator).
FINISHED_CHECK_EVERY = 16


@torch.inference_mode()
def _decode_steps(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  engine: Engine | None, compile: bool, check_every: int,
                  options: ForwardOptions = DEFAULT) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The generation loop, on the device: yields, after each step, the sampled tokens
    ``[b]`` and which of them are output ``[b]`` bool. A sequence's output ends with its
    first stop token; its later tokens are not output (finished sequences keep stepping,
    so that shapes and the sampler's random stream do not depend on when they stop).
    The loop ends after ``max_new_tokens`` steps, or once every sequence has stopped,
    which it checks every ``check_every`` steps (a host sync each time).
    Without ``engine`` one is made for these prompts (``compile``: its fast mode; ``options``:
    how its forwards run, e.g. the cache format)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    tokens, lengths = _pad_right(prompts, device)
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens ({total}) exceed the model's max_seq_len {model.config.max_seq_len}")
    if engine is None:
        engine = Engine(model, len(prompts), total, compile=compile, options=options)
    elif engine.batch != len(prompts) or engine.max_len < total:
        raise ValueError(f"the engine holds {engine.batch} x {engine.max_len} tokens; "
                         f"this call needs {len(prompts)} x {total}")
    stop_ids = model.config.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)

    logits = engine.prefill(tokens, lengths)  # [b, vocab]
    positions = lengths.clone()  # [b] position of each sequence's next token
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # [b]
    for step in range(params.max_new_tokens):
        next_tokens = sample_next(logits, params, generator)  # [b]
        output = ~finished  # [b] the stop token itself is output
        finished = finished | torch.isin(next_tokens, stop)
        yield next_tokens, output
        if step + 1 == params.max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
            return
        # the furthest next position is the longest prompt's length + step: attend up to it
        logits = engine.decode(next_tokens, positions, span=longest + step + 1)
        positions += 1


def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                    engine: Engine | None = None, compile: bool = False,
                    options: ForwardOptions = DEFAULT) -> Iterator[list[int | None]]:
    """Yield, after each step, the new token of every sequence (None once it stopped).
    Without ``engine`` one is made for these prompts (``compile``: its fast mode)."""
    # every step goes to the host anyway: check for the end every step
    for next_tokens, output in _decode_steps(model, prompts, params, engine, compile, 1, options):
        yield [token if out else None for token, out in zip(next_tokens.tolist(), output.tolist())]


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   engine: Engine | None = None, compile: bool = False,
                   options: ForwardOptions = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [b, max_new_tokens], counts [b])``, both on the model's device: sequence
    i's output is ``tokens[i, :counts[i]]`` (stop token included when one was hit); the
    rest of its row is -1. The same tokens as ``generate`` for the same seed, without a
    round trip to the host per step (see ``FINISHED_CHECK_EVERY``)."""
    b = len(prompts)
    out = torch.full((b, params.max_new_tokens), -1, dtype=torch.long, device=model.device)  # [b, max_new]
    counts = torch.zeros(b, dtype=torch.long, device=model.device)  # [b]
    for step, (next_tokens, output) in enumerate(_decode_steps(model, prompts, params, engine, compile,
                                                               FINISHED_CHECK_EVERY, options)):
        out[:, step] = next_tokens.masked_fill(~output, -1)
        counts += output
    return out, counts


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
             on_step: Callable[[list[int | None]], None] | None = None, compile: bool = False,
             options: ForwardOptions = DEFAULT) -> list[list[int]]:
    """The generated tokens of every prompt (stop token included when one was hit).
    ``on_step`` receives every step's new tokens as ``generate_stream`` yields them.
    ``compile``: the engine's fast mode; ``options``: its forward options (see ``Engine``)."""
    if on_step is None:
        tokens, counts = generate_batch(model, prompts, params, compile=compile, options=options)
        return [row[:n] for row, n in zip(tokens.tolist(), counts.tolist())]
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params, compile=compile, options=options):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
        on_step(step)
    return outputs
