"""The sparse-decode kernels' correctness cases (mlakit.kernels.mla_sparse against its
references), shared by tests/kernels/_sparse_runner.py (the Triton interpreter) and
scripts/device/sparse_check.py (CUDA)."""

# id: (dtype, batch, s_q, heads, rank, rope, max_len, lengths, index_rank, topk, window, sink, num_splits)
SPARSE_CASES = {
    "f32-h9-r48-p24-ragged": ("float32", 2, 1, 9, 48, 24, 70, [70, 5], 16, 10, 4, 2, None),
    "f32-h16-r64-p32-split3": ("float32", 2, 1, 16, 64, 32, 200, [200, 30], 32, 60, 8, 4, 3),
    "f32-h16-r64-p32-sq3-split2": ("float32", 2, 3, 16, 64, 32, 150, [150, 3], 64, 40, 4, 1, 2),
    "f32-h1-r16-p0": ("float32", 1, 1, 1, 16, 0, 40, [33], 8, 5, 2, 1, None),
    "bf16-h9-r64-p32-sq2": ("bfloat16", 2, 2, 9, 64, 32, 90, [90, 41], 16, 20, 4, 2, 2),
    "f16-h9-r48-p24": ("float16", 2, 1, 9, 48, 24, 64, [64, 1], 24, 12, 3, 2, None),
}
TOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
