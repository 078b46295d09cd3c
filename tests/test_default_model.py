"""The real default model (PROTOCOL.md): mlakit against transformers on the same GGUF."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mlakit.loading import default_model_path, load, no_hub_kernels  # noqa: E402

PROMPT = "The capital of France is"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_default(device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, **no_hub_kernels()).eval()
    return model.to(device), tokenizer


@pytest.fixture(scope="module")
def mlakit_default(device):
    return load("default", device=device)


def test_logits_match_transformers(hf_default, mlakit_default, rel_err):
    hf_model, tokenizer = hf_default
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 8).input_ids],
                       device=hf_model.device)
    with torch.no_grad():
        assert rel_err(mlakit_default.model(ids), hf_model(ids).logits) <= 1e-5


def test_cli_greedy_equals_transformers_generate(hf_default, mlakit_default):
    hf_model, tokenizer = hf_default
    ids = tokenizer(PROMPT, return_tensors="pt").to(hf_model.device)
    expected = hf_model.generate(**ids, max_new_tokens=32, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()
    # the real command line, as a user runs it (the converted-model cache is shared through the env)
    result = subprocess.run(
        [sys.executable, "-m", "mlakit", "generate", "default", "--prompt", PROMPT, "--max-new-tokens", "32",
         "--greedy", "--device", str(hf_model.device.type), "--dtype", "float32", "--json"],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["prompt_ids"] == ids.input_ids[0].tolist()
    print(f"greedy on {hf_model.device.type}: {len(expected)} tokens, mlakit == transformers: "
          f"{out['output_ids'] == expected}")
    assert out["output_ids"] == expected
    assert out["text"].startswith(" Paris")


def test_info_reports_protocol_shape(mlakit_default):
    config = mlakit_default.model.config
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.head_dim) == (30, 576, 9, 3, 64)
    assert config.kv_values_per_token(0) == 384
    assert config.tie_embeddings and config.rope_theta == 100000.0
