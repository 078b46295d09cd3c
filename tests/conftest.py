import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real default model (minutes); CI runs these too")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def rel_err():
    return relative_error


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory, monkeypatch):
    # tests never write into the user's ~/.cache; the default model's cache is shared per session
    monkeypatch.setenv("MLAKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "mlakit-cache"))


@pytest.fixture
def one_thread():
    """Tiny models: their steps are microseconds of work, and spinning thread pools on a
    busy 2-core CI box make them take hundreds of milliseconds. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where parity tests run: cpu, or cuda with MLAKIT_TEST_DEVICE=cuda (the GPU check)."""
    name = os.environ.get("MLAKIT_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("MLAKIT_TEST_DEVICE=cuda but no CUDA GPU")
    return torch.device(name)


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory):
    """(original, converted): directories of a tiny byte-level llama (2 KV heads, 1024
    positions, saved with its tokenizer) and of its conversion by ``mlakit convert`` (latent
    rank 12, RoPE key 4), for the tests that run the commands on them (read them, write
    elsewhere). Skips without transformers or the protocol text."""
    pytest.importorskip("transformers")
    from mlakit import evaluate
    from mlakit.cli import main
    from mlakit.errors import MlakitError
    from mlakit.testing.models import save_tiny_with_tokenizer

    try:
        evaluate.data_path()
    except MlakitError:
        pytest.skip("the protocol text is not here")
    tmp = tmp_path_factory.mktemp("tiny-converted")
    _, original = save_tiny_with_tokenizer(tmp, "llama", 2, max_position_embeddings=1024)
    converted = tmp / "mla"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["convert", str(original), "-o", str(converted), "--kv-lora-rank", "12", "--rope-dim", "4",
                     "--calib-tokens", "1024", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    return original, converted
