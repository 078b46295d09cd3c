"""A short soak (200 requests) through one engine: outputs equal one-at-a-time runs, no
memory growth. scripts/soak.py runs the long one (2,000 per model) and prints a table."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_soak_one_engine(attention):
    soak = _soak_module()
    result = soak.soak(soak.tiny_model(attention), requests=100, seed=1)
    assert result["mismatches"] == 0
    assert result["tokens"] > 100
    assert result["growth_mb"] < soak.GROWTH_ALLOWANCE_MB, result["samples"]


@pytest.mark.usefixtures("one_thread")
def test_soak_references_from_worker_processes(monkeypatch):
    """The GPU soak's layout (the one-at-a-time references computed in other processes,
    each loading the model itself) gives the same verdict on the CPU."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # spawned workers import the script by name
    import soak

    result = soak.soak(soak.tiny_model("mla"), requests=24, seed=2, workers=2, model_name="mla")
    assert result["mismatches"] == 0 and result["requests"] == 24 and result["tokens"] > 24


@pytest.mark.usefixtures("one_thread")
def test_soak_checks_every_nth_request_and_catches_a_difference(monkeypatch):
    """``check_every``: all requests run through the engine, every Nth is compared; a
    reference that differs (here made to, for request 10) is counted."""
    soak = _soak_module()
    model = soak.tiny_model("gqa")
    run_alone, calls = soak.alone, []

    def alone(model, prompt, params):
        calls.append(prompt)
        out = run_alone(model, prompt, params)
        return out + [0] if len(calls) == 3 else out  # the third checked request: 0, 5, [10]

    monkeypatch.setattr(soak, "alone", alone)
    result = soak.soak(model, requests=20, seed=3, check_every=5)
    assert (result["requests"], result["checked"], result["mismatches"]) == (20, 4, 1)
    assert calls == [p for p, _ in soak.requests_for(model, 20, 3)[::5]]
