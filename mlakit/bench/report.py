"""decode-e2e-v1's report: ratios between rows, the issue-6 targets as far as a run
measured them, the markdown table, the two plots, and the files they go to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from mlakit.bench.memory import GIB


def fmt(value, spec: str, empty: str = "") -> str:
    """A table cell: ``value`` formatted by ``spec``, or ``empty`` where nothing was measured."""
    return empty if value is None else format(value, spec)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """vs_original: tokens/s over the original's at the same (batch, context), decode rows;
    vs_hf: for mlakit rows, tokens/s over transformers' dynamic-cache row of the same shape."""
    original = {(r["batch"], r["context"]): r["tokens_per_s"] for r in rows
                if r["phase"] == "decode" and r["variant"].endswith("(original)") and r["tokens_per_s"]}
    hf = {(r["batch"], r["context"], r["phase"]): r["tokens_per_s"] for r in rows
          if r["phase"].startswith("hf-") and r["tokens_per_s"]}
    for r in rows:
        key = (r["batch"], r["context"])
        if r["tokens_per_s"] and r["phase"] in ("decode", "hf-dynamic", "hf-static") and original.get(key):
            r["vs_original"] = r["tokens_per_s"] / original[key]
        if r["tokens_per_s"] and r["phase"] == "decode":
            for phase in ("hf-dynamic", "hf-static"):
                if hf.get((*key, phase)):
                    r["vs_" + phase.replace("-", "_")] = r["tokens_per_s"] / hf[(*key, phase)]



def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    """The issue-6 targets, as far as this run measured them."""
    rows = result["rows"]
    out: Dict[str, Any] = {}
    decode = [r for r in rows if r["phase"] == "decode"]
    orig = [r for r in decode if r["variant"].endswith("(original)")]
    mla = [r for r in decode if r["variant"].startswith("MLA")]
    # MLA vs original at the largest batch both ran (the protocol row is (64, 8192))
    both = sorted({(r["batch"], r["context"]) for r in orig if r["tokens_per_s"]}
                  & {(r["batch"], r["context"]) for r in mla if r["tokens_per_s"]})
    if both:
        b, c = max(both)
        o = next(r for r in orig if (r["batch"], r["context"]) == (b, c))
        m = next(r for r in mla if (r["batch"], r["context"]) == (b, c))
        out["mla_vs_original_decode"] = dict(batch=b, context=c, original=o["tokens_per_s"], mla=m["tokens_per_s"],
                                             ratio=m["tokens_per_s"] / o["tokens_per_s"], target=2.5,
                                             bandwidth_bound_ratio=o["bytes_per_step"] / m["bytes_per_step"])
    mla_only = [(r["batch"], r["context"], r["tokens_per_s"]) for r in mla if r["tokens_per_s"]
                and not any(o["tokens_per_s"] and (o["batch"], o["context"]) == (r["batch"], r["context"]) for o in orig)]
    if mla_only:
        out["mla_only_rows"] = [dict(batch=b, context=c, tokens_per_s=t) for b, c, t in mla_only]
    mb = {m["variant"]: m["max_batch"] for m in result.get("max_batch", []) if m.get("max_batch")}
    o_name = next((m["variant"] for m in result.get("max_batch", []) if m["variant"].endswith("(original)")), None)
    m_name = next((m["variant"] for m in result.get("max_batch", []) if m["variant"].startswith("MLA")), None)
    if o_name and m_name and mb.get(o_name) and mb.get(m_name):
        out["max_batch_ratio"] = dict(context=result["max_batch"][0]["context"], original=mb[o_name], mla=mb[m_name],
                                      ratio=mb[m_name] / mb[o_name], target=3.5)
    b1 = [r for r in decode if r["batch"] == 1 and r.get("bw_fraction") is not None]
    if b1:
        ctx = min(r["context"] for r in b1)
        out["batch1_bandwidth_fraction"] = {r["variant"]: r["bw_fraction"] for r in b1 if r["context"] == ctx}
        out["batch1_bandwidth_context"] = ctx
        out["batch1_bandwidth_target"] = 0.8
    vs_hf = {}
    for r in orig:
        for phase in ("hf_dynamic", "hf_static"):
            if r.get("vs_" + phase):
                vs_hf.setdefault(phase, []).append(dict(batch=r["batch"], context=r["context"],
                                                        ratio=r["vs_" + phase]))
    if vs_hf:
        out["original_vs_transformers"] = vs_hf
    return out


def format_table(result: Dict[str, Any]) -> str:
    """Markdown: a header naming protocol and device, the main table, max batch, targets."""
    env = result.get("env", {})
    lines = [
        f"{result['protocol']} on {result['gpu']} ({result['dtype']}, copy {result['copy_gbps']:.0f} GB/s, "
        f"model {result['model']}, {result['steps']} timed steps, "
        f"decode step: {'CUDA graph' if result['device'].startswith('cuda') else 'eager'}"
        f"{' + torch.compile blocks' if result.get('compiled') else ''}"
        + (f", tensor parallel: world size {result['tensor_parallel']['world_size']} (bytes and cache per rank)"
           if result.get("tensor_parallel") else "")
        + f", torch {env.get('torch', '?')}"
        + (f", transformers {env['transformers']}" if "transformers" in env else "") + ")",
        "",
        "| phase | variant | batch | context | tok/s | ms/step | KV bytes/token | peak GiB | % of BW limit "
        "| vs original | vs transformers (dynamic) | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        status = r["status"]
        tps = fmt(r.get("tokens_per_s"), ".1f", status if status != "ok" else "")
        lines.append(
            f"| {r['phase']} | {r['variant']} | {r['batch']} | {r['context']} | {tps} | {fmt(r.get('ms_per_step'), '.2f')} "
            f"| {fmt(r.get('kv_bytes_per_token'), 'd')} | {fmt(r.get('peak_gib'), '.1f')} "
            f"| {fmt(None if r.get('bw_fraction') is None else 100 * r['bw_fraction'], '.0f')} "
            f"| {fmt(r.get('vs_original'), '.2f')} | {fmt(r.get('vs_hf_dynamic'), '.1f')} "
            f"| {r.get('note', '')} |")
    if result.get("max_batch"):
        lines += ["", f"Largest batch at context {result['max_batch'][0]['context']} (estimated from free memory, "
                      "verified by building the engine and decoding):", "",
                  "| variant | KV bytes/token | MiB per sequence | free GiB | estimate | largest batch | tries | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for m in result["max_batch"]:
            tries = " ".join(f"{b}{'' if ok else '(OOM)'}" for b, ok in m.get("tries", []))
            lines.append(f"| {m['variant']} | {m['kv_bytes_per_token']} | {m['bytes_per_sequence'] / 2**20:.1f} "
                         f"| {m['free_gib']:.1f} | {fmt(m.get('estimate'), 'd')} | {fmt(m.get('max_batch'), 'd')} "
                         f"| {tries} | {m.get('note', '')} |")
    s = result.get("summary", {})
    lines += ["", "Targets of issue 6 (this run):", ""]
    if "mla_vs_original_decode" in s:
        t = s["mla_vs_original_decode"]
        lines.append(f"- MLA vs original decode at ({t['batch']}, {t['context']}): {t['mla']:.1f} vs {t['original']:.1f} "
                     f"tok/s = {t['ratio']:.2f}x (target >= {t['target']}x at (64, 8192); if both ran at the "
                     f"bandwidth limit: {t['bandwidth_bound_ratio']:.2f}x)")
    for r in s.get("mla_only_rows", []):
        lines.append(f"- MLA runs where the original does not: ({r['batch']}, {r['context']}) {r['tokens_per_s']:.1f} tok/s")
    if "max_batch_ratio" in s:
        t = s["max_batch_ratio"]
        lines.append(f"- largest batch at context {t['context']}: MLA {t['mla']} vs original {t['original']} = "
                     f"{t['ratio']:.2f}x (target >= {t['target']}x)")
    if "batch1_bandwidth_fraction" in s:
        parts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["batch1_bandwidth_fraction"].items())
        lines.append(f"- batch 1, context {s['batch1_bandwidth_context']}: fraction of the bandwidth limit {parts} "
                     "(target >= 80%)")
    for phase, items in s.get("original_vs_transformers", {}).items():
        parts = ", ".join(f"({i['batch']}, {i['context']}) {i['ratio']:.1f}x" for i in items)
        lines.append(f"- original vs transformers generate ({phase.replace('hf_', '')} cache): {parts}")
    hf_rows = [r for r in result["rows"] if r["phase"].startswith("hf-")]
    if hf_rows and not any(r["phase"] == "hf-static" for r in hf_rows):
        lines.append("- transformers with its static cache: not run (--hf-static; generate compiles for minutes)")
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines)


def write_plots(result: Dict[str, Any], directory: str) -> List[str]:
    """Two PNGs a user would rather look at than read: decode tokens/s and peak memory,
    each against context (batch 1) and against batch (at the grid's most common
    context), one line per variant, transformers dashed, OOM rows as an x on the
    bottom edge; the memory figure adds the largest batch per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r["phase"] in ("decode", "hf-dynamic", "hf-static")]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {v: (("0.35" if "static" in v else "0.55", "--") if v.startswith("transformers")
                 else (colors[i % len(colors)], "-")) for i, v in enumerate(variants)}
    total_gib = None
    if result.get("device", "").startswith("cuda") and torch.cuda.is_available():
        total_gib = torch.cuda.get_device_properties(torch.device(result["device"])).total_memory / GIB
    small_batch = min((r["batch"] for r in rows), default=1)
    contexts = [r["context"] for r in rows]
    common_ctx = max(set(contexts), key=contexts.count) if contexts else 0
    panels = [("batch", small_batch, "context", f"batch {small_batch}: against context"),
              ("context", common_ctx, "batch", f"context {common_ctx}: against batch")]
    title = f"{result['protocol']}: {result['model']} on {result['gpu']}"
    mbs = [m for m in result.get("max_batch", []) if m.get("max_batch")]
    paths = []
    for key, ylabel, fname in (("tokens_per_s", "decode tokens/s (all sequences)", "e2e_throughput.png"),
                               ("peak_gib", "peak GPU memory (GiB)", "e2e_memory.png")):
        n_panels = 2 + (1 if key == "peak_gib" and mbs else 0)
        fig, axes = plt.subplots(1, n_panels, figsize=(5.6 * n_panels, 4.8), squeeze=False)
        for ax, (fixed, value, xkey, subtitle) in zip(axes[0], panels):
            for variant in variants:
                pts = sorted(((r[xkey], r.get(key), r["status"]) for r in rows
                              if r["variant"] == variant and r[fixed] == value), key=lambda t: t[0])
                good = [(x, y) for x, y, st in pts if st == "ok" and y is not None]
                bad = [x for x, y, st in pts if st == "OOM"]
                color, ls = style[variant]
                if good:
                    ax.plot([x for x, _ in good], [y for _, y in good], ls, marker="o", color=color, label=variant)
                if bad:
                    ax.scatter(bad, [0.03] * len(bad), transform=ax.get_xaxis_transform(), marker="x", color=color,
                               s=70, label=None if good else f"{variant} (OOM)", clip_on=False)
            if key == "peak_gib" and total_gib:
                ax.axhline(total_gib, color="k", lw=0.8, ls=":", label=f"device {total_gib:.0f} GiB")
            ax.set_xscale("log", base=2)
            xs = [r[xkey] for r in rows if r[fixed] == value]
            if xs:
                ax.set_xlim(min(xs) / 1.4, max(xs) * 1.4)
            if key == "tokens_per_s" and any(line.get_xydata().size for line in ax.get_lines()):
                ax.set_yscale("log")
            ax.set_xlabel(f"{xkey} (x = out of memory)")
            ax.set_ylabel(ylabel)
            ax.set_title(subtitle, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            if not any(r.get(key) is not None for r in rows):
                ax.text(0.5, 0.5, "not measured on this device", ha="center", va="center", transform=ax.transAxes)
        if n_panels == 3:
            ax = axes[0][2]
            names = [m["variant"] for m in mbs]
            ax.bar(range(len(mbs)), [m["max_batch"] for m in mbs],
                   color=[style[n][0] if n in style else "C0" for n in names])
            for i, m in enumerate(mbs):
                ax.text(i, m["max_batch"], str(m["max_batch"]), ha="center", va="bottom")
            ax.set_xticks(range(len(mbs)), names, rotation=15, fontsize=8)
            ax.set_ylabel("largest batch that fits")
            ax.set_title(f"largest batch at context {mbs[0]['context']}", fontsize=10)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_outputs(result: Dict[str, Any], json_path: Optional[str] = None, markdown_path: Optional[str] = None,
                  plot_dir: Optional[str] = None) -> str:
    """Write the table (markdown), the plots and the JSON where asked; return the table.
    The JSON goes last, so that the plots' paths are in it."""
    table = format_table(result)
    if markdown_path:
        Path(markdown_path).write_text(table + "\n")
    if plot_dir:
        result["plots"] = write_plots(result, plot_dir)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
    return table
