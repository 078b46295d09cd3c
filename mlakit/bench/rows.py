"""The result rows of a decode-e2e-v1 run: one shape of row, each measured under a
guard (out of memory becomes an ``OOM`` row and the run goes on), logged, and
counted on a progress bar."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from mlakit.bench.memory import free_memory, oom_message


def new_row(phase: str, variant: str, batch: int, context: int, **kw: Any) -> Dict[str, Any]:
    """A result row: every key present, unmeasured ones None."""
    row = dict(phase=phase, variant=variant, batch=batch, context=context, status="ok", tokens_per_s=None,
               ms_per_step=None, kv_bytes_per_token=None, peak_gib=None, bytes_per_step=None,
               bw_fraction=None, note="")
    row.update(kw)
    return row


class RowRecorder:
    """Collects a run's rows and notes; ``guard`` runs one row's measurement."""

    def __init__(self, device: torch.device, time_budget_s: Optional[float] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.device = device
        self.time_budget_s = time_budget_s
        self._user_log = log
        self.t_start = time.time()
        self.rows: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self._bar = None

    def log(self, msg: str) -> None:
        """To the caller's log; else above the progress bar (stderr); else nowhere."""
        if self._user_log is not None:
            self._user_log(msg)
        elif self._bar is not None:
            self._bar.write(msg, file=sys.stderr)

    def elapsed(self) -> float:
        return time.time() - self.t_start

    def over_budget(self) -> bool:
        return self.time_budget_s is not None and self.elapsed() > self.time_budget_s

    # ------------------------------------------------------------ progress bar
    def start_progress(self, total: int, desc: str) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True,
                         mininterval=0.5 if sys.stderr.isatty() else 10.0)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None

    def tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what[:40])
            self._bar.update(1)

    # ------------------------------------------------------------ rows
    def emit(self, row: Dict[str, Any]) -> Dict[str, Any]:
        """Keep ``row`` and log it in one line."""
        self.rows.append(row)
        tps = row.get("tokens_per_s")
        msg = (f"{row['phase']:<16s} {row['variant']:<20s} b={row['batch']:<4d} ctx={row['context']:<6d} "
               + (f"{tps:10.1f} tok/s {row['ms_per_step']:8.2f} ms" if tps else f"{row['status']}: {row.get('note', '')}"))
        if row.get("peak_gib") is not None:
            msg += f"  peak {row['peak_gib']:.1f} GiB"
        if row.get("bw_fraction") is not None:
            msg += f"  {100 * row['bw_fraction']:.0f}% of BW limit"
        self.log(msg)
        return row

    def guard(self, fn: Callable[[], Dict[str, Any]], phase: str, variant: str, batch: int, context: int,
              **kw: Any) -> Dict[str, Any]:
        """Run one row; out of memory becomes an "OOM" row and the run goes on."""
        if self.over_budget():
            return self.emit(new_row(phase, variant, batch, context, status="skipped",
                                     note="time budget spent", **kw))
        failure = None
        try:
            row = fn()
        except torch.OutOfMemoryError as exc:  # noqa: PERF203
            failure = ("OOM", oom_message(exc))
        except Exception as exc:  # one broken row must not lose the others
            import traceback

            self.log(traceback.format_exc())
            failure = ("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
        if failure is not None:
            free_memory(self.device, collect=True)  # the failed row's tensors died with the exception
            row = new_row(phase, variant, batch, context, status=failure[0], note=failure[1], **kw)
        free_memory(self.device)
        return self.emit(row)
