#!/usr/bin/env python3
"""Several GPUs (docs/distributed.md): FSDP2 healing tokens/s and tensor-parallel decode tokens/s.

Random weights (speed does not depend on their values). For every process count in
``--gpus`` (at most the GPUs here) it starts ``torchrun --nproc-per-node N`` on this file's
workers and prints one table each:

- heal (``heal-fsdp2-v1``: ``heal_model``, ``--train all``, AdamW, bf16 autocast, a fixed batch
  per GPU, so the global batch grows with N): the llama3.2-1b and llama3-8b presets, the student
  their MLA variant (rank 512 + rope 64, as decode-e2e-v1 converts), both sharded with FSDP2
  (built on the meta device, so no rank ever holds a whole model).
- decode (``decode-e2e-v1`` rows, tensor parallel over N GPUs): the llama3-8b shape, GQA-8 and its
  MLA variant, bf16, the engine's CUDA-graph step over a random cache of the row's context.

    python3 scripts/device/dist_check.py --gpus 1,2,4
    python3 scripts/device/dist_check.py --smoke      # the same code on the CPU (gloo), tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DECODE_ROWS = [(1, 8192), (1, 32768), (16, 8192), (64, 8192)]  # decode-e2e-v1
HEAL_SHAPES = {"llama3.2-1b": dict(batch_per_gpu=8, seq_len=1024, checkpointing=False),
               "llama3-8b": dict(batch_per_gpu=4, seq_len=1024, checkpointing=True)}


def shapes(smoke: bool):
    from mlakit.config import ModelConfig, preset

    if smoke:
        tiny = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                           intermediate_size=128, max_seq_len=1024)
        return {"tiny": tiny}, {"tiny": dict(batch_per_gpu=2, seq_len=64, checkpointing=True)}, [(1, 128), (4, 64)]
    return {name: preset(name) for name in HEAL_SHAPES}, HEAL_SHAPES, DECODE_ROWS


def mla_variant(config, smoke: bool):
    rank, rope = (16, 8) if smoke else (512, 64)
    nope = config.head_dim - rope
    return config.replace(attention="mla", kv_lora_rank=rank, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                          v_head_dim=config.head_dim)


def random_fill(model, std: float = 0.02) -> None:
    """Every rank draws its own shard (local tensors: works for DTensor and plain parameters)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.fill_(1.0) if name.endswith("norm.weight") else local.normal_(0.0, std)


# ------------------------------------------------------------------ workers (one rank each)
def heal_worker(job, name: str, smoke: bool) -> dict:
    from mlakit.heal.distill import HealOptions, heal_model
    from mlakit.model import Transformer
    from mlakit.parallel import shard_for_training

    configs, settings, _ = shapes(smoke)
    config, setting = configs[name], settings[name]
    models = []
    for cfg in (mla_variant(config, smoke), config):
        with torch.device("meta"):
            model = Transformer(cfg)
        shard_for_training(model, job.mesh)
        model.to_empty(device=job.device)
        random_fill(model)
        models.append(model)
    student, teacher = models
    teacher.to(torch.bfloat16 if job.device.startswith("cuda") else torch.float32)
    batch = setting["batch_per_gpu"] * job.world_size
    steps = 3 if smoke else 8
    windows = torch.randint(0, config.vocab_size, (batch * steps + 20, setting["seq_len"]),
                            generator=torch.Generator().manual_seed(0))
    options = HealOptions(tokens=steps * batch * setting["seq_len"], train="all", batch_size=batch,
                          seq_len=setting["seq_len"], gradient_checkpointing=setting["checkpointing"],
                          checkpoint_every=10 ** 9, val_windows=1, progress=False, warmup=0.0)
    result = heal_model(student, teacher, windows, options, log=lambda *_: None, job=job)
    step_seconds = result.log["step_seconds"][2:] or result.log["step_seconds"]  # past the warm-up steps
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if job.device.startswith("cuda") else None
    return {"tokens_per_second": batch * setting["seq_len"] / (sum(step_seconds) / len(step_seconds)),
            "global_batch": batch, "seq_len": setting["seq_len"], "peak_gib_per_gpu": memory}


def decode_worker(job, variant: str, smoke: bool) -> list[dict]:
    from mlakit.engine import Engine
    from mlakit.model import Transformer
    from mlakit.parallel import parallelize_for_decode

    configs, _, rows = shapes(smoke)
    config = configs["tiny" if smoke else "llama3-8b"]
    config = mla_variant(config, smoke) if variant == "mla" else config
    dtype = torch.bfloat16 if job.device.startswith("cuda") else torch.float32
    model = Transformer(config.replace(max_seq_len=max(c for _, c in rows) + 64)).to(device=job.device, dtype=dtype)
    random_fill(model)
    parallelize_for_decode(model, job.mesh)
    results = []
    for batch, context in rows:
        steps = 4 if smoke else 64
        try:
            engine = Engine(model, batch, context + steps + 1)
            for layer in engine.cache.layers:  # a random cache of `context` tokens (never zeros)
                for buffer in layer.buffers():
                    if buffer.is_floating_point():
                        buffer.normal_()
                engine.cache.layers[0].lengths.fill_(context)
            tokens = torch.randint(0, config.vocab_size, (batch,), device=job.device)
            positions = torch.full((batch,), context, device=job.device)

            def run(n: int) -> float:
                sync()
                start = time.perf_counter()
                for i in range(n):
                    engine.decode(tokens, positions + i, span=context + i + 1)
                sync()
                return time.perf_counter() - start

            sync = (lambda: torch.cuda.synchronize()) if job.device.startswith("cuda") else (lambda: None)
            run(2)  # capture + warm-up
            seconds = run(steps)
            results.append({"batch": batch, "context": context, "tok_s": batch * steps / seconds})
            del engine
        except torch.OutOfMemoryError:
            results.append({"batch": batch, "context": context, "tok_s": None})
        if job.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def worker(args) -> None:
    from mlakit import parallel

    job = parallel.init("cpu" if args.smoke else "cuda")
    try:
        kind, name = args.worker.split(":")
        out = heal_worker(job, name, args.smoke) if kind == "heal" else decode_worker(job, name, args.smoke)
        if job.is_main:
            print("RESULT " + json.dumps(out), flush=True)
    finally:
        parallel.shutdown()


# ------------------------------------------------------------------ the launcher
def launch(n: int, task: str, smoke: bool):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
               f"--master-port={port}", __file__, "--worker", task] + (["--smoke"] if smoke else [])
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr
    return {"error": "out of memory" if oom else " | ".join(tail)[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4", help="process counts (default 1,2,4; at most the GPUs here)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes, 1 and 2 processes")
    parser.add_argument("--skip-heal", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    counts = [1, 2] if args.smoke else [int(x) for x in args.gpus.split(",")
                                        if int(x) <= max(1, torch.cuda.device_count())]
    device = "cpu (gloo, smoke: the numbers mean nothing)" if args.smoke else torch.cuda.get_device_name(0)
    heal_shapes, _, rows = shapes(args.smoke)
    print(f"# dist_check on {device}, torch {torch.__version__}, process counts {counts}\n")
    if not args.skip_heal:
        print("## heal-fsdp2-v1: healing tokens/s (FSDP2, --train all, random weights)\n")
        print("| shape | GPUs | global batch x seq | tokens/s | vs 1 GPU | peak GiB/GPU |")
        print("|---|---|---|---|---|---|")
        for name in heal_shapes:
            base = None
            for n in counts:
                r = launch(n, f"heal:{name}", args.smoke)
                if "error" in r:
                    print(f"| {name} | {n} | | {r['error']} | | |", flush=True)
                    continue
                base = base or (r["tokens_per_second"] if n == 1 else None)
                ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else ""
                peak = f"{r['peak_gib_per_gpu']:.1f}" if r["peak_gib_per_gpu"] else ""
                print(f"| {name} | {n} | {r['global_batch']} x {r['seq_len']} | {r['tokens_per_second']:,.0f} | "
                      f"{ratio} | {peak} |", flush=True)
        print()
    if not args.skip_decode:
        print("## decode-e2e-v1 rows, tensor parallel (llama3-8b shape, bf16, CUDA-graph step)\n")
        print("| variant | GPUs | " + " | ".join(f"({b}, {c})" for b, c in rows) + " |")
        print("|---|---|" + "---|" * len(rows))
        for variant in ("gqa", "mla"):
            for n in counts:
                r = launch(n, f"decode:{variant}", args.smoke)
                cells = ([r["error"]] * len(rows) if isinstance(r, dict) else
                         [f"{x['tok_s']:,.1f}" if x["tok_s"] else "OOM" for x in r])
                print(f"| {variant} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
