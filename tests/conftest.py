import socket

import pytest


@pytest.fixture
def tmp_env(tmp_path):
    """A fresh, empty data directory for one LMDB environment."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def pair():
    """A connected pair of non-blocking stream sockets."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()
