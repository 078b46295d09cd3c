"""The converter's sweep: convert at several savings (uniform and adaptive ranks),
evaluate each on the protocol, write a Markdown table, a PNG plot and the raw JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from mlakit.errors import MlakitError
from mlakit.evaluate import PROTOCOL, evaluate, format_result
from mlakit.io import atomic_file, ensure_dir, write_text


def variant_name(allocation: str, rope_frequencies: str) -> str:
    return allocation if rope_frequencies == "free" else f"{allocation}, {rope_frequencies} RoPE"


def run_sweep(loaded, savings: list[float], options, allocations=("uniform", "adaptive"),
              rope_frequencies=("free",), log=print) -> dict[str, Any]:
    """Rows of (variant, saving, ppl, ...) plus the original's row; one calibration for all."""
    if getattr(options, "rank_shape", "free") != "free":
        raise MlakitError(f"--sweep varies --kv-saving; --rank-shape {options.rank_shape} fixes the budget "
                          "(give one or the other)")
    from mlakit.convert import analyse, convert_model
    from mlakit.evaluate import calibration_tokens
    from mlakit.loading import LoadedModel

    from mlakit.convert.demo import cached_eval

    start = time.perf_counter()
    original, _ = cached_eval(loaded) if loaded.source == "default" else (evaluate(loaded), False)
    log(format_result(original))
    tokens = calibration_tokens(loaded.tokenizer, options.calib_tokens)
    analysis = analyse(loaded.model, tokens, options)
    rows = []
    for saving in savings:
        for frequencies in rope_frequencies:
            for allocation in allocations:
                variant = variant_name(allocation, frequencies)
                opts = dataclasses.replace(options, kv_saving=saving, rank_allocation=allocation,
                                           rope_frequencies=frequencies)
                model, summary = convert_model(loaded.model, analysis, opts)
                result = evaluate(LoadedModel(model, loaded.tokenizer, f"{loaded.source} -> MLA {variant} {saving:g}"))
                log(format_result(result))
                rows.append({"variant": variant, "allocation": allocation, "rope_frequencies": frequencies,
                             "target_saving": saving, "ppl": result.ppl,
                             "kv_values_per_token_layer": result.kv_values_per_token_layer,
                             "kv_saving": summary.kv_saving, "rope_dim": summary.rope_dim, "ranks": summary.ranks,
                             "rope_freq_indices": summary.rope_freq_indices,
                             "convert_seconds": sum(summary.seconds.values()), "eval_seconds": result.seconds})
                del model
    return {"protocol": PROTOCOL, "source": loaded.source, "original_ppl": original.ppl,
            "original_kv_values_per_token_layer": original.kv_values_per_token_layer,
            "calib_tokens": analysis.calib_tokens, "calibrate_seconds": analysis.seconds,
            "options": {k: v for k, v in dataclasses.asdict(options).items()
                        if k not in ("kv_saving", "progress", "rank_allocation", "rope_frequencies")},
            "rows": rows, "seconds": time.perf_counter() - start}


def markdown_table(sweep: dict[str, Any]) -> str:
    rows = sweep["rows"]
    savings = sorted({r["target_saving"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    head = ["KV saving", "values/token/layer", "rope dim"] + [f"ppl ({v})" for v in variants]
    lines = [f"Protocol `{sweep['protocol']}`, source `{sweep['source']}` (original ppl "
             f"{sweep['original_ppl']:.2f}, {sweep['original_kv_values_per_token_layer']:g} values/token/layer), "
             f"calibration {sweep['calib_tokens']} tokens.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in savings:
        by = {r["variant"]: r for r in rows if r["target_saving"] == s}
        first = next(iter(by.values()))
        cells = [f"{100 * first['kv_saving']:.1f}%", f"{first['kv_values_per_token_layer']:g}", str(first["rope_dim"])]
        cells += [f"{by[v]['ppl']:.2f}" if v in by else "" for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant in dict.fromkeys(r["variant"] for r in sweep["rows"]):
        rows = sorted((r for r in sweep["rows"] if r["variant"] == variant), key=lambda r: r["kv_saving"])
        ax.plot([100 * r["kv_saving"] for r in rows], [r["ppl"] for r in rows], marker="o", label=variant)
    ax.axhline(sweep["original_ppl"], color="gray", linestyle="--", label=f"original ({sweep['original_ppl']:.2f})")
    ax.set_xlabel("KV cache saving (%)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{sweep['source']} -> MLA, {sweep['protocol']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_report(sweep: dict[str, Any], directory: str | os.PathLike) -> list[Path]:
    directory = ensure_dir(directory)
    md, png, js = directory / "sweep.md", directory / "sweep.png", directory / "sweep.json"
    write_text(md, f"# MLA conversion sweep\n\n{markdown_table(sweep)}\n![ppl vs KV saving](sweep.png)\n")
    write_text(js, json.dumps(sweep, indent=2) + "\n")
    plot(sweep, png)
    return [md, png, js]
