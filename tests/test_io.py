"""server/_io: send and recv that keep the GIL, against the socket methods they replace."""

import errno

import pytest

from server import _io


def test_send_and_recv_move_bytes(pair):
    a, b = pair
    assert _io.send(a.fileno(), b"hello") == 5
    assert _io.send(a.fileno(), bytearray(b" world")) == 6
    assert _io.recv(b.fileno(), 3) == b"hel"
    buf = bytearray(16)
    n = _io.recv_into(b.fileno(), memoryview(buf)[4:])
    assert buf[4:4 + n] == b"lo world"


def test_would_block_is_blocking_io_error_like_the_socket_module(pair):
    a, b = pair
    with pytest.raises(BlockingIOError):
        b.recv(10)
    with pytest.raises(BlockingIOError):
        _io.recv(b.fileno(), 10)
    with pytest.raises(BlockingIOError):
        _io.recv_into(b.fileno(), memoryview(bytearray(10)))
    # Fill the send buffer: the call that would block raises, the ones before sent.
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            sent += _io.send(a.fileno(), b"x" * 65536)
    assert sent > 0


def test_eof_and_errors(pair):
    a, b = pair
    a.close()
    assert _io.recv(b.fileno(), 10) == b""
    assert _io.recv_into(b.fileno(), memoryview(bytearray(4))) == 0
    # The peer is gone: EPIPE (no SIGPIPE: MSG_NOSIGNAL), as an OSError with its errno.
    with pytest.raises(OSError) as info:
        _io.send(b.fileno(), b"late")
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    with pytest.raises(OSError) as info:
        _io.send(-1, b"x")
    assert info.value.errno == errno.EBADF


def test_empty_buffers_do_not_call_the_kernel(pair):
    a, _b = pair
    assert _io.send(a.fileno(), b"") == 0
    assert _io.recv_into(a.fileno(), memoryview(bytearray(0))) == 0
