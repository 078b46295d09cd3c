"""The fault corpus: bad inputs and faults as a hostile or careless user makes them.

Every case asserts exit code 2, ONE line on stderr (``mlakit: error: ...`` naming the
culprit), no traceback, no output left behind (nor temporaries), and, for the security
cases, that no code from the data ran. Tiny models built here, CPU only."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from mlakit import ModelConfig, Transformer  # noqa: E402
from mlakit.cli import main  # noqa: E402
from mlakit.errors import MlakitError  # noqa: E402
from mlakit.loading import load, save_checkpoint  # noqa: E402
from mlakit.testing.models import byte_tokenizer, save_tiny_with_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MARKER = "code-ran.txt"  # what planted code would create


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny HF Llama (bytes tokenizer) and a tiny MLA mlakit checkpoint (latent rank 16)."""
    root = tmp_path_factory.mktemp("fault-models")
    _, hf = save_tiny_with_tokenizer(root, "llama", 2)
    config = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                         intermediate_size=48, max_seq_len=128, attention="mla", kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    mla = save_checkpoint(Transformer(config).init_random(seed=0), root / "mla", byte_tokenizer())
    return {"hf": hf, "mla": mla}


def copy_model(src: Path, tmp: Path, name: str = "model") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, change) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(change(config)))


def gguf_bytes(n_tensors: int = 0, n_kv: int = 0, body: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


def tiny_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", torch.randn(16, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Evil:
    """Unpickling this runs code: it is what a planted .pt / state file would hold."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


# ------------------------------------------------------------------ the cases
# each builds its inputs in ``tmp`` and returns (argv, part of the message)
def _weights(content):
    def case(m, tmp):
        path = copy_model(m["hf"], tmp)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(content(data))
        return ["info", str(path)], "model.safetensors is not a valid safetensors file"
    return case


def _config(change, message):
    def case(m, tmp):
        path = copy_model(m["hf"], tmp)
        edit_config(path, change)
        return ["info", str(path)], message
    return case


def _raw_config(content: bytes, message: str):
    def case(m, tmp):
        path = copy_model(m["hf"], tmp)
        (path / "config.json").write_bytes(content)
        return ["info", str(path)], message
    return case


def _gguf(content, message):
    def case(m, tmp):
        path = tmp / "model.gguf"
        path.write_bytes(content(tmp))
        return ["info", str(path)], message
    return case


def _truncated_gguf(tmp):
    data = tiny_gguf(tmp / "whole.gguf").read_bytes()
    return data[: len(data) - 300]


def _generate(*extra, model="hf"):
    def case(m, tmp):
        return ["generate", str(m[model]), "--device", "cpu", *extra], None
    return case


def _convert(*extra, message):
    def case(m, tmp):
        return ["convert", str(m["hf"]), "-o", str(tmp / "out"), *extra], message
    return case


def _output_at(where: str, message: str, command: str = "convert"):
    def case(m, tmp):
        if where == "under-file":
            (tmp / "afile").write_text("x")
            out = tmp / "afile" / "out"
        elif where == "is-file":
            (tmp / "out").write_text("precious")
            out = tmp / "out"
        else:
            out = Path(where) / "mlakit-out"
        argv = {"convert": ["convert", str(m["hf"]), "-o", str(out), "--overwrite"],
                "export": ["export", str(m["mla"]), "--format", "hf-deepseek", "-o", str(out), "--overwrite"],
                "heal": ["heal", str(m["mla"]), "--teacher", str(m["hf"]), "-o", str(out), "--overwrite"]}[command]
        return argv, message
    return case


def _remote_code(file: str):
    def case(m, tmp):
        path = copy_model(m["hf"], tmp)
        (path / "evil.py").write_text(f"open({str(tmp / MARKER)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
                                      "EvilConfig = EvilModel = EvilTokenizer\n")
        target = path / file
        data = json.loads(target.read_text()) if target.exists() else {}
        data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None], "AutoConfig": "evil.EvilConfig"}
        target.write_text(json.dumps(data))
        return ["info", str(path)], f"{file} asks to run Python code"
    return case


def _pickled_bin(m, tmp):
    path = copy_model(m["hf"], tmp)
    (path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil(tmp / MARKER)}, path / "pytorch_model.bin")
    return ["info", str(path)], "pytorch_model.bin holds Python objects beyond tensors"


def _planted_state(m, tmp):
    state = tmp / "out.heal"
    state.mkdir()
    torch.save({"step": Evil(tmp / MARKER)}, state / "state.pt")
    return ["heal", str(m["mla"]), "--teacher", str(m["hf"]), "-o", str(tmp / "out"), "--resume",
            "--device", "cpu"], "state.pt is a pickle from an older mlakit and is not loaded"


def _damaged_state(m, tmp):
    state = tmp / "out.heal"
    state.mkdir()
    (state / "state.safetensors").write_bytes(os.urandom(64))
    return ["heal", str(m["mla"]), "--teacher", str(m["hf"]), "-o", str(tmp / "out"), "--resume",
            "--device", "cpu"], "state.safetensors is not a readable mlakit state file"


def _export(*extra, message, fmt="gguf", existing_dir=False):
    def case(m, tmp):
        if existing_dir:
            (tmp / "out").mkdir()
        return ["export", str(m["mla"]), "--format", fmt, "-o", str(tmp / "out"), *extra], message
    return case


def _export_source(model, message):
    def case(m, tmp):
        return ["export", str(m.get(model, model)), "--format", "gguf", "-o", str(tmp / "out.gguf")], message
    return case


def _tokenizer_gguf(content, message):
    def case(m, tmp):
        path = tmp / "tok.gguf"
        if content is not None:
            path.write_bytes(content)
        return ["export", str(m["mla"]), "--format", "gguf", "-o", str(tmp / "out.gguf"),
                "--tokenizer-gguf", str(path)], message
    return case


def _heal(*extra, message):
    def case(m, tmp):
        return ["heal", str(m["mla"]), "--teacher", str(m["hf"]), "-o", str(tmp / "out"), "--device", "cpu",
                *extra], message
    return case


def _resume_finished(m, tmp):
    (tmp / "out").mkdir()  # a finished heal's output: its state is gone
    return _heal("--resume", message="its heal has finished, nothing is left to resume")(m, tmp)


def _shape_mismatch(m, tmp):
    path = copy_model(m["hf"], tmp)
    edit_config(path, lambda c: {**c, "intermediate_size": 64})
    return ["info", str(path)], "config says"


def _mlakit_config(content: bytes, message: str):
    def case(m, tmp):
        path = copy_model(m["mla"], tmp)
        (path / "mlakit.json").write_bytes(content)
        return ["info", str(path)], message
    return case


def _missing_model(m, tmp):
    return ["info", str(tmp / "nothing")], "does not exist"


def _not_gguf_file(m, tmp):
    (tmp / "weights.bin").write_bytes(b"x")
    return ["info", str(tmp / "weights.bin")], "is a file but not a .gguf file"


def _empty_dir(m, tmp):
    (tmp / "empty").mkdir()
    return ["info", str(tmp / "empty")], "holds neither mlakit.json"


def _existing_out(m, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep").write_text("mine")
    return ["convert", str(m["hf"]), "-o", str(tmp / "out")], "already exists (pass --overwrite"


def _report_file(m, tmp):
    (tmp / "report").write_text("x")
    return ["convert", str(m["hf"]), "--sweep", "0.5", "--report", str(tmp / "report")], "is not a directory"


CASES = {
    # corrupted weights
    "safetensors-truncated": _weights(lambda d: d[: len(d) // 2]),
    "safetensors-random": _weights(lambda d: os.urandom(len(d))),
    "safetensors-empty": _weights(lambda d: b""),
    "safetensors-huge-header": _weights(lambda d: struct.pack("<Q", 2**60) + d[8:]),
    "weights-shape-mismatch": _shape_mismatch,
    # config.json / mlakit.json
    "config-missing-heads": _config(lambda c: {k: v for k, v in c.items() if k != "num_attention_heads"},
                                    "config.json lacks 'num_attention_heads'"),
    "config-json-list": _raw_config(b"[1, 2, 3]", "config.json must hold a JSON object"),
    "config-layers-three": _config(lambda c: {**c, "num_hidden_layers": "three"},
                                   "num_hidden_layers must be a positive integer, got 'three'"),
    "config-layers-negative": _config(lambda c: {**c, "num_hidden_layers": -1},
                                      "num_hidden_layers must be a positive integer"),
    "config-not-json": _raw_config(b"{nope", "config.json is not valid JSON"),
    "config-not-utf8": _raw_config(b"\xff\xfe\x00{", "config.json is not valid JSON"),
    "config-unsupported-arch": _config(lambda c: {**c, "architectures": ["GPTNeoXForCausalLM"]},
                                       "unsupported architecture 'GPTNeoXForCausalLM'"),
    "mlakit-json-garbage": _mlakit_config(b"\x00garbage", "mlakit.json is not valid JSON"),
    "mlakit-json-list": _mlakit_config(b"[]", "mlakit.json"),
    "mlakit-json-missing-key": _mlakit_config(b'{"format_version": 1, "dim": 8}', "missing keys"),
    # GGUF
    "gguf-empty": _gguf(lambda t: b"", "is not a GGUF file"),
    "gguf-random": _gguf(lambda t: os.urandom(4096), "is not a GGUF file"),
    "gguf-absurd-tensor-count": _gguf(lambda t: gguf_bytes(n_tensors=2**60, n_kv=1), "is damaged"),
    "gguf-absurd-kv-count": _gguf(lambda t: gguf_bytes(n_kv=2**40) + b"\x00" * 64, "is damaged"),
    "gguf-absurd-string-length": _gguf(lambda t: gguf_bytes(n_kv=1, body=struct.pack("<Q", 2**62) + b"k" * 100),
                                       "model.gguf is not a readable GGUF model"),
    "gguf-truncated": _gguf(_truncated_gguf, "model.gguf is not a readable GGUF model"),
    # paths
    "model-missing": _missing_model,
    "model-not-gguf-file": _not_gguf_file,
    "model-empty-dir": _empty_dir,
    "output-exists": _existing_out,
    "output-under-proc": _output_at("/proc", "cannot write"),
    "output-under-sys": _output_at("/sys", "cannot write"),
    "output-under-a-file": _output_at("under-file", "is not a directory"),
    "output-is-a-file": _output_at("is-file", "is a file, but the output is a directory"),
    "export-output-is-a-file": _output_at("is-file", "is a file, but the output is a directory", "export"),
    "heal-output-under-proc": _output_at("/proc", "cannot write", "heal"),
    "report-is-a-file": _report_file,
    "tokenizer-gguf-missing": _tokenizer_gguf(None, "--tokenizer-gguf"),
    "tokenizer-gguf-not-gguf": _tokenizer_gguf(b"hello", "tok.gguf is not a GGUF file"),
    "export-gguf-onto-dir": _export("--overwrite", message="is a directory, but the output is a file",
                                    existing_dir=True),
    "export-dtype-for-gguf": _export("--dtype", "float32", message="--dtype is for --format hf-deepseek"),
    "export-not-mla": _export_source("hf", message="export needs an MLA model"),
    "export-not-mla-default": _export_source("default", message="export needs an MLA model; default is not one"),
    # numbers
    "temperature-nan": _generate("--prompt", "hi", "--temperature", "nan"),
    "temperature-negative": _generate("--prompt", "hi", "--temperature", "-1"),
    "top-p-two": _generate("--prompt", "hi", "--top-p", "2"),
    "top-k-zero": _generate("--prompt", "hi", "--top-k", "0"),
    "max-new-tokens-zero": _generate("--prompt", "hi", "--max-new-tokens", "0"),
    "device-foo": _generate("--prompt", "hi", "--device", "foo"),
    "runtime-rank-too-large": _generate("--prompt", "hi", "--runtime-rank", "1000", model="mla"),
    "runtime-rank-zero": _generate("--prompt", "hi", "--runtime-rank", "0", model="mla"),
    "rope-cache-on-gqa": _generate("--prompt", "hi", "--kv-cache-dtype", "int4+rope"),
    "kv-saving-above-one": _convert("--kv-saving", "1.5", message="--kv-saving must be a fraction"),
    "kv-saving-nan": _convert("--kv-saving", "nan", message="--kv-saving must be a finite number"),
    "rope-dim-odd": _convert("--rope-dim", "3", "--kv-lora-rank", "8", message="--rope-dim must be even"),
    "calib-tokens-zero": _convert("--calib-tokens", "0", message="--calib-tokens"),
    "sweep-out-of-range": _convert("--sweep", "0.5,1.5", "--report", "r", message="fractions in (0, 1), got 1.5"),
    "sweep-not-numbers": _convert("--sweep", "a,b", "--report", "r", message="comma-separated savings"),
    "heal-lr-nan": _heal("--lr", "nan", message="--lr must be a finite number"),
    "heal-tokens-zero": _heal("--tokens", "0", message="--tokens"),
    "heal-data-missing": _heal("--data", "/no/such/file.txt", message="--data /no/such/file.txt does not exist"),
    "heal-resume-finished": _resume_finished,
    # text
    "prompt-not-utf8": _generate("--prompt", "caf\udce9"),
    "prompt-file-missing": _generate("--prompt-file", "/no/such/prompt.txt"),
    "prompt-empty": _generate("--prompt", ""),
    "prompt-too-long": _generate("--prompt", "x" * 300, "--max-new-tokens", "4"),
    # security
    "remote-code-tokenizer": _remote_code("tokenizer_config.json"),
    "remote-code-config": _remote_code("config.json"),
    "pickled-pytorch-model-bin": _pickled_bin,
    "planted-heal-state-pickle": _planted_state,
    "damaged-heal-state": _damaged_state,
}

MESSAGES = {  # the generate cases' expected words
    "temperature-nan": "--temperature must be a finite number", "temperature-negative": "--temperature must be >",
    "top-p-two": "--top-p must be <= 1", "top-k-zero": "--top-k must be >= 1",
    "max-new-tokens-zero": "--max-new-tokens must be >= 1", "device-foo": "--device 'foo' is not a device",
    "runtime-rank-too-large": "--runtime-rank 1000 is larger than the latent rank", "runtime-rank-zero":
    "--runtime-rank must be >= 1", "rope-cache-on-gqa": "+rope quantises MLA's shared RoPE key",
    "prompt-not-utf8": "--prompt is not valid UTF-8",
    "prompt-file-missing": "--prompt-file /no/such/prompt.txt does not exist", "prompt-empty": "the prompt is empty",
    "prompt-too-long": "exceed the model's context of 256 tokens",
}


def leftovers(tmp: Path, before: set[str]) -> list[str]:
    return sorted(set(os.listdir(tmp)) - before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault(name, models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = CASES[name](models, tmp_path)
    message = message or MESSAGES[name]
    before = set(os.listdir(tmp_path))
    start = time.perf_counter()
    assert main(argv) == 2
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert err.startswith("mlakit: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err
    assert out == ""  # nothing echoed before the error (a long prompt included)
    assert leftovers(tmp_path, before) == []  # no output, no temporaries, no lock files
    assert not (tmp_path / MARKER).exists()  # no code from the data ran
    if name.startswith(("kv-saving", "rope-dim", "calib", "sweep", "output", "export-output", "export-not", "heal-",
                        "report", "tokenizer-gguf", "device", "temperature", "top-", "max-new", "prompt-not",
                        "prompt-file", "prompt-empty", "model-")):
        assert seconds < 3, f"{name}: rejected after {seconds:.1f}s, not before loading"


@pytest.mark.parametrize("argv, culprit", [
    (["eval", "default", "--kv-cache-dtype", "int3"], "invalid choice: 'int3'"),
    (["convert", "default", "--kv-saving", "abc"], "--kv-saving: invalid float value: 'abc'"),
    (["generate", "default", "--prompt", "hi", "--max-new-tokenz", "4"], "unrecognized arguments: --max-new-tokenz"),
    (["heal", "default"], "the following arguments are required: --teacher, -o/--output"),
    (["bench", "attention", "--grid"], "argument --grid: expected one argument"),
    (["bench", "e2e", "--device", "cpu", "--preset", "tiny", "--grid", "1x-5"], "must be >= 1, got 1x-5"),
    (["bench", "attention", "--grid", "0x8192"], "must be >= 1, got 0x8192"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_arguments_argparse_sees_are_one_line_too(argv, culprit, capsys):
    """What argparse itself rejects reads as every other error: one line naming the argument
    and the command's --help (not the usage block), exit status 2, nothing on stdout."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.startswith("mlakit: error: ") and err.count("\n") == 1 and culprit in err, err
    assert err.rstrip().endswith("--help)") and "usage:" not in err


@pytest.mark.parametrize("argv, help_of", [
    (["generate", "default", "--prompt", "hi", "--max-new-tokenz", "4"], "mlakit generate"),
    (["convert", "default", "-o", "out", "--no-progress"], "mlakit convert"),
    (["bench", "attention", "--bogus"], "mlakit bench attention"),
])
def test_unknown_flag_names_its_commands_help(argv, help_of, capsys):
    """An unknown flag points to the help of the command it was given to (argparse's own
    parse_args names the top-level help, which does not list any command's flags)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"unrecognized arguments: {argv[-1] if argv[-1] != '4' else argv[-2]}" in err, err
    assert err.rstrip().endswith(f"(see {help_of} --help)"), err


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_unreadable_file_says_permission_denied(models, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = copy_model(models["hf"], tmp_path)
    (path / "model.safetensors").chmod(0)
    assert main(["info", str(path)]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_read_only_folder_is_refused_before_loading(models, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main(["convert", str(models["hf"]), "-o", str(tmp_path / "ro" / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_python_api_raises_mlakit_error(models, tmp_path):
    path = copy_model(models["hf"], tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(MlakitError, match="model.safetensors is not a valid safetensors file"):
        load(path)
    (tmp_path / "x.gguf").write_bytes(gguf_bytes(n_tensors=2**50))
    with pytest.raises(MlakitError, match="x.gguf is damaged"):
        load(tmp_path / "x.gguf")


def test_prompt_from_a_file_and_from_stdin(models, tmp_path, capsys, monkeypatch):
    import io

    (tmp_path / "p.txt").write_text("Hello there")
    argv = ["generate", str(models["hf"]), "--greedy", "--max-new-tokens", "3", "--device", "cpu", "--json"]
    assert main([*argv, "--prompt-file", str(tmp_path / "p.txt")]) == 0
    from_file = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Hello there".encode())))
    assert main([*argv, "--prompt-file", "-"]) == 0
    from_stdin = json.loads(capsys.readouterr().out)
    assert main([*argv, "--prompt", "Hello there"]) == 0
    inline = json.loads(capsys.readouterr().out)
    assert from_file == from_stdin == inline and len(inline["output_ids"]) == 3
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    assert main([*argv, "--prompt-file", str(tmp_path / "bad.txt")]) == 2
    assert "bad.txt is not valid UTF-8" in capsys.readouterr().err


# ------------------------------------------------------------------ processes: signals, concurrency
def mlakit_process(*argv: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlakit", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_concurrent_exports_to_one_output(models, tmp_path):
    out = tmp_path / "out"
    argv = ("export", str(models["mla"]), "--format", "hf-deepseek", "-o", str(out))
    procs = [mlakit_process(*argv) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results  # one wins; the other is refused, never both "succeeding"
    err = next(e for c, e in results if c == 2)
    assert ("being written by another mlakit process" in err or "already exists" in err) and "Traceback" not in err
    assert load(out).model.config.is_mla  # the winner's output is whole
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_second_writer_fails_fast_while_first_is_working(models, tmp_path):
    from mlakit.io import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # a first conversion still calibrating
        start = time.perf_counter()
        proc = mlakit_process("convert", str(models["hf"]), "-o", str(out))
        code, err = proc.wait(timeout=120), proc.stderr.read()
        assert time.perf_counter() - start < 60  # import time only: nothing is loaded
    assert code == 2 and err.count("\n") == 1 and "being written by another mlakit process" in err


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGKILL", -9)])
def test_signal_mid_export_leaves_nothing_partial(models, tmp_path, sig, code):
    import signal

    out = tmp_path / "out"
    shutil.copytree(models["mla"], out)  # an old output that must survive
    proc = mlakit_process("export", str(models["mla"]), "--format", "hf-deepseek", "-o", str(out), "--overwrite",
                          env={"MLAKIT_TEST_PAUSE_IN_WRITE": "60"})
    deadline = time.time() + 120
    while not any(n.startswith(".out.tmp-") for n in os.listdir(tmp_path)):  # the writer is mid-write
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    assert proc.wait(timeout=60) == code
    assert "Traceback" not in proc.stderr.read()
    assert load(out).model.config.is_mla and (out / "mlakit.json").exists()  # the old output, whole
    left = sorted(n for n in os.listdir(tmp_path) if n != "out")
    assert left == [] if sig == "SIGINT" else all(n.startswith(".out.") for n in left), left
    # the next run recovers what a killed one left and writes the new output
    rerun = mlakit_process("export", str(models["mla"]), "--format", "hf-deepseek", "-o", str(out), "--overwrite")
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert sorted(os.listdir(tmp_path)) == ["out"] and (out / "config.json").exists()


def test_gguf_loads_ask_transformers_for_no_hub_kernels(tmp_path, monkeypatch):
    """transformers 5.25 swaps layers for kernels from the Hub unless told not to (and without the
    `kernels` package refuses every GGUF): mlakit's load asks for none, next to no remote code."""
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    asked = {}

    def from_pretrained(*args, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("stop here: only the arguments matter")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(MlakitError, match="stop here"):
        load(tiny_gguf(tmp_path / "tiny.gguf"))
    assert asked["trust_remote_code"] is False
    if Version(transformers.__version__) >= Version("4.53"):
        assert asked["use_kernels"] is False
