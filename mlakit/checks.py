"""Checks of arguments, inputs and output locations that run before any heavy work.

The commands call these first, so that a typo costs a second, not a model load and a
calibration. Each failure is a MlakitError of one line naming the culprit. Nothing
here reads a model: only names, sizes, headers and permissions.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from mlakit.errors import MlakitError

_DEVICE_RE = re.compile(r"(cpu|cuda)(:\d+)?")


def attention_kind(ref: str) -> str | None:
    """Whether the model ``ref`` names (checked by ``model_ref``) is MLA: "mla", "other", or None
    where the header does not say (the loader then decides). Reads only a config file or a GGUF's
    first key (``general.architecture``, which writers put first), not the weights."""
    import json
    import struct

    from mlakit.config import CONFIG_FILENAME, ModelConfig

    if ref == "default":
        return "other"  # SmolLM2-135M: Llama
    path = Path(ref)
    try:
        if path.is_dir():
            if (path / CONFIG_FILENAME).exists():
                return "mla" if ModelConfig.load(path).is_mla else "other"
            model_type = str(json.loads((path / "config.json").read_text()).get("model_type", ""))
            return "mla" if model_type.startswith("deepseek_v") else "other"  # V2/V3 (the first DeepSeek: MHA)
        with open(path, "rb") as f:
            head = f.read(4096)
        if head[:4] != b"GGUF":
            return None
        (key_len,) = struct.unpack_from("<Q", head, 24)
        key = head[32:32 + key_len]
        value_type, value_len = struct.unpack_from("<IQ", head, 32 + key_len)
        if key != b"general.architecture" or value_type != 8:  # 8: string
            return None
        arch = head[44 + key_len:44 + key_len + value_len].decode("utf-8", "replace")
        return "mla" if arch.startswith("deepseek") else "other"
    except (OSError, ValueError, struct.error, AttributeError, MlakitError):  # odd: the loader says what
        return None


def device(name: str | None) -> str:
    """``name`` as a device mlakit can run on (None: cuda when available, else cpu)."""
    if name is None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if not _DEVICE_RE.fullmatch(name):
        raise MlakitError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MlakitError(f"--device {name} was asked for, but no CUDA GPU is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise MlakitError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA GPUs")
    return name


def model_ref(ref: str, flag: str = "MODEL") -> None:
    """``ref`` names something ``mlakit.loading.load`` can try: 'default', a .gguf file, a
    model directory (the content is checked by the loader)."""
    if ref == "default":
        from mlakit.loading import default_model_path

        default_model_path()  # installed? (finds the package without importing it)
        return
    path = Path(ref)
    if not path.exists():
        raise MlakitError(f"{path} does not exist (give a model directory, a .gguf file or 'default')")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise MlakitError(f"cannot read {path}: permission denied")
        if not (path / "mlakit.json").exists() and not (path / "config.json").exists():
            raise MlakitError(f"{path} holds neither mlakit.json (mlakit) nor config.json (Hugging Face)")
        return
    if path.suffix != ".gguf":
        raise MlakitError(f"{path} is a file but not a .gguf file")
    readable_file(path, flag)


def readable_file(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MlakitError(f"{flag} {path} does not exist")
    if not path.is_file():
        raise MlakitError(f"{flag} {path} is not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise MlakitError(f"cannot read {path}: {e.strerror or e}") from None
    return path


def output(path: str | os.PathLike, overwrite: bool, directory: bool, flag: str = "-o") -> Path:
    """The output ``path`` may be written: absent (or replaceable with ``overwrite``, and
    of the same kind), inside a directory that exists or can be created, writable."""
    from mlakit.io import check_output

    path = Path(path)
    if str(path).strip() == "" or path.name in ("", ".", ".."):
        raise MlakitError(f"{flag} {str(path)!r} is not a usable output name")
    check_output(path, overwrite, directory)
    writable_location(path)
    return path


def writable_location(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a directory a file can be created in."""
    from mlakit.io import probe_writable

    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        if parent.is_symlink():
            raise MlakitError(f"cannot write {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise MlakitError(f"cannot write {path}: {parent} is not a directory")
    probe_writable(parent)


def report_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MlakitError(f"--report {path} is not a directory")
    if path.is_dir():
        from mlakit.io import probe_writable

        probe_writable(path)
    else:
        writable_location(path)
    return path


def finite(value: float | None, flag: str, low: float | None = None, high: float | None = None,
           low_open: bool = False) -> None:
    """``value`` (when given) is a finite number in the range."""
    if value is None:
        return
    if not math.isfinite(value):
        raise MlakitError(f"{flag} must be a finite number, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise MlakitError(f"{flag} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise MlakitError(f"{flag} must be <= {high:g}, got {value:g}")


def at_least(value: int | None, flag: str, low: int) -> None:
    if value is not None and value < low:
        raise MlakitError(f"{flag} must be >= {low}, got {value}")


def utf8_text(text: str, flag: str) -> str:
    """Command-line text Python decoded with surrogate escapes holds invalid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MlakitError(f"{flag} is not valid UTF-8 text") from None
    return text


def prompt(text: str | None, file: str | None) -> str:
    """The prompt from ``--prompt TEXT`` or ``--prompt-file PATH`` (``-``: standard input)."""
    if file is None:
        return utf8_text(text or "", "--prompt")
    if file == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        path = readable_file(file, "--prompt-file")
        data, name = path.read_bytes(), str(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MlakitError(f"--prompt-file {name} is not valid UTF-8 text (byte {e.start})") from None
