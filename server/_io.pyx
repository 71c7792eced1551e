"""send(2) and recv(2) for the reactor's non-blocking sockets, keeping the GIL.

The socket module releases the GIL around every call, which is right for a
call that may wait and wrong for one that never does: a non-blocking send or
recv returns at once, and releasing the GIL around it only hands the GIL to
whichever thread is waiting for it.  In pushcore that is the group-commit
writer (server/daemon.py), which then runs its Python (the next batch's rows,
the LMDB calls between its own releases) while the reactor waits to get the
GIL back: a stall on every send and recv, the convoy effect of CPython issue
bpo-7946.  With these the reactor gives the GIL up where it waits anyway, in
epoll_wait, and the writer runs then.

They behave like the socket methods they replace (``sock.send``,
``sock.recv_into``, ``sock.recv``) on a non-blocking socket, errors included:
OSError with the errno, BlockingIOError when the call would block.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport errno
from libc.string cimport strerror

cdef extern from "sys/socket.h" nogil:
    ssize_t c_send "send" (int fd, const void* buf, size_t n, int flags)
    ssize_t c_recv "recv" (int fd, void* buf, size_t n, int flags)
    # Linux send(2): no SIGPIPE for a peer that has gone; EPIPE instead.
    enum: MSG_NOSIGNAL

cdef enum:
    # The most one recv() returns: a webhook response's head and more.
    RECV_STACK = 65536


cdef inline object _error():
    cdef int code = errno
    return OSError(code, strerror(code).decode("utf-8", "replace"))


def send(int fd, const unsigned char[:] data):
    """send(2) ``data`` on ``fd``; the number of bytes sent."""
    cdef ssize_t n
    if data.shape[0] == 0:
        return 0
    n = c_send(fd, &data[0], data.shape[0], MSG_NOSIGNAL)
    if n < 0:
        raise _error()
    return n


def recv_into(int fd, unsigned char[:] buf):
    """recv(2) into ``buf`` (e.g. a memoryview slice); bytes read, 0 at EOF."""
    cdef ssize_t n
    if buf.shape[0] == 0:
        return 0
    n = c_recv(fd, &buf[0], buf.shape[0], 0)
    if n < 0:
        raise _error()
    return n


def recv(int fd, Py_ssize_t size):
    """recv(2) up to ``size`` (at most RECV_STACK) bytes; b"" at EOF."""
    cdef char buf[RECV_STACK]
    cdef ssize_t n
    if size > RECV_STACK:
        size = RECV_STACK
    n = c_recv(fd, buf, size, 0)
    if n < 0:
        raise _error()
    return PyBytes_FromStringAndSize(buf, n)
