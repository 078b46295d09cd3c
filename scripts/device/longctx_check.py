#!/usr/bin/env python3
"""GPU check of long-context quality (issue "Converted models keep the original's long-context
ability"): the default model and its MLA conversions at 50 / 75 / 87.5% KV saving,
training-free and (with --heal) healed, on every quality protocol:

  wikitext2-smollm2-v1   512-token ppl
  longctx-smollm2-v1     long-window ppl (5 x 4096) and passkey-v1 at 1024 / 4096 / 7680 tokens
  ood-smollm2-v1         ppl on fiction (alice29) and expository prose (lcet10), text that is not wikitext

Run on the GPU machine from the repository root, with the out-of-domain texts carried along
(``python3 scripts/fetch_ood_text.py`` on a machine with network writes them to data/ood/,
which git ignores: pass ``carry=["data/ood"]``):

    PYTHONUNBUFFERED=1 python3 scripts/device/longctx_check.py --out "$OUT/longctx"
    PYTHONUNBUFFERED=1 python3 scripts/device/longctx_check.py --out "$OUT/longctx" \\
        --heal "--tokens 12M --train all --lr 3e-4 --batch-size 64 --compile"

Each step (convert, heal, evaluate) runs as the user would run it (``mlakit convert`` and
``mlakit heal`` as subprocesses, the evaluation through ``mlakit.protocols``) and is timed
in GPU minutes; results go to OUT/longctx.json after each step, so the same command run
again skips what is done (stop early with --max-minutes). OUT/longctx.md holds the table.
Evaluation is float32 (as the H200 reference readings of PROTOCOL.md).

``--smoke`` runs the same code on the CPU with a tiny random byte-level model and the
protocols shrunk to its 512 positions (< 2 minutes; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from _steps import Steps, free_memory, log  # noqa: E402

SAVINGS = (0.5, 0.75, 0.875)


def shrink_protocols_for_smoke() -> None:
    """The protocols at a tiny model's reach: 256-token long windows, 2 passkey trials at 300
    tokens (a byte tokenizer's filler sentence is 66 tokens: a wider length tolerance)."""
    from mlakit import evaluate, passkey

    evaluate.LONG_WINDOW_LEN = 256
    passkey.LENGTHS, passkey.TRIALS, passkey.LENGTH_TOLERANCE = (300,), 2, 40


class Check(Steps):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "longctx.json")
        self.source = args.source or (str(self.smoke_model()) if args.smoke else "default")
        self._tokenizer = None

    def time_left(self) -> bool:
        return self.minutes_left() > 0

    def row(self, name: str) -> dict:
        return self.results.setdefault("rows", {}).setdefault(name, {})

    def mlakit(self, *argv: str) -> float:
        """Run one ``mlakit`` command as a user would; its wall minutes."""
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "mlakit", *argv]
        log("  $ " + " ".join(shlex.quote(a) for a in cmd[2:]))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return (time.perf_counter() - start) / 60

    def evaluate(self, name: str, path: str) -> None:
        """Every protocol on one checkpoint (float32), its GPU minutes, into the row."""
        from mlakit.loading import load
        from mlakit.evaluate import protocol_name
        from mlakit.protocols import evaluate_protocols, format_results, summary_row

        row = self.row(name)
        if "eval" in row:
            return
        start = time.perf_counter()
        loaded = load(path, dtype=torch.float32, device=self.device)
        self._tokenizer = self._tokenizer or loaded.tokenizer
        loaded.tokenizer = self._tokenizer  # every checkpoint carries the original's tokenizer: tokenise once
        self.results["family_tag"] = protocol_name("smollm2", loaded.model.config)
        results = {}
        for choice in self.args.protocols.split(","):
            results.update(evaluate_protocols(loaded, choice, progress=False))
        _sync()
        for line in format_results(results):
            log("  " + line)
        per_layer, _, saving = _kv(loaded.model.config)
        row.update(model=path, kv_values_per_token_layer=per_layer, kv_saving=saving, **summary_row(results),
                   eval={name: r.to_dict() for name, r in results.items()},
                   eval_minutes=(time.perf_counter() - start) / 60)
        del loaded
        free_memory()
        self.save()

    def convert(self, saving: float) -> Path:
        path = self.out / f"mla-{saving:g}"
        row = self.row(f"MLA {saving:g} training-free")
        if not (path / "mlakit.json").exists():  # an mlakit checkpoint, written whole
            smoke = ["--calib-tokens", "2048"] if self.args.smoke else []
            row["convert_minutes"] = self.mlakit("convert", self.source, "-o", str(path), "--kv-saving", f"{saving:g}",
                                                 "--device", self.device, "--overwrite", *smoke)
            self.save()
        return path

    def heal(self, saving: float, converted: Path) -> Path:
        path = self.out / f"healed-{saving:g}"
        row = self.row(f"MLA {saving:g} healed")
        if not (path / "mlakit.json").exists():  # an mlakit checkpoint, written whole
            extra = shlex.split(self.args.heal)
            if self.args.smoke:
                extra += ["--tokens", "4096", "--batch-size", "2", "--seq-len", "128", "--teacher-tokens", "2048",
                          "--gen-batch", "8"]
            row["heal_minutes"] = self.mlakit("heal", str(converted), "--teacher", self.source, "-o", str(path),
                                              "--device", self.device, "--no-progress", "--overwrite", *extra)
            row["heal_args"] = self.args.heal
            self.save()
        return path


def _kv(config) -> tuple[float, int, float]:
    from mlakit.evaluate import kv_figures

    return kv_figures(config)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


COLUMNS = (("ppl_512", "wikitext2 ppl (512)", "{:.2f}"), ("ppl_long", "long-window ppl", "{:.2f}"),
           ("passkey_1024", "passkey 1024", "{:.0%}"), ("passkey_4096", "passkey 4096", "{:.0%}"),
           ("passkey_7680", "passkey 7680", "{:.0%}"), ("ppl_ood_fiction", "ood fiction ppl", "{:.2f}"),
           ("ppl_ood_expository", "ood expository ppl", "{:.2f}"))


def table(results: dict) -> str:
    """One Markdown table: the original's figures beside every conversion's."""
    rows = results.get("rows", {})
    keys = [k for k, _, _ in COLUMNS if any(k in r for r in rows.values())]
    extra = sorted({k for r in rows.values() for k in r if k.startswith("passkey_") and k not in keys})
    head = (["model", "KV saving", "values/token/layer"] + [t for k, t, _ in COLUMNS if k in keys]
            + [f"passkey {k.split('_')[1]}" for k in extra] + ["GPU min (convert / heal / eval)"])
    tag = results.get("family_tag", "smollm2")
    lines = [f"Protocols: wikitext2-{tag}-v1 (512-token ppl), longctx-{tag}-v1 (long-window ppl, "
             f"passkey-v1), ood-{tag}-v1 (fiction: alice29, expository: lcet10); float32; "
             f"source: {results.get('source', 'default')}; device: {results.get('device', '?')}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    formats = {k: f for k, _, f in COLUMNS} | {k: "{:.0%}" for k in extra}
    for name, r in rows.items():
        if "eval" not in r:
            continue
        cells = [name, f"{100 * r['kv_saving']:.1f}%", f"{r['kv_values_per_token_layer']:g}"]
        cells += [formats[k].format(r[k]) if r.get(k) is not None else "" for k in keys + extra]
        minutes = [r.get("convert_minutes"), r.get("heal_minutes"), r.get("eval_minutes")]
        cells.append(" / ".join("-" if m is None else f"{m:.1f}" for m in minutes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results and checkpoints (reused when run again)")
    parser.add_argument("--savings", default=",".join(f"{s:g}" for s in SAVINGS),
                        help="comma-separated KV savings (default 0.5,0.75,0.875)")
    parser.add_argument("--heal", default=None, metavar="ARGS",
                        help="also heal each conversion: these `mlakit heal` options, quoted as one string "
                             "(e.g. \"--tokens 12M --train all --compile\"); '' heals with the defaults")
    parser.add_argument("--max-minutes", type=float, default=60.0,
                        help="start no new step after this many minutes (run again to continue)")
    parser.add_argument("--source", default=None,
                        help="the original model (default: the default model; e.g. a Gemma 3 GGUF, whose protocols "
                             "are the *-gemma3-270m-v1 ones of docs/protocols.md)")
    parser.add_argument("--protocols", default="all",
                        help="comma-separated `mlakit eval --protocol` groups (wikitext2, longctx, ood, all)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU (code path only)")
    args = parser.parse_args(argv)
    if args.smoke:
        shrink_protocols_for_smoke()
    check = Check(args)
    check.results["device"] = torch.cuda.get_device_name() if check.device == "cuda" else "cpu (smoke)"
    check.results["source"] = check.source
    savings = [float(s) for s in args.savings.split(",") if s.strip()]
    log(f"original: {check.source}")
    check.evaluate("original", check.source)
    for saving in savings:
        if not check.time_left():
            break
        log(f"MLA {saving:g} training-free")
        converted = check.convert(saving)
        check.evaluate(f"MLA {saving:g} training-free", str(converted))
        if args.heal is not None and check.time_left():
            log(f"MLA {saving:g} healed")
            check.evaluate(f"MLA {saving:g} healed", str(check.heal(saving, converted)))
    report = table(check.results)
    (check.out / "longctx.md").write_text(report + "\n")
    log("")
    log(report)
    names = [f"MLA {s:g} training-free" for s in savings] + ([f"MLA {s:g} healed" for s in savings]
                                                             if args.heal is not None else [])
    done = all("eval" in check.results["rows"].get(n, {}) for n in ["original", *names])
    log("done" if done else "not done: run the same command again to continue")


if __name__ == "__main__":
    main()
