"""The blocking publisher client: at-least-once MQTT publishing that survives
connection loss.

This is the one module in ``pushcore/`` that touches sockets and the clock.
It drives the same framing core as the server (``pushcore._frame``): reads go
``recv_into`` a bytearray, ``Parser.parse`` splits every complete packet in
it, and the partial tail is compacted to the front only when the buffer fills.

Delivery guarantee: every QoS 1/2 message stays *outstanding* until the server
acknowledges it (PUBACK, or PUBREC for QoS 2).  When the connection is lost
(socket error, EOF, DISCONNECT from the server, no PINGRESP within the
keepalive) the client reconnects with exponential backoff and full jitter and
resends every outstanding message in its original order, with DUP=1 and the
same message-id user property, so a server that deduplicates by id stores it
once.  Without a ``msg_id`` a resent message may be stored twice.

The client is single-threaded and does I/O only inside its own calls
(``connect``, ``publish``, ``flush``, ``Message.wait``, ``close``): acks are
processed, keepalive pings sent and reconnects made while one of them runs.
Between calls nothing happens; a long-idle client may find its connection
dropped by the server at the next call, which then reconnects and resends.
Not thread-safe: use one client per thread.

Call order of ``Client``::

    connect -> (publish | flush | Message.wait)* -> close

A blocking call on a client that is not connected (never connected, closed,
or gave up reconnecting) first connects with a single attempt, as
``connect()`` does; a connection lost *during* a call is re-established with
backoff, up to ``max_reconnects`` consecutive failures.
"""

import heapq
import logging
import random
import select
import socket
import time

from pushcore import _frame, errors

log = logging.getLogger("pushcore.client")

# MQTT 5.0 §2.4: a reason code below 0x80 is success, 0x80 and above a failure.
FAILURE_THRESHOLD = 0x80
# MQTT 5.0 §3.4.2.1 / §3.5.2.1: 0x97 Quota exceeded in PUBACK/PUBREC — the
# server is alive but cannot take the message now; retry it later.
QUOTA_EXCEEDED = 0x97
# MQTT 5.0 §3.6.2.1: PUBREL 0x92 Packet Identifier not found.
PACKET_ID_NOT_FOUND = 0x92
# MQTT 5.0 §3.14.2.1: DISCONNECT 0x82 Protocol Error.
PROTOCOL_ERROR = 0x82
# MQTT 5.0 §3.2.2.3.4-5: a PUBLISH over the server's Maximum QoS or with
# retain it does not support earns 0x9B QoS not supported / 0x9A Retain not
# supported; the client refuses it locally with the same codes.
QOS_NOT_SUPPORTED = 0x9B
RETAIN_NOT_SUPPORTED = 0x9A
# MQTT 5.0 §2.2.1 / 3.1.1 §2.3.1: packet identifiers are non-zero 16-bit.
MAX_PACKET_ID = 65535
# MQTT 5.0 §3.2.2.3.3: Receive Maximum absent means 65535.
DEFAULT_RECEIVE_MAXIMUM = 65535

# MQTT 5.0 §3.2.2.2: CONNACK refusals worth retrying with backoff (the server
# is busy, out of quota or rate-limiting); any other refusal (bad credentials,
# not authorized, bad protocol version...) will not change on retry.
TRANSIENT_CONNACK_REFUSALS = frozenset({
    0x80,   # Unspecified error
    0x88,   # Server unavailable
    0x89,   # Server busy
    0x97,   # Quota exceeded
    0x9F,   # Connection rate exceeded
})

# MQTT 3.1.1 §3.2.2.3: CONNACK return codes 1-5.
_CONNACK_V3_ERRORS = {
    0x01: errors.UnsupportedProtocolVersion,
    0x02: errors.ClientIdentifierNotValid,
    0x03: errors.ServerUnavailable,
    0x04: errors.BadUsernameOrPassword,
    0x05: errors.NotAuthorized,
}


def _error_classes(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _error_classes(sub)


# MQTT 5.0 §2.4: reason code -> the error class that carries it.
_REASON_ERRORS = {cls.reason_code: cls for cls in _error_classes(errors.MQTTError)}

_READ_BUFFER_SIZE = 65536

# Message states.  A QoS 1 message goes QUEUED -> SENT -> DONE; QoS 2 goes
# QUEUED -> SENT -> RELEASING (acked at PUBREC, PUBREL sent) -> DONE at PUBCOMP.
# After a reconnect, SENT is resent as is (resumed session) or goes back to
# QUEUED for a new packet id (new session); RELEASING resends its PUBREL.
_QUEUED, _SENT, _RELEASING, _DONE = range(4)


def backoff_delay(attempt, base, cap, rng=random):
    """Seconds to sleep before reconnect ``attempt`` (0-based): exponential
    backoff with full jitter, ``uniform(0, min(cap, base * 2**attempt))``.

    Full jitter spreads a fleet of publishers that lost the same server over
    the whole window instead of having them reconnect in lockstep.
    """
    try:
        ceiling = min(cap, base * 2 ** attempt)
    except OverflowError:
        ceiling = cap
    return rng.uniform(0.0, ceiling)


class _ConnectionLost(Exception):
    """Internal: the connection is unusable; the caller reconnects."""


class Message:
    """Handle on one published message.

    ``acked`` turns True when the server acknowledged storing it (PUBACK, or
    PUBREC for QoS 2); ``failed`` when it refused it for good (``reason_code``
    then says why).  ``packet_id`` is the id of its latest PUBLISH; it may
    change when the message is resent on a new connection.
    """

    __slots__ = ("msg_id", "key", "acked", "failed", "reason_code",
                 "_packet", "_client", "_seq", "_state")

    def __init__(self, client, packet, msg_id, key, seq):
        self.msg_id = msg_id
        self.key = key
        self.acked = False
        self.failed = False
        self.reason_code = 0
        self._packet = packet
        self._client = client
        self._seq = seq
        self._state = _QUEUED

    @property
    def topic(self):
        return self._packet.topic

    @property
    def payload(self):
        return self._packet.payload

    @property
    def qos(self):
        return self._packet.qos

    @property
    def retain(self):
        return self._packet.retain

    @property
    def packet_id(self):
        return self._packet.packet_id

    @property
    def settled(self):
        """True once nothing more will happen to the message's fate: acked,
        failed, or sent at QoS 0."""
        return self.acked or self.failed or self._state == _DONE

    def wait(self, timeout=None):
        """Block (processing the connection) until the message is acked or
        failed, or ``timeout`` seconds pass; return ``acked``.  A QoS 0
        message is never acked: this returns False at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._client._run_until(lambda: self.settled, deadline)
        return self.acked

    def __repr__(self):
        if self.acked:
            fate = "acked"
        elif self.failed:
            fate = f"failed 0x{self.reason_code:02X}"
        elif self._state == _DONE:
            fate = "sent"
        else:
            fate = "pending"
        return (f"<Message topic={self.topic!r} msg_id={self.msg_id!r} qos={self.qos} "
                f"packet_id={self.packet_id} {fate}>")


class _Wire:
    """The socket half of the blocking clients (Client here, and
    server/subscriber.py's Subscriber): a read buffer parsed for whole
    packets, and the bytes the socket did not take yet.

    A subclass calls ``_init_wire()`` first, sets ``_sock``, ``_poller`` and
    ``_parser`` when it connects, has ``version``, ``host``, ``port``,
    ``connect_timeout`` and ``_ping_deadline``, and says how a failed socket ends its call:
    ``_lost(why)`` raises.
    """

    def _init_wire(self):
        self._sock = None
        self._poller = None
        self._poll_mask = 0
        self._parser = None
        self._rbuf = bytearray(_READ_BUFFER_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0
        self._rend = 0
        self._out = bytearray()

    def _receive(self):
        """One ``recv_into`` the read buffer, then parse every complete packet."""
        if self._rend == len(self._rbuf):
            self._make_room()
        try:
            n = self._sock.recv_into(self._rview[self._rend:])
        except BlockingIOError:
            return (), None
        except OSError as exc:
            self._lost(f"read failed: {exc}")
        if n == 0:
            self._lost("connection closed by the server")
        self._rend += n
        packets, consumed, error = self._parser.parse(self._rbuf, self._rstart, self._rend)
        if consumed == self._rend:
            self._rstart = self._rend = 0
        else:
            self._rstart = consumed
        return packets, error

    def _make_room(self):
        """The buffer is full: move the partial packet to the front, or, if it
        already starts there, double the buffer to fit it."""
        pending = self._rend - self._rstart
        if self._rstart:
            self._rbuf[:pending] = self._rbuf[self._rstart:self._rend]
        else:
            grown = bytearray(2 * len(self._rbuf))
            grown[:pending] = self._rbuf
            self._rview.release()
            self._rbuf = grown
            self._rview = memoryview(grown)
        self._rstart, self._rend = 0, pending

    def _write(self, data):
        self._last_write = time.monotonic()
        if self._out:
            self._out += data
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(f"write failed: {exc}")
        if sent < len(data):
            self._out += data[sent:]

    def _flush_out(self):
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"write failed: {exc}")
        del self._out[:sent]

    def _send_disconnect(self, reason_code):
        """MQTT 5.0 §4.13.1: before closing on a packet we cannot accept, tell the
        server why with a DISCONNECT (behind any partly sent packet)."""
        if self.version == 5:
            try:
                self._sock.send(bytes(self._out) + _frame.encode(_frame.Disconnect(reason_code), 5))
            except OSError:
                pass

    def _disconnect(self):
        """Send what is buffered and DISCONNECT (reason 0, normal), waiting up to
        ``connect_timeout``, then close."""
        try:
            self._sock.settimeout(self.connect_timeout)
            self._sock.sendall(bytes(self._out) + _frame.encode(_frame.Disconnect(0), self.version))
        except OSError as exc:
            log.debug("DISCONNECT to %s:%d not sent: %s", self.host, self.port, exc)
        finally:
            self._drop_socket()

    def _drop_socket(self):
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None
        self._poller = None
        self._out = bytearray()
        self._rstart = self._rend = 0
        self._ping_deadline = None


class Client(_Wire):
    """Blocking MQTT 3.1.1 (``version=4``) / 5.0 (``version=5``) publisher.

    ``max_inflight`` bounds the outstanding (unacknowledged) QoS 1/2
    messages: ``publish`` blocks, processing acks, while that many are
    outstanding.  With MQTT 5 the server's Receive Maximum further bounds how
    many are on the wire at once.  ``on_ack`` is called with the ``Message``
    from inside the client's calls when a message is acked; an exception in
    it is logged, not raised.
    """

    def __init__(self, host="127.0.0.1", port=1883, client_id="", version=5, keepalive=60,
                 clean_start=True, username=None, password=None, id_property="id",
                 key_property="key", max_inflight=64, connect_timeout=5.0,
                 backoff_base=0.05, backoff_cap=5.0, max_reconnects=None):
        if version not in (4, 5):
            raise ValueError(f"version must be 4 (MQTT 3.1.1) or 5 (MQTT 5.0), not {version!r}")
        if not 1 <= max_inflight <= MAX_PACKET_ID:
            raise ValueError(f"max_inflight must be 1..{MAX_PACKET_ID}, not {max_inflight!r}")
        # MQTT 3.1.1 §3.1.3.1 / 5.0 §3.1.3.1: an empty client id needs a clean
        # session in 3.1.1; 5.0 lets the server assign one.
        if version == 4 and not client_id and not clean_start:
            raise ValueError("MQTT 3.1.1 requires a client_id when clean_start is False")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.version = version
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.username = username
        self.password = password.encode() if isinstance(password, str) else password
        self.id_property = id_property
        self.key_property = key_property
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_reconnects = max_reconnects
        self.on_ack = None

        self._init_wire()

        # Outstanding QoS 1/2 messages by sequence number, in publish order.
        self._outstanding = {}
        # (seq, Message) heap of outstanding messages waiting to be (re)sent.
        self._queue = []
        # Packet id -> Message on the wire of the current session.
        self._inflight = {}
        self._next_packet_id = 1
        self._seq = 0
        self._acked_ids = []

        self._attempt = 0           # reconnect backoff attempt; reset by a CONNACK
        self._quota_attempt = 0     # quota backoff attempt; reset by an ack
        self._paused_until = None   # no new PUBLISH before this (quota exceeded)
        self._keepalive_s = keepalive
        self._last_write = 0.0
        self._ping_deadline = None
        self._send_limit = max_inflight
        self._server_max_packet = None
        self._server_max_qos = 2
        self._server_retain = True
        self._assigned_client_id = None
        self._stats = dict(published=0, acked=0, failed=0, resent=0, reconnects=0,
                           quota_retries=0, pings=0, peak_in_flight=0)

    # -- public API -------------------------------------------------------

    @property
    def connected(self):
        return self._sock is not None

    @property
    def in_flight(self):
        """QoS 1/2 messages on the wire awaiting PUBACK/PUBREC/PUBCOMP."""
        return len(self._inflight)

    @property
    def outstanding(self):
        """QoS 1/2 messages not yet through their flow (on the wire or queued)."""
        return len(self._outstanding)

    @property
    def stats(self):
        """Counters: published, acked, failed, resent, reconnects,
        quota_retries, pings, peak_in_flight."""
        return dict(self._stats)

    def connect(self):
        """Open the TCP connection and do CONNECT/CONNACK (one attempt).

        Raises OSError (refused, timeout) or the MQTTError subclass for the
        CONNACK refusal (e.g. UnsupportedProtocolVersion, NotAuthorized).
        Outstanding messages of an earlier connection are resent.
        """
        if self._sock is not None:
            return
        try:
            self._establish()
        except _ConnectionLost as exc:
            self._drop_socket()
            raise ConnectionError(f"connection to {self.host}:{self.port} failed: {exc}") from exc

    def publish(self, topic, payload, qos=1, retain=False, msg_id=None, key=None, wait=False):
        """Publish ``payload`` (bytes, or str sent as UTF-8) to ``topic``.

        With MQTT 5, ``msg_id`` and ``key`` travel as the user properties
        named ``id_property`` and ``key_property``.  MQTT 3.1.1 has no
        properties: put the id in the payload yourself (the client still
        tracks ``msg_id``) and the server keys by client identity.

        Blocks while ``max_inflight`` messages are outstanding, and until the
        PUBLISH is handed to the kernel; with ``wait=True`` also until the
        message is acked or failed.  QoS 0 is written and forgotten.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        # MQTT 5.0 and 3.1.1 §4.7.1, §4.7.3: a topic name is non-empty and has
        # no wildcards; 5.0 §1.5.4: no U+0000.  Caught here, because a server
        # that closes the connection over it would see it resent forever.
        if not topic or "+" in topic or "#" in topic or "\0" in topic:
            raise errors.TopicNameInvalid(f"invalid topic name {topic!r}")
        for name, value in (("msg_id", msg_id), ("key", key)):
            if value is not None and (not isinstance(value, str) or "\0" in value):
                raise ValueError(f"{name} must be a str without U+0000, not {value!r}")
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes):
            payload = bytes(payload)

        properties = None
        if self.version == 5:
            pairs = []
            if msg_id is not None:
                pairs.append((self.id_property, msg_id))
            if key is not None:
                pairs.append((self.key_property, key))
            if pairs:
                properties = {"user_property": pairs}
        packet = _frame.Publish(topic, payload, qos=qos, retain=retain,
                                packet_id=1 if qos else 0, properties=properties)
        # Encoding raises ValueError for what no server takes (a topic over
        # 65535 bytes...) before anything is queued.  The size does not depend
        # on the packet id the message is finally sent under.
        data = _frame.encode(packet, self.version)

        self._ensure_connected()
        # Take in whatever acks have arrived, without blocking.
        self._guard(self._step, time.monotonic())
        self._seq += 1
        msg = Message(self, packet, msg_id, key, self._seq)
        self._stats["published"] += 1

        refusal = self._local_refusal(qos, retain, len(data))
        if refusal is not None:
            self._refuse(msg, *refusal)
            return msg
        if qos == 0:
            msg._state = _DONE
            self._guard(self._write, data)
        else:
            self._run_until(lambda: len(self._outstanding) < self.max_inflight, None)
            self._outstanding[msg._seq] = msg
            heapq.heappush(self._queue, (msg._seq, msg))
            self._guard(self._pump)
        self._run_until(lambda: not self._out, None)
        if wait:
            self._run_until(lambda: msg.settled, None)
        return msg

    def flush(self, timeout=None):
        """Block until every outstanding message is through its flow (acked,
        QoS 2 completed, or failed) and all output is written; return False if
        ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._run_until(lambda: not self._outstanding and not self._out, deadline)

    def acked_ids(self):
        """Every ``msg_id`` acked successfully, in ack order."""
        return list(self._acked_ids)

    def close(self):
        """Send DISCONNECT (reason 0, normal) and close the connection.

        Does not wait for acks (call ``flush`` first; the context manager does
        on a clean exit).  Messages still outstanding stay with the client and
        are resent if it connects again.
        """
        if self._sock is None:
            return
        self._disconnect()

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()

    # -- the I/O driver ---------------------------------------------------

    def _ensure_connected(self):
        if self._sock is None:
            self.connect()

    def _run_until(self, done, deadline):
        """Drive the connection until ``done()`` or ``deadline`` (monotonic).

        Returns ``done()``.  Raises ConnectionError when reconnecting gives up,
        or a non-transient MQTTError a reconnect's CONNACK refused with.
        """
        while not done():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._ensure_connected()
            self._guard(self._step, deadline)
        return True

    def _guard(self, operation, *args):
        """Run one socket operation; on connection loss, reconnect (and resend)."""
        try:
            operation(*args)
        except _ConnectionLost as exc:
            log.warning("connection to %s:%d lost: %s", self.host, self.port, exc)
            self._drop_socket()
            self._reconnect()

    def _step(self, deadline):
        """Wait until the socket is readable (or writable with output
        pending), a timer is due, or ``deadline``; then read, write, ping."""
        now = time.monotonic()
        wake = self._keepalive_check(now)
        if self._paused_until is not None:
            if now >= self._paused_until:
                self._paused_until = None
                self._pump()
            else:
                wake = self._paused_until if wake is None else min(wake, self._paused_until)
        if deadline is not None:
            wake = deadline if wake is None else min(wake, deadline)
        timeout_ms = None if wake is None else max(0, int((wake - now) * 1000.0 + 0.999))

        mask = select.POLLIN | (select.POLLOUT if self._out else 0)
        if mask != self._poll_mask:
            self._poller.modify(self._sock, mask)
            self._poll_mask = mask
        for _fd, events in self._poller.poll(timeout_ms):
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read()
            if events & select.POLLOUT:
                self._flush_out()

    def _keepalive_check(self, now):
        """MQTT 5.0 §3.1.2.10: send PINGREQ when nothing was sent for the
        keepalive; no PINGRESP within another keepalive means the connection
        is dead.  Returns when to look again, or None when keepalive is off."""
        if not self._keepalive_s:
            return None
        if self._ping_deadline is not None:
            if now >= self._ping_deadline:
                raise _ConnectionLost(f"no PINGRESP within {self._keepalive_s} s")
            return self._ping_deadline
        due = self._last_write + self._keepalive_s
        if now < due:
            return due
        self._write(_frame.encode(_frame.Pingreq(), self.version))
        self._stats["pings"] += 1
        self._ping_deadline = now + self._keepalive_s
        return self._ping_deadline

    def _read(self):
        packets, error = self._receive()
        self._dispatch(packets)
        if error is not None:
            self._protocol_violation(error.reason_code, f"bad packet from the server: {error}")
        self._pump()

    def _lost(self, why):
        raise _ConnectionLost(why)

    def _protocol_violation(self, reason_code, why):
        self._send_disconnect(reason_code)
        raise _ConnectionLost(why)

    # -- connecting -------------------------------------------------------

    def _establish(self):
        """Open a connection, resend what is outstanding, then handle packets
        that arrived right behind the CONNACK."""
        session_present, packets, error = self._open()
        self._resume(session_present)
        self._dispatch(packets)
        if error is not None:
            self._protocol_violation(error.reason_code, f"bad packet from the server: {error}")

    def _open(self):
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        self._sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._parser = _frame.Parser(version=self.version)
            self._rstart = self._rend = 0
            client_id = self._assigned_client_id or self.client_id
            connect = _frame.Connect(client_id=client_id, clean_start=self.clean_start,
                                     keepalive=self.keepalive, protocol_level=self.version,
                                     username=self.username, password=self.password)
            sock.sendall(_frame.encode(connect, self.version))
            deadline = time.monotonic() + self.connect_timeout
            packets, error = (), None
            while not packets and error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no CONNACK within {self.connect_timeout} s")
                sock.settimeout(remaining)
                packets, error = self._receive()
            if not packets:
                raise error
            connack = packets[0]
            if connack.type != _frame.CONNACK:
                raise errors.ProtocolError(f"expected CONNACK, got packet type {connack.type}")
            if connack.reason_code:
                raise self._connack_error(connack.reason_code)
        except BaseException:
            self._drop_socket()
            raise

        self._attempt = 0
        props = connack.properties or {}
        self._send_limit = min(self.max_inflight,
                               props.get("receive_maximum", DEFAULT_RECEIVE_MAXIMUM))
        self._server_max_packet = props.get("maximum_packet_size")
        self._server_max_qos = props.get("maximum_qos", 2)
        self._server_retain = bool(props.get("retain_available", 1))
        # MQTT 5.0 §3.2.2.3.14: the server's keep alive replaces ours.
        self._keepalive_s = props.get("server_keep_alive", self.keepalive)
        if "assigned_client_identifier" in props:
            self._assigned_client_id = props["assigned_client_identifier"]
        sock.setblocking(False)
        self._poller = select.poll()
        self._poll_mask = select.POLLIN
        self._poller.register(sock, self._poll_mask)
        self._last_write = time.monotonic()
        self._ping_deadline = None
        log.debug("connected to %s:%d (MQTT %s, session present %s)", self.host, self.port,
                  "5.0" if self.version == 5 else "3.1.1", connack.session_present)
        return connack.session_present, packets[1:], error

    def _connack_error(self, code):
        if self.version == 5:
            cls = _REASON_ERRORS.get(code)
            if cls is None:
                return errors.MQTTError(f"CONNACK refused: reason 0x{code:02X}", reason_code=code)
        else:
            cls = _CONNACK_V3_ERRORS.get(code)
            if cls is None:
                return errors.MQTTError(f"CONNACK refused: return code {code}")
        return cls(f"CONNACK refused: {cls.__name__} (0x{code:02X})")

    def _reconnect(self):
        """Reconnect with exponential backoff and full jitter; raise
        ConnectionError after ``max_reconnects`` consecutive failures."""
        failures = 0
        while True:
            if self.max_reconnects is not None and failures >= self.max_reconnects:
                log.warning("giving up on %s:%d after %d failed reconnects",
                            self.host, self.port, failures)
                raise ConnectionError(f"could not reconnect to {self.host}:{self.port} "
                                      f"after {failures} attempts")
            delay = backoff_delay(self._attempt, self.backoff_base, self.backoff_cap)
            log.info("reconnecting to %s:%d in %.3f s (attempt %d)",
                     self.host, self.port, delay, self._attempt + 1)
            time.sleep(delay)
            self._attempt += 1
            try:
                self._establish()
            except (OSError, _ConnectionLost) as exc:
                self._drop_socket()
                failures += 1
                log.info("reconnect to %s:%d failed: %s", self.host, self.port, exc)
                continue
            except errors.MQTTError as exc:
                self._drop_socket()
                if exc.reason_code not in TRANSIENT_CONNACK_REFUSALS:
                    raise
                failures += 1
                log.info("reconnect to %s:%d refused: %s", self.host, self.port, exc)
                continue
            self._stats["reconnects"] += 1
            log.info("reconnected to %s:%d; %d messages outstanding",
                     self.host, self.port, len(self._outstanding))
            return

    def _resume(self, session_present):
        """Resend every outstanding message in its original order, DUP=1.

        MQTT 3.1.1 §4.4 / 5.0 §4.4: a resumed session gets PUBLISH and PUBREL
        again under their original packet ids.  A new session knows none of
        them, so PUBLISHes go back to the queue for fresh ids (QoS 2 messages
        already PUBREC'd keep theirs for the PUBREL).
        """
        resent = 0
        if session_present:
            for msg in self._outstanding.values():
                if msg._state == _SENT:
                    msg._packet.dup = True
                    self._write(_frame.encode(msg._packet, self.version))
                    resent += 1
                elif msg._state == _RELEASING:
                    self._write(_frame.encode_ack(_frame.PUBREL, msg.packet_id, 0, self.version))
                    resent += 1
        else:
            self._inflight = {msg.packet_id: msg for msg in self._outstanding.values()
                              if msg._state == _RELEASING}
            for msg in self._outstanding.values():
                if msg._state == _SENT:
                    msg._state = _QUEUED
                    msg._packet.dup = True
                    heapq.heappush(self._queue, (msg._seq, msg))
                    resent += 1
                elif msg._state == _RELEASING:
                    self._write(_frame.encode_ack(_frame.PUBREL, msg.packet_id, 0, self.version))
                    resent += 1
        self._stats["resent"] += resent
        self._pump()

    # -- sending ----------------------------------------------------------

    def _pump(self):
        """Send queued messages, in order, while the window allows."""
        queue = self._queue
        while queue and self._paused_until is None and len(self._inflight) < self._send_limit:
            _seq, msg = heapq.heappop(queue)
            packet = msg._packet
            packet.packet_id = self._allocate_packet_id()
            data = _frame.encode(packet, self.version)
            self._inflight[packet.packet_id] = msg
            msg._state = _SENT
            if len(self._inflight) > self._stats["peak_in_flight"]:
                self._stats["peak_in_flight"] = len(self._inflight)
            self._write(data)

    def _allocate_packet_id(self):
        packet_id = self._next_packet_id
        while packet_id in self._inflight:
            packet_id = packet_id % MAX_PACKET_ID + 1
        self._next_packet_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    def _local_refusal(self, qos, retain, size):
        """MQTT 5.0 §3.2.2.3.4-6: what the server's CONNACK said it cannot
        take is refused here, with the reason code it would have used."""
        if qos > self._server_max_qos:
            return QOS_NOT_SUPPORTED, f"server's Maximum QoS is {self._server_max_qos}"
        if retain and not self._server_retain:
            return RETAIN_NOT_SUPPORTED, "server does not support retain"
        if self._server_max_packet is not None and size > self._server_max_packet:
            return (errors.PacketTooLarge.reason_code,
                    f"{size} bytes is over the server's Maximum Packet Size")
        return None

    # -- acks -------------------------------------------------------------

    def _acked(self, msg, reason_code):
        msg.acked = True
        msg.reason_code = reason_code
        self._quota_attempt = 0
        self._stats["acked"] += 1
        if msg.msg_id is not None:
            self._acked_ids.append(msg.msg_id)
        if self.on_ack is not None:
            try:
                self.on_ack(msg)
            except Exception:
                log.exception("on_ack callback failed for %r", msg)

    def _refuse(self, msg, reason_code, why):
        msg.failed = True
        msg.reason_code = reason_code
        msg._state = _DONE
        self._outstanding.pop(msg._seq, None)
        self._stats["failed"] += 1
        log.warning("message %r on %r refused (0x%02X): %s",
                    msg.msg_id, msg.topic, reason_code, why)

    def _settle_refused(self, msg, reason_code):
        """PUBACK/PUBREC >= 0x80 ended the flow without storing the message."""
        if reason_code != QUOTA_EXCEEDED:
            self._refuse(msg, reason_code, "refused by the server")
            return
        # Keep it queued and hold all sending back: the server is out of quota
        # for everyone, so one backoff round covers every refusal in it.
        now = time.monotonic()
        msg._state = _QUEUED
        msg._packet.dup = False
        heapq.heappush(self._queue, (msg._seq, msg))
        self._stats["quota_retries"] += 1
        if self._paused_until is None:
            delay = backoff_delay(self._quota_attempt, self.backoff_base, self.backoff_cap)
            self._quota_attempt += 1
            self._paused_until = now + delay
            log.info("server quota exceeded; retrying in %.3f s", delay)

    def _handle_puback(self, ack):
        msg = self._inflight.get(ack.packet_id)
        if msg is None or msg.qos != 1:
            log.debug("PUBACK for unknown packet id %d ignored", ack.packet_id)
            return
        del self._inflight[ack.packet_id]
        if ack.reason_code >= FAILURE_THRESHOLD:
            self._settle_refused(msg, ack.reason_code)
            return
        msg._state = _DONE
        del self._outstanding[msg._seq]
        self._acked(msg, ack.reason_code)

    def _handle_pubrec(self, ack):
        msg = self._inflight.get(ack.packet_id)
        if msg is None or msg.qos != 2:
            # MQTT 5.0 §3.6.2.1: PUBREL 0x92 Packet Identifier not found lets
            # the server end a flow this client has no record of.
            reason = PACKET_ID_NOT_FOUND if self.version == 5 else 0
            self._write(_frame.encode_ack(_frame.PUBREL, ack.packet_id, reason, self.version))
            return
        if msg._state == _SENT and ack.reason_code >= FAILURE_THRESHOLD:
            del self._inflight[ack.packet_id]
            self._settle_refused(msg, ack.reason_code)
            return
        self._write(_frame.encode_ack(_frame.PUBREL, ack.packet_id, 0, self.version))
        if msg._state == _SENT:
            msg._state = _RELEASING
            self._acked(msg, ack.reason_code)

    def _handle_pubcomp(self, ack):
        msg = self._inflight.get(ack.packet_id)
        if msg is None or msg._state != _RELEASING:
            log.debug("PUBCOMP for unknown packet id %d ignored", ack.packet_id)
            return
        # A PUBCOMP 0x92 after a new session also ends the flow: the message
        # was stored when PUBREC acked it.
        del self._inflight[ack.packet_id]
        msg._state = _DONE
        del self._outstanding[msg._seq]

    def _handle_pingresp(self, _packet):
        self._ping_deadline = None

    def _handle_disconnect(self, packet):
        raise _ConnectionLost(f"server sent DISCONNECT (reason 0x{packet.reason_code:02X})")

    def _handle_publish(self, packet):
        # A publisher subscribes to nothing, but a resumed session may hold an
        # earlier subscriber's subscriptions: complete the flow and drop it.
        log.debug("dropping PUBLISH on %r from the server", packet.topic)
        if packet.qos == 1:
            self._write(_frame.encode_ack(_frame.PUBACK, packet.packet_id, 0, self.version))
        elif packet.qos == 2:
            self._write(_frame.encode_ack(_frame.PUBREC, packet.packet_id, 0, self.version))

    def _handle_pubrel(self, ack):
        self._write(_frame.encode_ack(_frame.PUBCOMP, ack.packet_id, 0, self.version))

    _HANDLERS = {
        _frame.PUBACK: _handle_puback,
        _frame.PUBREC: _handle_pubrec,
        _frame.PUBCOMP: _handle_pubcomp,
        _frame.PINGRESP: _handle_pingresp,
        _frame.DISCONNECT: _handle_disconnect,
        _frame.PUBLISH: _handle_publish,
        _frame.PUBREL: _handle_pubrel,
    }

    def _dispatch(self, packets):
        for packet in packets:
            handler = self._HANDLERS.get(packet.type)
            if handler is None:
                self._protocol_violation(PROTOCOL_ERROR,
                                         f"unexpected packet type {packet.type} from the server")
            handler(self, packet)
