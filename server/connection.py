"""One client socket: the ring buffer it reads into, its output, its timers.

Callback order for a connection, asyncio style::

    accepted -> readable* [-> writable*] [-> acks_ready*] -> closed

Read side: ``recv_into`` fills a buffer taken from the server's pool (given
back whenever every byte in it has been parsed, so an idle connection holds no
buffer); the MQTT protocol object parses every complete packet in it; a partial
packet stays where it is, or is moved to the front when the buffer is full.

Flow control, one bit each in ``paused``; the socket is read only while no bit
is set:

- ``PAUSE_INFLIGHT``: a 3.1.1 publisher has ``receive_maximum`` QoS 1/2
  publishes waiting for their ack (3.1.1 cannot be told to stop; MQTT 5 clients
  are told Receive Maximum and are disconnected with 0x93 past it).
- ``PAUSE_OUTBUF``: the output buffer went above ``outbuf_high``; reading
  resumes once it drained below ``outbuf_low`` (the watermarks of asyncio's
  ``WriteTransport.set_write_buffer_limits``: pause when size > high, resume
  when size <= low).
- ``PAUSE_GLOBAL``: the pending batch or the writer is behind (server-wide).
- ``PAUSE_STORE``: the store is full and this 3.1.1 publisher's messages are
  held until it has room again.
- ``PAUSE_DRAIN``: the server is draining (SIGTERM); never cleared.

While the server itself holds a connection (every bit but ``PAUSE_OUTBUF``),
its keepalive (or CONNECT deadline) timer is stopped: the client may well be
sending PINGREQs that nobody reads.  It is re-armed in full when that hold
ends.  A client that does not read its acks (``PAUSE_OUTBUF``) keeps its
timer, so a dead one is still closed.

A partial packet of at most ``TAIL_MAX`` bytes left after parsing is copied
out and the pool buffer given back, so a client that sends a few bytes and
stops (slowloris) pins those bytes, not a whole buffer.
"""

import errno
import logging
import socket

from pushcore.mqtt import STATE_CLOSED, STATE_CONNECTED, MQTTServerConnection
from server import _io

PAUSE_INFLIGHT = 1
PAUSE_OUTBUF = 2
PAUSE_GLOBAL = 4
PAUSE_STORE = 8
PAUSE_DRAIN = 16
SERVER_HOLDS = PAUSE_INFLIGHT | PAUSE_GLOBAL | PAUSE_STORE | PAUSE_DRAIN

TAIL_MAX = 4096

log = logging.getLogger("pushcore.conn")


class Connection:
    __slots__ = ("server", "sock", "fd", "peer", "proto", "rbuf", "rview", "rstart", "rend",
                 "tail", "paused", "reading", "writing", "timer", "closed", "keepalive_s")

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.proto = MQTTServerConnection(server.mqtt_settings, server.ingest, server)
        self.proto.transport = self
        self.rbuf = None
        self.rview = None
        self.rstart = 0
        self.rend = 0
        self.tail = b""
        self.paused = 0
        self.reading = False
        self.writing = False
        self.closed = False
        self.keepalive_s = 0.0
        # One timer per connection: first the deadline for CONNECT, then keepalive.
        self.timer = server.loop.call_later(server.connect_timeout, self.on_timer)

    # -- read side ----------------------------------------------------------

    def start(self):
        self.reading = True
        self.server.loop.add_reader(self.fd, self.on_readable)

    def on_readable(self):
        server = self.server
        if server.global_paused:
            self.pause(PAUSE_GLOBAL)
            server.globally_paused.add(self)
            return
        buf = self.rbuf
        if buf is None:
            buf, self.rview = server.pool.get()
            self.rbuf = buf
            self.rstart = 0
            tail = self.tail
            if tail:
                buf[:len(tail)] = tail
                self.tail = b""
            self.rend = len(tail)
        rend = self.rend
        try:
            # server/_io keeps the GIL: a non-blocking recv never waits.
            n = _io.recv_into(self.fd, self.rview[rend:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.close(f"recv: {err.strerror or err}")
            return
        if n == 0:
            self.close("peer closed")
            return
        rend += n
        proto = self.proto
        was_connected = proto.state == STATE_CONNECTED
        try:
            consumed = proto.receive(buf, self.rstart, rend)
        except Exception as err:
            # A bug, not bad input (bad input raises MQTTError, handled inside):
            # this connection ends with 0x83, the daemon and the others go on.
            log.exception("internal error on %s", proto.client_id or self.peer)
            server.metrics["internal_errors"] += 1
            proto.internal_error(err)
            self.close(proto.close_reason)
            return
        if consumed == rend:
            # Everything parsed: give the buffer back, an idle connection keeps none.
            server.pool.put(buf, self.rview)
            self.rbuf = self.rview = None
        else:
            self._keep_partial(buf, consumed, rend)
        if proto.state == STATE_CONNECTED:
            if not was_connected:
                self._connected()
            elif self.keepalive_s:
                self.timer.reset(self.keepalive_s)
            if proto.version == 4 and proto.inflight >= server.mqtt_settings.receive_maximum:
                self.pause(PAUSE_INFLIGHT)
        session = proto.session
        if session is not None and session.queue:
            # Acks in this read freed window: fill it once, for all of them.
            self.deliver()
        elif proto.out:
            self.flush()
        if proto.close_after_flush and not self.closed:
            self.close(proto.close_reason)

    def _keep_partial(self, buf, consumed, rend):
        """A partial packet is left: keep it, moving it to the front or growing the buffer."""
        pending = rend - consumed
        if pending <= TAIL_MAX and len(buf) == self.server.pool.size:
            self.tail = bytes(self.rview[consumed:rend])
            self.server.pool.put(buf, self.rview)
            self.rbuf = self.rview = None
            return
        if rend < len(buf):
            self.rstart = consumed
            self.rend = rend
            return
        if consumed > 0:
            buf[:pending] = buf[consumed:rend]
            self.rstart = 0
            self.rend = pending
            return
        # A single packet larger than the buffer: grow this connection's buffer
        # (the parser has already refused packets over max_packet_size).
        bigger = bytearray(len(buf) * 2)
        bigger[:pending] = buf[consumed:rend]
        self.rbuf = bigger
        self.rview = memoryview(bigger)
        self.rstart = 0
        self.rend = pending

    def _connected(self):
        server = self.server
        keepalive = self.proto.keepalive
        # MQTT 3.1.1 §3.1.2.10 / 5.0 §3.1.2.10: close after one and a half keepalives.
        self.keepalive_s = keepalive * 1.5
        if keepalive:
            self.timer.reset(self.keepalive_s)
        else:
            self.timer.cancel()
        server.metrics["connections_accepted_mqtt"] += 1

    def on_timer(self):
        if self.closed:
            return
        if self.proto.state == STATE_CONNECTED:
            self.server.metrics["keepalive_timeouts"] += 1
            self.proto.keepalive_expired()
            self.flush()
            self.close("keepalive timeout")
        else:
            self.server.metrics["connect_timeouts"] += 1
            self.close("no CONNECT within connect_timeout")

    # -- flow control -------------------------------------------------------

    def pause(self, flag):
        if self.closed:
            return
        if flag & SERVER_HOLDS and not self.paused & SERVER_HOLDS:
            self.timer.cancel()
        self.paused |= flag
        if self.reading:
            self.reading = False
            self.server.loop.remove_reader(self.fd)

    def resume(self, flag):
        if self.closed or not self.paused & flag:
            return
        self.paused &= ~flag
        if flag & SERVER_HOLDS and not self.paused & SERVER_HOLDS:
            if self.proto.state != STATE_CONNECTED:
                self.timer.reset(self.server.connect_timeout)
            elif self.keepalive_s:
                self.timer.reset(self.keepalive_s)
        if not self.paused and not self.reading:
            self.reading = True
            self.server.loop.add_reader(self.fd, self.on_readable)

    def acks_ready(self):
        """Acks were appended after a commit: send them, maybe read again."""
        if self.closed:
            return
        self.flush()
        if self.paused & PAUSE_INFLIGHT and self.proto.inflight < self.server.mqtt_settings.receive_maximum:
            self.resume(PAUSE_INFLIGHT)
        if self.proto.close_after_flush and not self.closed:
            self.close(self.proto.close_reason)

    # -- write side ---------------------------------------------------------

    def flush(self):
        out = self.proto.out
        if not out or self.closed:
            return
        try:
            n = _io.send(self.fd, out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as err:
            self.close(f"send: {err.strerror or err}")
            return
        del out[:n]
        if out:
            if not self.writing:
                self.writing = True
                self.server.loop.add_writer(self.fd, self.on_writable)
            if len(out) > self.server.outbuf_high:
                self.pause(PAUSE_OUTBUF)
        elif self.writing:
            self.writing = False
            self.server.loop.remove_writer(self.fd)

    def deliver(self):
        """Send the session's queued deliveries as far as its window and the socket take."""
        session = self.proto.session
        while not self.closed and session is not None:
            blocked = self.server.broker.pump(session)
            self.flush()
            if not blocked or self.proto.out:
                return

    def on_writable(self):
        self.flush()
        if self.closed:
            return
        if len(self.proto.out) <= self.server.outbuf_low:
            session = self.proto.session
            if session is not None and session.queue:
                self.deliver()
                if self.closed:
                    return
            if self.paused & PAUSE_OUTBUF:
                self.resume(PAUSE_OUTBUF)
        if not self.proto.out and self.proto.close_after_flush:
            self.close(self.proto.close_reason)

    # -- end ------------------------------------------------------------------

    def close(self, reason):
        if self.closed:
            return
        # Give a closing reply (CONNACK/DISCONNECT with its reason code) one chance to leave.
        out = self.proto.out
        if out:
            try:
                self.sock.send(out)
            except OSError:
                pass
            out.clear()
        self.closed = True
        self.proto.state = STATE_CLOSED
        self.timer.cancel()
        loop = self.server.loop
        # Forget the fd's registrations now: the number may be reused at once by
        # the next accept, and a late pause() must not unregister the new owner.
        if self.reading:
            loop.remove_reader(self.fd)
            self.reading = False
        if self.writing:
            loop.remove_writer(self.fd)
            self.writing = False
        if self.rbuf is not None:
            self.server.pool.put(self.rbuf, self.rview)
            self.rbuf = self.rview = None
        try:
            self.sock.close()
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
        self.server.connection_closed(self, reason)
        # Last, once the socket and its registrations are gone: a Will due now is
        # stored with the next batch.
        try:
            self.proto.connection_lost()
        except Exception:
            log.exception("storing the will of %s failed", self.proto.client_id)
            self.server.metrics["internal_errors"] += 1


def set_nodelay(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
