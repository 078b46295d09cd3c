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
