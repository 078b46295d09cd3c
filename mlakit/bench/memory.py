"""Memory in the benchmarks: peak and free memory, out-of-memory messages, and the
largest-batch search (an estimate from free memory, verified and shrunk on OOM)."""

from __future__ import annotations

import gc
import re
from typing import Callable, List, Optional, Tuple

import torch

GIB = 1 << 30


class BudgetSpent(Exception):
    """The run's time budget ran out during the largest-batch search."""


class SearchFailed(Exception):
    """A try of the largest-batch search failed with something other than out of memory."""


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached blocks to the device; ``collect`` first breaks reference cycles
    (an exception's traceback holds the failed row's tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_free_bytes(device: torch.device) -> int:
    """Free bytes on a CUDA device after returning the allocator's cached blocks."""
    free_memory(device)
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` since the last ``reset_peak``, in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def oom_message(exc: BaseException) -> str:
    """One short line: what the allocation wanted and what was free, when torch says so."""
    text = str(exc).strip()
    wanted = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    free = re.search(r"of which ([\d.]+ \w+) is free", text)
    if wanted:
        return f"out of memory (tried to allocate {wanted.group(1)}" + (f", {free.group(1)} free)" if free else ")")
    first = text.splitlines()[0][:160] if text else ""
    return f"out of memory: {first}" if first else "out of memory"


def estimate_max_batch(free_bytes: int, bytes_per_sequence: int, headroom_bytes: int) -> int:
    """How many sequences of ``bytes_per_sequence`` fit in ``free_bytes`` less a headroom."""
    if bytes_per_sequence <= 0:
        raise ValueError("bytes_per_sequence must be positive")
    return max(0, int((free_bytes - headroom_bytes) // bytes_per_sequence))


def search_max_batch(estimate: int, fits: Callable[[int], bool], max_tries: int = 8) -> Tuple[int, List[Tuple[int, bool]]]:
    """Verify ``estimate`` with ``fits(batch)`` (build + run one step; False on OOM) and
    shrink on failure (by 1, or ~1.5% for large batches), then bisect any gap left
    between the last failure and the first success. Returns (largest batch that
    fitted, or 0; the tries as (batch, fitted))."""
    tries: List[Tuple[int, bool]] = []

    def attempt(batch: int) -> bool:
        ok = bool(fits(batch))
        tries.append((batch, ok))
        return ok

    best, failed = 0, None
    batch = estimate
    while batch >= 1 and len(tries) < max_tries:
        if attempt(batch):
            best = batch
            break
        failed = batch
        batch -= max(1, batch // 64)
    while best and failed is not None and failed - best > 1 and len(tries) < max_tries:
        mid = (best + failed) // 2
        if attempt(mid):
            best = mid
        else:
            failed = mid
    return best, tries
