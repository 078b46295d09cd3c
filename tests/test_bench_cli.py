"""`mlakit bench attention` and `mlakit bench e2e` keep their command lines and their
output's JSON keys: both are held to a record taken from the code before bench/e2e.py
was split into modules (tests/data/bench_cli.json)."""

import argparse
import json
from pathlib import Path

import pytest

from mlakit.cli import build_parser, main

RECORD = json.loads((Path(__file__).parent / "data" / "bench_cli.json").read_text())
RATIO_KEYS = ("vs_original", "vs_hf_dynamic")  # present where the rates they divide were measured

pytestmark = pytest.mark.usefixtures("one_thread")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def describe(parser: argparse.ArgumentParser) -> dict:
    """Everything ``--help`` prints, as data: prog, description, and per argument its flags,
    metavar, help, default, choices, type and action (the sub-commands with their help)."""
    out = dict(prog=parser.prog, description=parser.description, arguments=[])
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if isinstance(a, argparse._SubParsersAction):
            out["arguments"].append(dict(dest=a.dest, metavar=a.metavar,
                                         choices={k: a._choices_actions[i].help for i, k in enumerate(a.choices)}))
            continue
        default = list(map(list, a.default)) if isinstance(a.default, (list, tuple)) else a.default
        out["arguments"].append(dict(flags=a.option_strings, dest=a.dest, metavar=a.metavar, nargs=a.nargs,
                                     default=default, choices=list(a.choices) if a.choices else None, help=a.help,
                                     type=a.type.__name__ if a.type in (int, float, str) else a.type and "function",
                                     action=type(a).__name__))
    return out


@pytest.mark.parametrize("name", ["bench", "attention", "e2e"])
def test_bench_parsers_match_the_record(name):
    bench = _subparser(build_parser(), "bench")
    parser = bench if name == "bench" else _subparser(bench, name)
    assert json.loads(json.dumps(describe(parser))) == RECORD[name]


@pytest.mark.parametrize("name", ["attention", "e2e"])
def test_bench_help_prints_every_flag(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mlakit bench {name}")
    assert " ".join(out.split()).count(RECORD[name]["description"][:60]) == 1
    for argument in RECORD[name]["arguments"]:
        for flag in argument.get("flags", []):
            assert flag in out


def test_e2e_cpu_smoke_run_keeps_its_json_keys(tmp_path):
    path = tmp_path / "r.json"
    code = main(["bench", "e2e", "--preset", "tiny", "--device", "cpu", "--grid", "1x16", "--steps", "1",
                 "--warmup", "1", "--variants", "original,mla", "--max-batch-context", "32",
                 "--memory-budget-gib", "0.001", "--headroom-gib", "0", "--prefill-tokens", "16", "--no-progress",
                 "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    keys = RECORD["smoke_keys"]
    assert list(result) == keys["result"]
    assert list(result["options"]) == keys["options"]
    assert all(list(v) == keys["variant"] for v in result["variants"])
    assert result["max_batch"] and all(list(m) == keys["max_batch"] for m in result["max_batch"])
    assert {r["phase"] for r in result["rows"]} == set(keys["rows"])
    hf_rate = {(r["batch"], r["context"]): r["tokens_per_s"] for r in result["rows"] if r["phase"] == "hf-dynamic"}
    for row in result["rows"]:
        # transformers' rate is a difference of two timings and can come out as no rate on a busy box:
        # the ratios divided by it are then absent, the other keys never are
        recorded = keys["rows"][row["phase"]]
        assert [k for k in row if k not in RATIO_KEYS] == [k for k in recorded if k not in RATIO_KEYS]
        assert set(row) & set(RATIO_KEYS) <= set(recorded)
        if row["phase"] == "decode" and row["variant"].endswith("(original)"):
            assert "vs_original" in row
            assert ("vs_hf_dynamic" in row) == (hf_rate[(row["batch"], row["context"])] is not None)
    summary = set(result["summary"]) - {"original_vs_transformers"}
    assert summary == set(keys["summary"]) - {"original_vs_transformers"}
