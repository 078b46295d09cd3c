import pytest


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """Every healing test runs tiny models (see ``one_thread`` in tests/conftest.py)."""
    yield
