#!/usr/bin/env python3
"""GPU check of healing (issue 7): training-free vs healed perplexity of the default model.

Run on the GPU machine from the repository root (each command stops before
--max-minutes, 8 by default, and leaves everything in --out, so the same command run
again continues where the last one stopped; it prints "done" when nothing is left):

    PYTHONUNBUFFERED=1 python3 scripts/device/heal_check.py --out out/heal            # everything
    PYTHONUNBUFFERED=1 python3 scripts/device/heal_check.py --out out/heal --phase heal --savings 0.75

Phases, in order (``--phase all`` runs those not done yet):
  convert      convert the default model at each KV saving on the GPU -> OUT/mla-S/
  eval-free    wikitext2-smollm2-v1 of the original and of each converted model (float32)
  data         the teacher's own text (sampled continuations; cached in OUT/cache)
  heal         distil each converted model toward the original -> OUT/healed-S/ (resumable)
  eval-healed  the protocol on each healed model
  elastic      heal at 0.75 with elastic ranks -> OUT/elastic-0.75/, evaluated at the runtime
               ranks of the savings 0.75 .. 0.875
  report       OUT/heal.md (the table, also printed), OUT/heal.json, OUT/heal_ppl.png,
               OUT/heal_elastic.png (and each run's heal_loss.png inside its checkpoint)

``--smoke`` runs the same code on a tiny random byte-level model on the CPU (< 1 minute;
its perplexities use 8 of the 40 windows and mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PHASES = ("convert", "eval-free", "data", "heal", "eval-healed", "elastic", "report")
ELASTIC_SAVING = 0.75
ELASTIC_GRID = (0.75, 0.8, 0.85, 0.875)


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Run:
    """Settings, paths and the results file of one --out directory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + 60 * args.max_minutes
        self.device = "cpu" if args.smoke else "cuda"
        if not args.smoke and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU: run with --smoke on a CPU")
        self.results_path = self.out / "heal.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        if args.smoke:
            self.teacher = str(self._smoke_teacher())
            self.heal_args = dict(tokens=args.tokens or 4096, batch_size=2, seq_len=128, checkpoint_every=8,
                                  teacher_tokens=2048, gen_batch=8, val_windows=2)
        else:
            self.teacher = "default"
            self.heal_args = dict(tokens=args.tokens or 12_000_000, batch_size=args.batch_size, seq_len=512,
                                  checkpoint_every=100, teacher_tokens=args.teacher_tokens, gen_batch=256,
                                  val_windows=16)

    def _smoke_teacher(self) -> Path:
        path = self.out / "llama-kv2"
        if not (path / "config.json").exists():
            sys.path.insert(0, str(REPO / "tests"))
            from convert.helpers import save_tiny_with_tokenizer

            save_tiny_with_tokenizer(self.out, "llama", 2, max_position_embeddings=512)
        return path

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.results_path)

    def minutes_left(self) -> float:
        return (self.deadline - time.monotonic()) / 60

    def path(self, kind: str, saving: float) -> Path:
        return self.out / f"{kind}-{saving:g}"

    def row(self, saving: float) -> dict:
        return self.results.setdefault("rows", {}).setdefault(f"{saving:g}", {"kv_saving": saving})

    def options(self, elastic: list[int] | None = None):
        from mlakit.heal import HealOptions, TeacherDataOptions

        a = self.heal_args
        options = HealOptions(tokens=a["tokens"], batch_size=a["batch_size"], seq_len=a["seq_len"],
                              checkpoint_every=a["checkpoint_every"], val_windows=a["val_windows"],
                              layerwise_steps=self.args.layerwise_init, elastic_ranks=elastic,
                              train=self.args.train, lr=self.args.lr,
                              max_minutes=max(0.0, self.minutes_left() - 1.0))  # a minute for saving + eval
        data = TeacherDataOptions(tokens=a["teacher_tokens"] or min(a["tokens"], TeacherDataOptions.tokens),
                                  seq_len=a["seq_len"], batch=a["gen_batch"])
        return options, data


_TOKENIZER = []  # one tokenizer for every evaluation: the protocol text is tokenised once per tokenizer


def load_eval(path, device: str, rank: int | None = None):
    from mlakit.loading import load

    loaded = load(path, dtype=torch.float32, device=device)
    if not _TOKENIZER:
        _TOKENIZER.append(loaded.tokenizer)
    loaded.tokenizer = _TOKENIZER[0]  # all checkpoints carry the teacher's tokenizer
    if rank is not None:
        from mlakit.heal import truncate_latent_rank

        loaded.model = truncate_latent_rank(loaded.model, rank)
    return loaded


def evaluate(run: Run, path, rank: int | None = None) -> dict:
    from mlakit.evaluate import evaluate as protocol_eval

    result = protocol_eval(load_eval(path, run.device, rank), progress=False).to_dict()
    log(f"  ppl {result['ppl']:.2f} ({result['kv_values_per_token_layer']:g} values/token/layer, "
        f"saving {100 * result['kv_saving']:.1f}%) {path}{'' if rank is None else f' @ rank {rank}'}")
    return result


# ------------------------------------------------------------------ phases
def phase_convert(run: Run) -> bool:
    from mlakit.convert import ConvertOptions
    from mlakit.convert.api import convert_checkpoint

    for saving in run.args.savings:
        path = run.path("mla", saving)
        if path.exists():
            continue
        log(f"convert at {saving:g} ...")
        options = ConvertOptions(kv_saving=saving, progress=False)
        if run.args.smoke:
            options.calib_tokens = 2048
        summary = convert_checkpoint(run.teacher, str(path), options, device=run.device)
        run.row(saving)["convert"] = {"ranks": summary.ranks, "rope_dim": summary.rope_dim,
                                      "seconds": summary.seconds.get("total")}
        run.save()
    return True


def phase_eval_free(run: Run) -> bool:
    if "original" not in run.results:
        log("eval original ...")
        run.results["original"] = evaluate(run, run.teacher)
        run.save()
    return _eval_checkpoints(run, "mla", "free")


def _eval_checkpoints(run: Run, kind: str, key: str) -> bool:
    """The protocol on each saving's ``kind`` checkpoint that exists, stored as ``row[key]``."""
    for saving in run.args.savings:
        row = run.row(saving)
        if key not in row and run.path(kind, saving).exists():
            row[key] = evaluate(run, run.path(kind, saving))
            run.save()
    return True


def phase_data(run: Run) -> bool:
    from mlakit.heal.data import teacher_data
    from mlakit.loading import load

    _, data = run.options()
    start = time.perf_counter()
    teacher = load(run.teacher, dtype=torch.bfloat16 if run.device == "cuda" else torch.float32, device=run.device)
    windows = teacher_data(teacher.model, teacher.tokenizer, data, progress=True, log=log)
    seconds = time.perf_counter() - start
    run.results.setdefault("data", {"tokens": windows.numel(), "seconds": seconds, "options": data.__dict__})
    run.save()
    log(f"teacher text: {windows.numel():,} tokens ({seconds:.0f}s incl. load)")
    return True


def _heal_one(run: Run, src: Path, dst: Path, elastic: list[int] | None = None) -> dict | None:
    """Heal ``src`` into ``dst``; None when the time ran out first (the state is kept)."""
    from mlakit.heal.api import heal

    if dst.exists():
        return json.loads((dst / "heal_log.json").read_text())
    if run.minutes_left() < 1.5:
        return None
    options, data = run.options(elastic)
    log(f"heal {src.name} -> {dst.name} ({options.tokens:,} tokens, train={options.train}"
        f"{'' if elastic is None else f', elastic ranks {elastic}'}) ...")
    summary = heal(str(src), run.teacher, dst, options, data, device=run.device, resume=True, log=log)
    if not summary["finished"]:
        return None
    return summary


def _heal_row(summary: dict) -> dict:
    return {k: summary[k] for k in ("tokens", "seconds", "kl_before", "kl_after", "tokens_per_second", "device")}


def phase_heal(run: Run) -> bool:
    done = True
    for saving in run.args.savings:
        summary = _heal_one(run, run.path("mla", saving), run.path("healed", saving))
        if summary is None:
            done = False
            break
        run.row(saving)["heal"] = _heal_row(summary)
        run.save()
    return done


def phase_eval_healed(run: Run) -> bool:
    return _eval_checkpoints(run, "healed", "healed")


def elastic_ranks(run: Run) -> list[tuple[float, int]]:
    """(saving, runtime rank) of the grid for the 0.75 checkpoint: budget minus its RoPE key
    (savings whose budget the RoPE key alone fills cannot be reached by truncation: left out)."""
    from mlakit.config import ModelConfig

    config = ModelConfig.load(run.path("mla", ELASTIC_SAVING))
    full = 2 * config.n_kv_heads * config.head_dim  # the source's values per token per layer (its GQA cache)
    rope, top = config.qk_rope_head_dim, max(config.kv_lora_ranks())
    grid = [(s, min(top, int(round((1 - s) * full)) - rope)) for s in ELASTIC_GRID]
    return [(s, r) for s, r in grid if r >= 1]


def phase_elastic(run: Run) -> bool:
    src = run.path("mla", ELASTIC_SAVING)
    if not src.exists():
        log(f"elastic: {src} missing (run the convert phase with {ELASTIC_SAVING} among --savings)")
        return True
    grid = elastic_ranks(run)
    summary = _heal_one(run, src, run.path("elastic", ELASTIC_SAVING), sorted({r for _, r in grid}))
    if summary is None:
        return False
    elastic = run.results.setdefault("elastic", {"heal": _heal_row(summary), "points": {}})
    for saving, rank in grid:
        key = f"{saving:g}"
        if key in elastic["points"]:
            continue
        point = {"kv_saving": saving, "rank": rank}
        point["elastic"] = evaluate(run, run.path("elastic", ELASTIC_SAVING), rank)
        if run.path("healed", ELASTIC_SAVING).exists():  # the same truncation of the plainly healed model
            point["healed"] = evaluate(run, run.path("healed", ELASTIC_SAVING), rank)
        point["free"] = evaluate(run, src, rank)
        elastic["points"][key] = point
        run.save()
    return True


def _ppl(entry: dict | None) -> str:
    return "—" if not entry else f"{entry['ppl']:.2f}"


def phase_report(run: Run) -> bool:
    from mlakit.evaluate import PROTOCOL

    r = run.results
    gpu = torch.cuda.get_device_name() if run.device == "cuda" else "cpu (smoke)"
    r["protocol"], r["gpu"] = PROTOCOL, gpu
    lines = [f"Protocol {PROTOCOL}; GPU {gpu}; original ppl {_ppl(r.get('original'))} "
             f"({r.get('original', {}).get('kv_values_per_token_layer', '?')} values/token/layer)", "",
             "| KV saving | values/token/layer | ppl training-free | ppl healed | heal tokens | heal time | "
             "tokens/s | KL before → after |", "|---|---|---|---|---|---|---|---|"]
    for key, row in sorted(r.get("rows", {}).items(), key=lambda kv: float(kv[0])):
        heal, free = row.get("heal"), row.get("free") or row.get("healed")
        values = free["kv_values_per_token_layer"] if free else "?"
        time_text = f"{heal['seconds']['train']:.0f}s (+{heal['seconds']['data']:.0f}s data)" if heal else "—"
        lines.append(f"| {100 * float(key):.1f}% | {values:g} | {_ppl(row.get('free'))} | {_ppl(row.get('healed'))} | "
                     f"{heal['tokens']:,} | {time_text} | {heal['tokens_per_second'] or 0:,.0f} | "
                     f"{heal['kl_before']:.4f} → {heal['kl_after']:.4f} |" if heal else
                     f"| {100 * float(key):.1f}% | {values} | {_ppl(row.get('free'))} | — | — | — | — | — |")
    elastic = r.get("elastic")
    if elastic:
        lines += ["", f"Elastic: one checkpoint healed at {100 * ELASTIC_SAVING:g}% with elastic ranks "
                      f"({elastic['heal']['tokens']:,} tokens, {elastic['heal']['seconds']['train']:.0f}s), "
                      "evaluated with its latent truncated at run time", "",
                  "| KV saving | runtime rank | values/token/layer | ppl elastic | ppl healed (plain), truncated | "
                  "ppl training-free, truncated |", "|---|---|---|---|---|---|"]
        for key, p in sorted(elastic["points"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {100 * p['kv_saving']:.1f}% | {p['rank']} | "
                         f"{p['elastic']['kv_values_per_token_layer']:g} | {_ppl(p['elastic'])} | "
                         f"{_ppl(p.get('healed'))} | {_ppl(p.get('free'))} |")
    table = "\n".join(lines)
    (run.out / "heal.md").write_text(table + "\n")
    run.save()
    _plots(run)
    log("")
    log(table)
    return True


def _plots(run: Run) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("(matplotlib missing: no plots)")
        return
    r = run.results
    rows = sorted(r.get("rows", {}).items(), key=lambda kv: float(kv[0]))
    if rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, color in (("free", "tab:red"), ("healed", "tab:green")):
            pts = [(100 * float(k), row[name]["ppl"]) for k, row in rows if name in row]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label="training-free" if name == "free" else "healed")
        if "original" in r:
            ax.axhline(r["original"]["ppl"], color="gray", linestyle="--", label="original")
        ax.set(xlabel="KV-cache saving (%)", ylabel="ppl (wikitext2-smollm2-v1)", yscale="log",
               title=f"healing ({r.get('gpu', '')})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run.out / "heal_ppl.png", dpi=120)
        plt.close(fig)
    elastic = r.get("elastic")
    if elastic and elastic["points"]:
        points = sorted(elastic["points"].values(), key=lambda p: p["kv_saving"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label, color in (("elastic", "healed with elastic ranks", "tab:blue"),
                                   ("healed", "healed at 0.75 only", "tab:green"),
                                   ("free", "training-free at 0.75", "tab:red")):
            pts = [(100 * p["kv_saving"], p[name]["ppl"]) for p in points if name in p]
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=label)
        ax.set(xlabel="KV-cache saving at run time (%)", ylabel="ppl", yscale="log",
               title="one checkpoint, latent truncated at run time")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run.out / "heal_elastic.png", dpi=120)
        plt.close(fig)


RUNNERS = {"convert": phase_convert, "eval-free": phase_eval_free, "data": phase_data, "heal": phase_heal,
           "eval-healed": phase_eval_healed, "elastic": phase_elastic, "report": phase_report}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results and checkpoints (kept between commands)")
    parser.add_argument("--phase", choices=("all", *PHASES), default="all")
    parser.add_argument("--savings", default="0.5,0.75,0.875", help="comma-separated KV savings")
    parser.add_argument("--tokens", type=float, default=None,
                        help="training tokens per heal run (default 12e6; smoke 4096)")
    parser.add_argument("--teacher-tokens", type=float, default=None,
                        help="teacher text to generate (default min(--tokens, 4e6)); shared by all runs")
    parser.add_argument("--batch-size", type=int, default=16, help="windows of 512 tokens per step (default 16)")
    parser.add_argument("--train", choices=("mla", "attention", "all"), default="attention")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: mlakit heal's)")
    parser.add_argument("--layerwise-init", type=int, default=0, metavar="STEPS",
                        help="layer-wise initialisation steps per layer before distillation (default off)")
    parser.add_argument("--max-minutes", type=float, default=8.0,
                        help="stop (resumably) after this long; rerun the command to continue (default 8)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU, same code path")
    args = parser.parse_args(argv)
    args.savings = [float(s) for s in args.savings.split(",") if s.strip()]
    args.tokens = int(args.tokens) if args.tokens else None
    args.teacher_tokens = int(args.teacher_tokens) if args.teacher_tokens else None
    os.environ.setdefault("MLAKIT_CACHE_DIR", str(Path(args.out).resolve() / "cache"))  # survives with --out
    if args.smoke:
        import mlakit.evaluate

        torch.set_num_threads(1)
        mlakit.evaluate.EVAL_WINDOWS = 8  # smoke only: 8 of the protocol's 40 windows, to stay under a minute
        if args.savings == [0.5, 0.75, 0.875]:
            args.savings = [0.75, 0.875]
    run = Run(args)
    if not args.smoke:
        log(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    phases = PHASES if args.phase == "all" else (args.phase,)
    for name in phases:
        if name != "report" and run.minutes_left() < 0.5:
            log(f"out of time before {name}: run the same command again to continue")
            return 3
        start = time.perf_counter()
        log(f"== {name}")
        if not RUNNERS[name](run):
            log(f"out of time in {name} (state kept in {run.out}): run the same command again to continue")
            phase_report(run)
            return 3
        log(f"== {name} done in {time.perf_counter() - start:.0f}s")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
