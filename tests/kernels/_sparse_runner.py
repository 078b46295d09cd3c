"""Sparse-decode kernels vs their references under the Triton interpreter, in a process of
its own (TRITON_INTERPRET=1 must be set before mlakit.kernels is imported; see
_interpreter_runner.py). Prints one JSON object: case id -> {rel_err, tol, ...}."""

import json
import sys
import traceback

from mlakit.testing.sparse_cases import SPARSE_CASES, TOL


def run_case(case):
    import torch

    from mlakit.kernels import mla_sparse as S

    dtype, b, s, h, r, p, max_len, lengths, index_rank, topk, window, sink, splits = case
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    q_latent = torch.randn(b, s, h, r, generator=gen).to(dtype)
    q_rope = torch.randn(b, s, h, p, generator=gen).to(dtype)
    kv = torch.randn(b, max_len, r + p, generator=gen).to(dtype)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    ref = S.mla_sparse_index_reference(q_latent, q_rope, kv, lengths, r, index_rank)
    out = S.mla_sparse_index(q_latent, q_rope, kv, lengths, r, index_rank)
    finite = torch.isfinite(ref)
    same_mask = bool(torch.equal(finite, torch.isfinite(out)))
    index_err = float((out[finite] - ref[finite]).abs().max() / ref[finite].abs().max())
    chosen = S.select_positions(ref, S._query_positions(lengths, s), topk, window, sink)
    att = S.mla_sparse_attend(q_latent, q_rope, kv, chosen, 0.125, r, num_splits=splits)
    att_ref = S.mla_sparse_attend_reference(q_latent.double(), q_rope.double(), kv.double(), chosen, 0.125, r)
    rel = float((att.double() - att_ref).norm() / att_ref.norm())
    return {"index_same_mask": same_mask, "index_err": index_err, "rel_err": rel,
            "finite": bool(torch.isfinite(att).all()), "tol": TOL[case[0]]}


def run_model_case():
    """A tiny MLA model decoding through the interpreted sparse kernels vs the masked
    dense reference path (kernels off): the same selection, the same logits."""
    import torch

    from mlakit import ModelConfig, Transformer
    from mlakit.engine import Engine
    from mlakit.options import ForwardOptions

    config = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=9, n_kv_heads=9, head_dim=16,
                         intermediate_size=96, attention="mla", kv_lora_rank=24, qk_rope_head_dim=8,
                         qk_nope_head_dim=16, v_head_dim=16, max_seq_len=64)
    model = Transformer(config).init_random(seed=0, std=0.3)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([30, 21])
    logits = {}
    with torch.no_grad():
        for kernels in (True, False):
            options = ForwardOptions(kernels=kernels, sparse_topk=8, sparse_window=3, sparse_sink=2,
                                     sparse_index_rank=8)
            engine = Engine(model, 2, 40, options=options)
            engine.prefill(torch.where(torch.arange(30) < lengths[:, None], tokens[:, :30], 0), lengths)
            positions, steps = lengths.clone(), []
            for _ in range(4):
                steps.append(engine.decode(tokens[torch.arange(2), positions], positions).double())
                positions += 1
            logits[kernels] = torch.stack(steps)
    rel = float((logits[True] - logits[False]).norm() / logits[False].norm())
    return {"index_same_mask": True, "index_err": 0.0, "rel_err": rel, "finite": bool(torch.isfinite(logits[True]).all()),
            "tol": 1e-4}


def main():
    import mlakit.kernels as kernels

    if not (kernels.HAS_TRITON and kernels.INTERPRET):
        print(json.dumps({"error": "triton missing or TRITON_INTERPRET not set"}))
        return 1
    results = {}
    for case_id, case in SPARSE_CASES.items():
        try:
            results[case_id] = run_case(case)
        except Exception as exc:  # reported per case by the pytest side
            results[case_id] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    try:
        results["model-decode"] = run_model_case()
    except Exception as exc:
        results["model-decode"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
