"""One rank of a torchrun job that tests/test_distributed.py starts (gloo, CPU, tiny random models).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/worker.py CASE OUT [STATE_DIR]

CASE: ``heal`` (all steps; with STATE_DIR: stop after the first, the state saved), ``heal-resume``
(continue the state in STATE_DIR to the end), ``bench`` (the tiny variants of ``mlakit bench e2e``
as its --tensor-parallel builds them: their logits), or a model name of ``cases.MODELS`` (greedy decode).

Rank 0 writes what the test compares to ``OUT`` (torch.save of tensors and lists)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "distributed")]

import torch  # noqa: E402

import cases  # noqa: E402
from mlakit import parallel  # noqa: E402


def main(case: str, out: str, state_dir: str | None = None) -> None:
    torch.set_num_threads(1)
    job = parallel.init("cpu")
    try:
        if case == "heal":
            result = cases.heal_run(job, state_dir=state_dir, stop_after_first_step=state_dir is not None)
        elif case == "heal-resume":
            result = cases.heal_run(job, state_dir=state_dir, resume=True)
        elif case == "bench":
            result = cases.bench_logits(job)
        else:
            result = cases.greedy_run(case, job)
        if job.is_main:
            torch.save(result, out)
        parallel.barrier()  # no rank tears the group down while another still works in it
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    parallel.leave(0)  # as `python -m mlakit`'s ranks leave (mlakit.parallel.leave says why)
