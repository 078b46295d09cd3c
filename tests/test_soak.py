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
