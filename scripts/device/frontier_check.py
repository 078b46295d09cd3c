#!/usr/bin/env python3
"""kv-frontier-v1 on the GPU (issue "Quantised caches ... KV-memory frontier"): the default
model converted and healed with its cache's quantisation in the forward pass, then
``mlakit frontier`` over the original's cache formats and each checkpoint's latent formats.

    PYTHONUNBUFFERED=1 python3 scripts/device/frontier_check.py --work /tmp/fr --steps convert,heal
    PYTHONUNBUFFERED=1 python3 scripts/device/frontier_check.py --work /tmp/fr --steps frontier --export "$OUT"

Every step runs the ``mlakit`` command a user would run (as a subprocess) and is skipped when
its output is already in --work, so a step cut short by a call's time limit continues in the
next call on the same (warm) machine. Steps:

  convert   mlakit convert default -o WORK/mla-S[-R] --kv-saving S --latent-rotation R, for each S of
            --savings and R of --rotations (e.g. none,equalize+hadamard)
  heal      mlakit heal WORK/mla-S --teacher default --kv-cache-dtype Q (quantisation-aware,
            straight-through) with --heal's arguments, for each S and Q of --qat; a heal cut short
            by --heal-minutes (which counts writing the teacher text too) fails the step, and the
            next run continues it (--resume)
  frontier  mlakit frontier default --mla <every checkpoint> --dtype float32 --json --plot-dir

``--smoke`` runs the same steps on the CPU with a tiny random byte-level model (seconds; its
numbers mean nothing; tests/test_device_scripts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAL = "--seq-len 2048 --train all --compile --batch-size 16 --tokens 20M --teacher-tokens 8M --gen-batch 1024"


def log(msg: str) -> None:
    print(msg, flush=True)


def mlakit(*argv: str) -> tuple[float, str]:
    """One ``mlakit`` command as a user runs it: (wall minutes, stdout)."""
    start = time.perf_counter()
    log("$ mlakit " + " ".join(shlex.quote(a) for a in argv))
    done = subprocess.run([sys.executable, "-m", "mlakit", *argv], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mlakit {argv[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    minutes = (time.perf_counter() - start) / 60
    log(f"  ({minutes:.1f} min)")
    return minutes, done.stdout


def written(checkpoint: Path) -> bool:
    """Whether an mlakit checkpoint is complete (its directory appears whole, by rename)."""
    return (checkpoint / "mlakit.json").exists()


def smoke_source(work: Path) -> str:
    path = work / "llama-kv2"
    if not (path / "config.json").exists():
        sys.path.insert(0, str(REPO))
        from mlakit.testing.models import save_tiny_with_tokenizer

        save_tiny_with_tokenizer(work, "llama", 2, max_position_embeddings=4096)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="where checkpoints and the step log go (kept between calls)")
    parser.add_argument("--export", default=None, help="copy the frontier's files and the step log here ($OUT)")
    parser.add_argument("--steps", default="convert,heal,frontier")
    parser.add_argument("--savings", default="0.5", help="comma-separated KV savings to convert at")
    parser.add_argument("--rotations", default="none",
                        help="comma-separated mlakit convert --latent-rotation values (each a checkpoint)")
    parser.add_argument("--qat", default="int8", help="cache formats to heal each conversion for (none: skip)")
    parser.add_argument("--heal", default=HEAL, help=f"mlakit heal's other arguments (default: {HEAL})")
    parser.add_argument("--heal-minutes", type=float, default=8.0, help="mlakit heal --max-minutes")
    parser.add_argument("--cache-dtypes", default="bf16,int8,int4")
    parser.add_argument("--latent-dtypes", default="bf16,int8,int4,int4+rope")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    device = ["--device", "cpu" if args.smoke else "cuda"]
    source = smoke_source(work) if args.smoke else "default"
    savings = [s for s in args.savings.split(",") if s]
    qat = [] if args.qat == "none" else [q for q in args.qat.split(",") if q]
    log_path = work / "steps.json"

    def done(name: str, minutes: float) -> None:
        # read at each write: two of these may run side by side on one --work (different --savings)
        record = {**(json.loads(log_path.read_text()) if log_path.exists() else {}), name: minutes}
        tmp = log_path.with_name(f".{log_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(log_path)

    rotations = [r for r in args.rotations.split(",") if r]
    tag = {r: "" if r == "none" else "-" + r.replace("+", "-") for r in rotations}
    converted = {(s, r): work / f"mla-{s}{tag[r]}" for s in savings for r in rotations}
    healed = {(s, r, q): work / f"healed-{s}{tag[r]}-{q}" for s in savings for r in rotations for q in qat}
    if "convert" in steps:
        for (s, r), path in converted.items():
            if not written(path):
                extra = ["--calib-tokens", "2048"] if args.smoke else []
                done(f"convert {s} {r}", mlakit("convert", source, "-o", str(path), "--kv-saving", s, "--overwrite",
                                                "--latent-rotation", r, *device, *extra)[0])
    if "heal" in steps:
        for (s, r, q), path in healed.items():
            if not written(path):
                extra = shlex.split(args.heal)
                if args.smoke:
                    extra = ["--tokens", "4096", "--batch-size", "2", "--seq-len", "128", "--teacher-tokens", "2048",
                             "--gen-batch", "8"]
                # a heal that --max-minutes cut short saved its state in OUT.heal/: continue it
                again = ["--resume"] if Path(f"{path}.heal").is_dir() else ["--overwrite"]
                done(f"heal {s} {r} {q}", mlakit("heal", str(converted[s, r]), "--teacher", source, "-o", str(path),
                                             "--kv-cache-dtype", q, "--max-minutes", f"{args.heal_minutes:g}",
                                             "--no-progress", *again, *device, *extra)[0])
    if "frontier" in steps:
        checkpoints = [str(p) for p in [*converted.values(), *healed.values()] if written(p)]
        plot_dir = work / "frontier"
        extra = ["--no-passkey"] if args.smoke else ["--dtype", "float32"]
        minutes, out = mlakit("frontier", source, "--mla", *checkpoints, "--cache-dtypes", args.cache_dtypes,
                              "--latent-dtypes", args.latent_dtypes, "--json", "--plot-dir", str(plot_dir),
                              *device, *extra)
        done("frontier", minutes)
        log((plot_dir / "frontier.md").read_text())
        if args.export:
            export = Path(args.export)
            export.mkdir(parents=True, exist_ok=True)
            for path in [*plot_dir.iterdir(), log_path]:
                shutil.copy(path, export / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
