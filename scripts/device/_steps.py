"""What the resumable GPU checks of scripts/device/ share (heal_check.py, longctx_check.py):
one --out directory that holds the results file, saved after every step, so the same
command run again skips what is done; the device (CUDA, or the CPU for --smoke); the
time left before --max-minutes; the tiny byte-level model of a smoke run."""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Steps:
    """The --out directory of one check: ``results`` (read from ``results_name`` there when a
    run left one), ``save()`` (atomic), ``device``, ``minutes_left()``, ``smoke_model()``.
    ``args`` needs ``out``, ``smoke`` and ``max_minutes``."""

    def __init__(self, args: argparse.Namespace, results_name: str) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + 60 * args.max_minutes
        self.device = "cpu" if args.smoke else "cuda"
        if not args.smoke and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke on a CPU")
        self.results_path = self.out / results_name
        self.results = self.read_results()

    def read_results(self) -> dict:
        return json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.results_path)

    def minutes_left(self) -> float:
        return (self.deadline - time.monotonic()) / 60

    def smoke_model(self) -> Path:
        """The tiny random byte-level llama (2 KV heads, 512 positions) of --smoke, made once in OUT."""
        path = self.out / "llama-kv2"
        if not (path / "config.json").exists():
            from mlakit.testing.models import save_tiny_with_tokenizer

            save_tiny_with_tokenizer(self.out, "llama", 2, max_position_embeddings=512)
        return path
