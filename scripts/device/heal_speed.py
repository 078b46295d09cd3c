#!/usr/bin/env python3
"""Where a healing step's time goes (issue 7), on random weights of the default model's shape.

Speed does not depend on the weights' values, so this needs no checkpoint: the teacher is
SmolLM2-135M's shape (bf16 on CUDA, as ``mlakit heal`` loads it), the student that shape
converted by the project's converter at ``--saving`` (calibrated on random tokens). For each
``--batch-sizes`` entry it runs ``heal_model`` (the real training loop, ``--train all``,
compiled unless ``--eager``) for a few steps and reports the steady tokens/s; with
``--profile B`` it also prints the top CUDA kernels of a few steps at batch B.

    PYTHONUNBUFFERED=1 python3 scripts/device/heal_speed.py --batch-sizes 16,32,64,128 --profile 16
    python3 scripts/device/heal_speed.py --smoke        # the same code on the CPU, tiny (no compiler needed)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build(saving: float, device: str, smoke: bool = False):
    from mlakit.config import preset
    from mlakit.convert.api import ConvertOptions, convert
    from mlakit.model import Transformer

    torch.manual_seed(0)
    config = preset("smollm2-135m")
    if smoke:
        config = config.replace(vocab_size=512, dim=64, n_layers=2, intermediate_size=128)
    teacher = Transformer(config).to(device)
    calib_tokens = 256 if smoke else 4096
    calib = torch.randint(0, config.vocab_size, (calib_tokens,))
    student, _ = convert(teacher, calib.to(device), ConvertOptions(kv_saving=saving, calib_tokens=calib_tokens,
                                                                   progress=False))
    student = student.to(device=device, dtype=torch.float32)
    teacher = teacher.to(dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return student, teacher


def steady_speed(student, teacher, batch_size: int, steps: int, compile: bool, seq_len: int, lr: float,
                 kl_chunk: int, compile_backend: str = "inductor") -> tuple[float, float]:
    from mlakit.heal.distill import HealOptions, heal_model

    per_step = batch_size * seq_len
    windows = torch.randint(0, student.config.vocab_size, (batch_size * 4 + 20, seq_len))
    options = HealOptions(tokens=steps * per_step, train="all", lr=lr, batch_size=batch_size, seq_len=seq_len,
                          compile=compile, compile_backend=compile_backend, progress=False,
                          checkpoint_every=10 ** 9, val_windows=1, kl_chunk=kl_chunk)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    start = time.perf_counter()
    result = heal_model(student, teacher, windows, options, log=lambda *_: None)
    total = time.perf_counter() - start
    student.load_state_dict(state)
    tail = sorted(result.log["step_seconds"][steps // 2:])
    return per_step / tail[len(tail) // 2], total


def profile(student, teacher, batch_size: int, seq_len: int, compile: bool, kl_chunk: int, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from mlakit.heal.distill import Distiller, HealOptions, select_trainable

    options = HealOptions(train="all", batch_size=batch_size, seq_len=seq_len, compile=compile, kl_chunk=kl_chunk)
    params = select_trainable(student, "all")
    student.train()  # the naive MLA path: the default forward options
    distiller = Distiller(student, teacher, options)
    if compile:
        distiller.compile()
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=student.device.type == "cuda" or None)
    batch = torch.randint(0, student.config.vocab_size, (batch_size, seq_len), device=student.device)

    def step():
        loss, _ = distiller.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(4):  # warm-up (compiles)
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 5 * 1e3
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    # kernels only (their self time; CPU-side ops report 0): how much of a step the GPU works
    gpu_ms = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / 3 / 1e3
    print(f"  step {step_ms:.1f} ms; GPU busy {gpu_ms:.1f} ms of it (sum of kernel times)")
    if compile:
        distiller.uncompile()
    student.eval().requires_grad_(False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--saving", type=float, default=0.75)
    parser.add_argument("--batch-sizes", default="16,32,64,128")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kl-chunk", type=int, default=4096)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--profile", type=int, default=0, help="also profile a few steps at this batch size")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU (batches 2,4 x 32, 4 steps): the same code, numbers mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.seq_len, args.steps = "2,4", 32, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    name += " (smoke run: a tiny model)" if args.smoke else ""
    print(f"heal step speed (wikitext2-smollm2-v1 model shape, random weights, saving {args.saving}) on {name}, "
          f"torch {torch.__version__}")
    student, teacher = build(args.saving, device, args.smoke)
    print(f"student: kv_lora_rank {student.config.kv_lora_rank}, rope {student.config.qk_rope_head_dim}")
    print("| batch x seq | tokens/step | steady tokens/s | wall (compile incl.) |")
    print("|---|---:|---:|---:|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        try:
            speed, total = steady_speed(student, teacher, b, args.steps, not args.eager, args.seq_len, 1e-5,
                                        args.kl_chunk, "inductor" if device == "cuda" else "aot_eager")
        except torch.OutOfMemoryError:
            print(f"| {b} x {args.seq_len} | {b * args.seq_len} | out of memory | |")
            torch.cuda.empty_cache()
            continue
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0
        print(f"| {b} x {args.seq_len} | {b * args.seq_len:,} | {speed:,.0f} | {total:.0f} s (peak {mem:.1f} GiB) |")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    if args.profile and device != "cuda":
        print("\n--profile needs a CUDA GPU (it times CUDA kernels): skipped")
    elif args.profile:
        print(f"\nprofile at batch {args.profile}:")
        profile(student, teacher, args.profile, args.seq_len, not args.eager, args.kl_chunk, args.rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
