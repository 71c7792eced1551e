import pytest


@pytest.fixture
def tmp_env(tmp_path):
    """A fresh, empty data directory for one LMDB environment."""
    path = tmp_path / "data"
    path.mkdir()
    return path
