#!/usr/bin/env python3
"""Compile the MLA decode kernel for Hopper (sm_90a) on a machine without a GPU and report,
per launch configuration, what the tensor-core dots lowered to and what the tile costs:

    python scripts/kernel_ptx_report.py                       # the configurations below
    python scripts/kernel_ptx_report.py --config 32,64,8,3    # block_h,block_n,num_warps,num_stages

Columns: wgmma / mma.sync instructions in the PTX, registers per thread and spill stores
(ptxas -v), shared memory (Triton's metadata).  Used to choose which configurations are
worth GPU time (docs/kernels.md); the local Triton may be newer than the GPU machine's, so
the code it generates can differ in detail.  Needs triton with its bundled ptxas.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

decode = importlib.import_module("mlakit.kernels.mla_decode")
from mlakit.kernels.ptxas import ptxas_path, ptxas_resources  # noqa: E402

POINTERS = {"q_latent_ptr": "*bf16", "q_rope_ptr": "*bf16", "kv_ptr": "*bf16", "lengths_ptr": "*i32",
            "out_ptr": "*bf16", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
# what Triton's launcher specializes at run time for the engine's contiguous bf16 tensors
DIVISIBLE_BY_16 = list(POINTERS) + ["stride_kvb", "stride_kvn", "stride_qlb", "stride_qls", "stride_qlh"]


def _ptxas() -> str:
    path = ptxas_path()
    if path is None:
        raise SystemExit("no ptxas in the installed triton")
    return path


def report(block_h: int, block_n: int, num_warps: int, num_stages: int, rank: int = 512, rope: int = 64) -> dict:
    fn = decode._mla_decode_split_kernel
    names = fn.arg_names
    constexprs = dict(RANK=rank, ROPE=rope, BLOCK_H=block_h, BLOCK_N=block_n,
                      BLOCK_R=max(16, triton.next_power_of_2(rank)),
                      BLOCK_P=max(16, triton.next_power_of_2(rope)) if rope else 16,
                      WRITE_PARTIAL=True, DOT_PRECISION="tf32", DOT_UPCAST=False)
    signature = {n: POINTERS.get(n) or ("constexpr" if n in constexprs else "fp32" if n == "scale_log2" else "i32")
                 for n in names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(k),): [["tt.divisibility", 16]] for k in DIVISIBLE_BY_16})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = kernel.asm["ptx"]
    return dict(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"), **ptxas_resources(ptx, _ptxas()),
                shared_bytes=kernel.metadata.shared)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="block_h,block_n,num_warps,num_stages (repeatable)")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--rope", type=int, default=64)
    args = parser.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.config] if args.config else [
        (32, 32, 4, 3), (32, 64, 8, 3), (64, 32, 8, 2), (64, 64, 8, 2)]
    print(f"triton {triton.__version__}, sm_90a, rank {args.rank} + rope {args.rope}")
    print("| block_h | block_n | warps | stages | wgmma | mma.sync | registers | spill bytes | shared bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        r = report(*cfg, rank=args.rank, rope=args.rope)
        print(f"| {' | '.join(map(str, cfg))} | {r['wgmma']} | {r['mma_sync']} | {r['registers']} | "
              f"{r['spill_bytes']} | {r['shared_bytes']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
