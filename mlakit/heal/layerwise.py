"""Layer-wise initialisation: fit each MLA layer to the original layer's attention output.

Before end-to-end distillation, every student attention block is trained on its own
against the teacher's attention block of the same layer, on the teacher's hidden
states at that layer's input (``attention_norm(h_l)``): a few hundred AdamW steps of
``‖attn_s(x) − attn_t(x)‖² / ‖attn_t(x)‖²`` per layer. The layers are independent
(every one sees the teacher's inputs), so errors do not compound while fitting, and
the end-to-end phase starts from attention that already matches layer by layer.

A layer whose fit ends worse than it started (too high a learning rate for its
weights) gets its weights back: the fit never makes a layer worse on its windows.
On the default model at 75% saving the fit at lr 1e-3 made 9 of 30 layers worse and
the healed model much worse (ppl 41.0 against 34.9); at 1e-4 (the default) every
layer improved (mean error 0.37 -> 0.16) and the healed model ended where plain
distillation ends (34.85 against 34.81-34.89), docs/heal.md.
"""

from __future__ import annotations

import math
import time

import torch

from mlakit.attention import MLA_PARAMETERS


def _relative_mse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean().clamp(min=1e-12)


def _attend(attention, x: torch.Tensor, inputs, layer: int) -> torch.Tensor:
    """Layer ``layer``'s attention alone on ``x`` with a forward's ``LayerInputs``."""
    cos, sin, mask = inputs.per_layer[layer]
    return attention(x, cos, sin, inputs.positions, mask)


def layerwise_init(student, teacher, windows: torch.Tensor, options, log=print) -> dict:
    """Fit ``student.layers[l].attention`` to ``teacher.layers[l].attention`` for every ``l``
    on the first ``options.layerwise_windows`` of ``windows [n, s]`` (in place). Which
    attention parameters move follows ``options.train`` (``all`` moves the whole block's
    attention). Returns the relative MSE of every layer before and after (a layer whose
    fit made it worse keeps its old weights and is listed in ``restored``)."""
    from tqdm.auto import tqdm

    device = student.device
    use_amp = device.type == "cuda" if options.autocast is None else options.autocast
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp)
    tokens = windows[: options.layerwise_windows].to(device)  # [N, s]
    n, s = tokens.shape
    batch = min(options.batch_size, n)
    t_inputs = teacher.layer_inputs(tokens[:batch])  # positions, RoPE angles and mask of a batch
    s_inputs = student.layer_inputs(tokens[:batch])  # the same with the student's RoPE frequencies
    names = MLA_PARAMETERS if options.train == "mla" else (*MLA_PARAMETERS, "wo")
    result = {"before": [], "after": [], "restored": [], "steps": options.layerwise_steps, "windows": n}
    start_time = time.perf_counter()
    with torch.no_grad(), torch.autocast(**amp):
        hidden = teacher.embed(tokens)  # [N, s, dim]: the teacher's states, layer by layer
    bar = tqdm(total=len(student.layers) * options.layerwise_steps, desc="layer-wise init", unit="step",
               disable=not options.progress)
    def batched(fn, inputs: torch.Tensor, layer_inputs) -> torch.Tensor:
        """``fn(chunk, layer_inputs)`` over ``inputs [N, s, dim]`` in batches (the last one may be short)."""
        outs = []
        for i in range(0, n, batch):
            chunk = inputs[i:i + batch]
            outs.append(fn(chunk, layer_inputs.first(chunk.shape[0])))
        return torch.cat(outs)

    for l, (s_layer, t_layer) in enumerate(zip(student.layers, teacher.layers)):
        attn = s_layer.attention
        with torch.no_grad(), torch.autocast(**amp):
            x = t_layer.attention_norm(hidden)  # [N, s, dim]: this layer's attention input
            target = batched(lambda chunk, inputs: _attend(t_layer.attention, chunk, inputs, l), x, t_inputs)

        def error() -> float:
            with torch.no_grad(), torch.autocast(**amp):
                return float(_relative_mse(batched(lambda chunk, inputs: _attend(attn, chunk, inputs, l), x, s_inputs),
                                           target))

        params = [p for name, p in attn.named_parameters() if name.split(".")[0] in names]
        for p in attn.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        result["before"].append(error())
        start = [p.detach().clone() for p in params]
        optimizer = torch.optim.AdamW(params, lr=options.layerwise_lr, betas=(0.9, 0.95), weight_decay=0.0,
                                      fused=(device.type == "cuda") or None)
        for k in range(options.layerwise_steps):
            lr = options.layerwise_lr * 0.5 * (1 + math.cos(math.pi * k / options.layerwise_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.arange(k * batch, (k + 1) * batch, device=device) % n  # a fixed round-robin order
            with torch.autocast(**amp):
                loss = _relative_mse(_attend(attn, x[idx], s_inputs, l), target[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
        after = error()
        if after > result["before"][-1]:  # the fit diverged: keep the layer as it came
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            result["restored"].append(l)
            after = result["before"][-1]
        result["after"].append(after)
        bar.set_postfix(layer=l, before=f"{result['before'][-1]:.4f}", after=f"{result['after'][-1]:.4f}")
        with torch.no_grad(), torch.autocast(**amp):
            # the next layer's input, from the teacher (its one layer loop, this layer only)
            hidden = batched(lambda chunk, inputs: teacher.run_layers(chunk, inputs, layers=range(l, l + 1)),
                             hidden, t_inputs)
    bar.close()
    result["seconds"] = time.perf_counter() - start_time
    mean_before = sum(result["before"]) / len(result["before"])
    mean_after = sum(result["after"]) / len(result["after"])
    restored = f"; layers {result['restored']} fitted worse and kept their weights" if result["restored"] else ""
    log(f"layer-wise init: attention output error (relative MSE, mean over layers) {mean_before:.4f} -> "
        f"{mean_after:.4f}{restored} ({result['seconds']:.0f}s)")
    return result
