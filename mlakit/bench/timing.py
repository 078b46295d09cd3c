"""How the benchmarks time things: the copy-bandwidth ceiling, do_bench medians,
per-call timers (CUDA events on a GPU, the host clock on the CPU), and the one
function that captures a callable into a CUDA graph."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch

CUDA_COPY_BYTES = 2 << 30  # the protocols' copy of 2 GiB (decode-attn-v1, decode-e2e-v1)
CPU_COPY_BYTES = 64 << 20  # a smoke run's copy on the host


def device_name(device: torch.device) -> str:
    """What the tables call the device: the GPU's name, or ``CPU``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def do_bench_ms(fn: Callable[[], object], warmup_ms: int, rep_ms: int) -> float:
    """Median time of fn in milliseconds (triton.testing.do_bench: CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def capture_cuda_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured into a CUDA graph (``mlakit.speed.capture_graph``); returns its replay.

    Timing the replay measures the GPU work without the Python launch overhead,
    which for a ~20 us kernel can be larger than the kernel itself.
    """
    from mlakit.speed import capture_graph

    graph, _ = capture_graph(fn)
    return graph.replay


def measure_copy_gbps(device: torch.device, nbytes: Optional[int] = None, warmup_ms: int = 25,
                      rep_ms: int = 100) -> float:
    """Device-to-device copy of ``nbytes``; GB/s counting bytes read plus bytes written.

    On a GPU: bf16, do_bench median (default 2 GiB). On the CPU: float32, the median
    of five host-timed copies (default 64 MiB)."""
    if device.type == "cuda":
        nbytes = nbytes or CUDA_COPY_BYTES
        src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
        dst = torch.empty_like(src)
        ms = do_bench_ms(lambda: dst.copy_(src), warmup_ms, rep_ms)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / (ms * 1e-3) / 1e9
    nbytes = nbytes or CPU_COPY_BYTES
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def bandwidth_fraction(bytes_per_step: float, copy_gbps: Optional[float], ms_per_step: Optional[float]) -> Optional[float]:
    """(bytes read per step / copy bandwidth) / measured step time: 1.0 = at the copy ceiling."""
    if not copy_gbps or not ms_per_step:
        return None
    return bytes_per_step / (copy_gbps * 1e9) / (ms_per_step * 1e-3)


class Timer:
    """Per-call milliseconds: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn: Callable[[], object], n: int) -> Tuple[List[float], float]:
        """(ms of each of n back-to-back calls, total ms / n)."""
        if self.cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
            torch.cuda.synchronize()
            events[0].record()
            for i in range(n):
                fn()
                events[i + 1].record()
            torch.cuda.synchronize()
            times = [events[i].elapsed_time(events[i + 1]) for i in range(n)]
            return times, events[0].elapsed_time(events[n]) / n
        times = []
        t_start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, (time.perf_counter() - t_start) * 1e3 / n

    def seconds(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0
