"""The runs that tests/test_distributed.py does in one process and on several (worker.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "heal"))

from helpers import gqa_config, mla_config, perturbed, random_model, random_windows  # noqa: E402

from mlakit.engine import SamplingParams, generate  # noqa: E402
from mlakit.heal.distill import HealOptions, heal_model  # noqa: E402

HEAL_STEPS = 3
PROMPTS = [[1, 2, 3, 4, 5, 6], [9, 8, 7]]
MODELS = {  # tiny models whose heads and MLP split over 2 ranks
    "gqa": lambda: gqa_config(qkv_bias=True),
    "mla": lambda: mla_config(latent_norm=True),
    "mla-qlora": lambda: mla_config(q_lora=16, tie_embeddings=True),
}


def heal_options(**changes) -> HealOptions:
    # hidden-state matching and gradient clipping on: both need reductions over the ranks
    base = dict(tokens=HEAL_STEPS * 4 * 16, train="all", batch_size=4, seq_len=16, hidden_weight=0.5, lr=3e-3,
                warmup=0.0, grad_clip=0.05, val_windows=2, checkpoint_every=1000, progress=False)
    return HealOptions(**{**base, **changes})


def heal_models():
    teacher = random_model(gqa_config())
    return perturbed(random_model(mla_config(latent_norm=True), seed=0)), teacher


def heal_run(job=None, state_dir=None, stop_after_first_step=False, resume=False) -> dict:
    """``HEAL_STEPS`` steps of healing (``stop_after_first_step``: one step, the state saved);
    the student's parameters afterwards (gathered) and the log."""
    from mlakit.heal.distill import Distiller

    student, teacher = heal_models()
    options = heal_options(max_minutes=0.0 if stop_after_first_step else None)
    rows: list[int] = []  # windows each training step of this rank reads
    loss = Distiller.loss

    def counted_loss(self, tokens):
        rows.append(tokens.shape[0])
        return loss(self, tokens)

    Distiller.loss = counted_loss
    try:
        result = heal_model(student, teacher, random_windows(40, 16), options, state_dir=state_dir, resume=resume,
                            log=lambda *_: None, job=job)
    finally:
        Distiller.loss = loss
    if job is not None:
        from mlakit.parallel import full_state_dict

        params = full_state_dict(student)
    else:
        params = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return {"params": params, "loss": result.log["loss"], "val": [v["kl"] for v in result.log["val"]],
            "step": result.step, "rows": rows}


def greedy_run(name: str, job=None) -> dict:
    """Greedy tokens of ``PROMPTS`` and the prefill logits of a tiny model (tensor parallel with ``job``)."""
    from mlakit.engine import Engine

    model = random_model(MODELS[name]())
    if job is not None:
        from mlakit.parallel import parallelize_for_decode

        parallelize_for_decode(model, job.mesh)
    params = SamplingParams(max_new_tokens=16, greedy=True)
    tokens = generate(model, PROMPTS, params)
    engine = Engine(model, len(PROMPTS), 32, compile=False)
    prompt = torch.tensor([PROMPTS[0][:3], PROMPTS[1]])
    logits = engine.prefill(prompt, torch.tensor([3, 3]))
    step = engine.decode(torch.tensor([5, 6]), torch.tensor([3, 3]))
    return {"tokens": tokens, "prefill": logits.clone(), "decode": step.clone()}


def bench_logits(job=None) -> dict:
    """``mlakit bench e2e``'s tiny variants as its tensor-parallel run builds them (``E2EBench._model``:
    same seed on every rank, split before the engine): prefill and one decode step's logits per variant
    whose heads split over 2 ranks (MQA's one KV head does not)."""
    from mlakit.bench.e2e import E2EBench, E2EOptions

    opts = E2EOptions(preset="tiny", device="cpu", dtype="float32", variants=("original", "mla", "mha"), hf=False,
                      progress=False, tensor_parallel=job is not None)
    bench = E2EBench(opts, log=lambda msg: None, job=job)
    _, variants = bench._plan()
    out = {}
    generator = torch.Generator().manual_seed(0)
    for variant in variants:
        model = bench._model(variant)
        engine = bench._engine(model, 2, 32)
        prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=generator)
        out[variant.name + " prefill"] = engine.prefill(prompt, torch.tensor([5, 5])).clone()
        step = torch.randint(0, model.config.vocab_size, (2,), generator=generator)
        out[variant.name + " decode"] = engine.decode(step, torch.tensor([5, 5])).clone()
    return out
