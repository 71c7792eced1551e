"""The blocking subscriber client: read what an MQTT broker delivers, as
``pushcore sub`` does.

Like the publisher (``pushcore.client``) it drives the framing core
``pushcore._frame`` over a plain socket: reads go ``recv_into`` a bytearray,
``Parser.parse`` splits every complete packet in it, and writes are buffered
and flushed when the socket is writable, so a subscriber that is busy
acknowledging a flood never blocks on a send while the broker waits for it to
read.  I/O happens only inside the subscriber's own calls; between them
nothing is read, no ack is sent and no PINGREQ goes out.  Not thread-safe.

Call order of ``Subscriber``::

    connect -> subscribe* -> (receive | messages)* -> close

Acknowledgements go out as soon as a PUBLISH is read, before the application
takes the message (libmosquitto, behind mosquitto_sub, does the same): QoS 1
gets PUBACK; QoS 2 gets PUBREC, and PUBCOMP when the PUBREL comes.  A QoS 2
message is handed over when its PUBLISH first arrives, and a PUBLISH re-sent
with the same packet id before the PUBREL is acknowledged again but not handed
over twice (MQTT 5.0 §4.3.3, "Method B").  A process that dies after the ack
loses the message it had not handled yet: this is a reading tool, not an
at-least-once consumer.

A lost connection raises ConnectionError; there is no reconnect.  A
persistent session is resumed by connecting a new ``Subscriber`` with the same
client id and ``clean_start=False``: the broker then sends what it queued
while the client was away (``session_present`` says whether it had a session).
"""

import collections
import logging
import secrets
import select
import socket
import time
from typing import NamedTuple

from pushcore import _frame, errors, topics
from pushcore.client import (
    _CONNACK_V3_ERRORS,
    _REASON_ERRORS,
    FAILURE_THRESHOLD,
    MAX_PACKET_ID,
    PACKET_ID_NOT_FOUND,
    PROTOCOL_ERROR,
    _Wire,
)

log = logging.getLogger("pushcore.sub")

# MQTT 5.0 §3.1.2.11.2: a Session Expiry Interval of 0xFFFFFFFF never expires.
SESSION_NEVER_EXPIRES = 0xFFFFFFFF
# MQTT 5.0 §3.8.2.1.2: a Subscription Identifier is a Variable Byte Integer
# 1..268435455 (0 is a Protocol Error).
MAX_SUBSCRIPTION_ID = 268435455
# MQTT 5.0 §3.8.3.1: Retain Handling 0 sends retained messages at every
# subscribe, 1 only for a new subscription, 2 never; 3 is a Protocol Error.
RETAIN_HANDLING_VALUES = (0, 1, 2)

# MQTT 5.0 §3.9.3: the SUBACK reason codes that refuse a subscription.
SUBACK_FAILURES = {
    0x80: "Unspecified error",
    0x83: "Implementation specific error",
    0x87: "Not authorized",
    0x8F: "Topic Filter invalid",
    0x91: "Packet Identifier in use",
    0x97: "Quota exceeded",
    0x9E: "Shared Subscriptions not supported",
    0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}
# MQTT 3.1.1 §3.9.3: 0x80 is the one failure return code.
SUBACK_FAILURE_V3 = "Failure"

# MQTT 3.1.1 §3.2.2.3: what CONNACK return codes 1-5 mean.
_CONNACK_V3_MEANINGS = {
    0x01: "unacceptable protocol version",
    0x02: "identifier rejected",
    0x03: "server unavailable",
    0x04: "bad user name or password",
    0x05: "not authorized",
}


class Message(NamedTuple):
    """One delivered application message.  ``properties`` is the PUBLISH's
    MQTT 5 property dict (``user_property`` a list of pairs,
    ``subscription_identifier`` a list of ints), or None."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict | None


def generated_client_id():
    """A fresh client id: 'pcsub' and 16 hex digits.  MQTT 3.1.1 §3.1.3.1
    obliges a server to accept only 1-23 characters from [0-9a-zA-Z], so the
    id stays within that for any broker."""
    return "pcsub" + secrets.token_hex(8)


def connack_error(code, version):
    """The MQTTError subclass that carries a CONNACK refusal ``code``."""
    if version == 5:
        cls = _REASON_ERRORS.get(code, errors.MQTTError)
        name = "" if cls is errors.MQTTError else f" {cls.__name__}"
        return cls(f"CONNACK refused: reason 0x{code:02X}{name}", reason_code=code)
    cls = _CONNACK_V3_ERRORS.get(code, errors.MQTTError)
    meaning = _CONNACK_V3_MEANINGS.get(code, "unknown return code")
    return cls(f"CONNACK refused: return code 0x{code:02X} ({meaning})")


def suback_error(refused, version):
    """The error for SUBACK failure codes: ``refused`` is [(filter, code)].

    Its class is the one that carries the first code (``NotAuthorized`` for
    0x87...), and its message names every refused filter with its code.
    """
    parts = []
    for topic_filter, code in refused:
        meaning = SUBACK_FAILURES.get(code, "unknown") if version == 5 else SUBACK_FAILURE_V3
        parts.append(f"{topic_filter!r} refused with 0x{code:02X} ({meaning})")
    first = refused[0][1]
    cls = _REASON_ERRORS.get(first, errors.MQTTError)
    return cls("SUBSCRIBE " + "; ".join(parts), reason_code=first)


class Subscriber(_Wire):
    """Blocking MQTT 3.1.1 (``version=4``) / 5.0 (``version=5``) subscriber.

    ``client_id=None`` generates one (``generated_client_id``); ``""`` asks
    an MQTT 5 server to assign one (``client_id`` holds it after connect).
    ``session_expiry`` (MQTT 5 only) is the Session Expiry Interval in
    seconds, ``SESSION_NEVER_EXPIRES`` for a session kept until it is resumed;
    None or 0 ends the session with the connection.  An MQTT 3.1.1 session
    outlives the connection exactly when ``clean_start`` is False.
    """

    def __init__(self, host="127.0.0.1", port=1883, client_id=None, version=5, keepalive=60,
                 clean_start=True, session_expiry=None, connect_timeout=5.0):
        if version not in (4, 5):
            raise ValueError(f"version must be 4 (MQTT 3.1.1) or 5 (MQTT 5.0), not {version!r}")
        if session_expiry is not None:
            if version != 5:
                raise ValueError("session_expiry is an MQTT 5.0 property; an MQTT 3.1.1 "
                                 "session is kept exactly when clean_start is False")
            if not 0 <= session_expiry <= SESSION_NEVER_EXPIRES:
                raise ValueError(f"session_expiry must be 0..{SESSION_NEVER_EXPIRES}, "
                                 f"not {session_expiry!r}")
        if client_id is None:
            client_id = generated_client_id()
        # MQTT 3.1.1 §3.1.3.1: an empty client id needs a clean session.
        if version == 4 and not client_id and not clean_start:
            raise ValueError("MQTT 3.1.1 requires a client_id when clean_start is False")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.version = version
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.connect_timeout = connect_timeout
        self.session_present = False
        # The CONNACK's MQTT 5 properties (empty for 3.1.1), once connected.
        self.connack_properties = {}

        self._init_wire()
        self._connack = None
        self._keepalive_s = keepalive
        self._last_write = 0.0
        self._ping_deadline = None
        self._next_packet_id = 1
        self._subacks = {}
        # Messages read but not yet taken by the application, in arrival order.
        self._messages = collections.deque()
        # QoS 2 packet ids PUBREC'd and awaiting their PUBREL.
        self._awaiting_release = set()

    # -- public API -------------------------------------------------------

    @property
    def connected(self):
        return self._sock is not None

    @property
    def awaiting_release(self):
        """QoS 2 messages handed over whose PUBREL has not come yet: their
        flow completes (PUBCOMP) in a later call, or on the resumed session."""
        return len(self._awaiting_release)

    def connect(self):
        """Open the connection and do CONNECT/CONNACK; return Session Present.

        Raises OSError (refused, unreachable, no CONNACK in time) or the
        MQTTError subclass of the CONNACK refusal.
        """
        if self._sock is not None:
            return self.session_present
        properties = None
        if self.version == 5 and self.session_expiry:
            properties = {"session_expiry_interval": self.session_expiry}
        connect = _frame.Connect(client_id=self.client_id, clean_start=self.clean_start,
                                 keepalive=self.keepalive, protocol_level=self.version,
                                 properties=properties)
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        self._sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self._poller = select.poll()
            self._poll_mask = select.POLLIN
            self._poller.register(sock, self._poll_mask)
            self._parser = _frame.Parser(version=self.version)
            self._connack = None
            self._write(_frame.encode(connect, self.version))
            deadline = time.monotonic() + self.connect_timeout
            if not self._run_until(lambda: self._connack is not None, deadline):
                raise TimeoutError(f"no CONNACK from {self.host}:{self.port} "
                                   f"within {self.connect_timeout} s")
            if self._connack.reason_code:
                raise connack_error(self._connack.reason_code, self.version)
        except BaseException:
            self._drop_socket()
            raise
        props = self._connack.properties or {}
        self.connack_properties = props
        self.session_present = self._connack.session_present
        if not self.session_present:
            # MQTT 5.0 §3.2.2.1.1: with no session on the server, the client
            # discards its own session state: no PUBREL is coming for these.
            self._awaiting_release.clear()
        # MQTT 5.0 §3.2.2.3.14: the server's keep alive replaces ours.
        self._keepalive_s = props.get("server_keep_alive", self.keepalive)
        # MQTT 5.0 §3.2.2.3.7: the client id the server assigned to an empty one.
        self.client_id = props.get("assigned_client_identifier", self.client_id)
        log.debug("connected to %s:%d as %r (MQTT %s, session present %d)", self.host,
                  self.port, self.client_id, "5.0" if self.version == 5 else "3.1.1",
                  self.session_present)
        return self.session_present

    def subscribe(self, filters, qos=0, retain_as_published=False, retain_handling=0,
                  subscription_id=None, timeout=None):
        """Subscribe to ``filters`` (one filter or several) with maximum QoS
        ``qos``, in one SUBSCRIBE; return the SUBACK codes (the granted QoS of
        each filter).

        MQTT 5 only: ``retain_as_published`` keeps the retain flag a message
        was published with; ``retain_handling`` (0, 1, 2: §3.8.3.1) says
        when retained messages are sent; ``subscription_id`` comes back in
        the ``subscription_identifier`` property of every message the
        subscription matches.  (No Local is not offered: a subscriber publishes
        nothing for it to suppress.)

        A filter that is not valid raises TopicFilterInvalid (0x8F) before
        anything is sent.  Any SUBACK failure code raises the MQTTError
        subclass of the first one, naming each refused filter with its code;
        the granted filters stay subscribed.  Messages that arrive before the
        SUBACK (a resumed session's queue) are kept for ``receive``.
        """
        filters = [filters] if isinstance(filters, str) else list(filters)
        if not filters:
            raise ValueError("subscribe needs at least one topic filter")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        for topic_filter in filters:
            try:
                topics.validate_filter(topic_filter)
            except errors.TopicFilterInvalid as exc:
                raise errors.TopicFilterInvalid(
                    f"{exc} (0x{exc.reason_code:02X} Topic Filter invalid; not sent)") from None
        options = qos
        properties = None
        if self.version == 5:
            if retain_handling not in RETAIN_HANDLING_VALUES:
                raise ValueError(f"retain_handling must be 0, 1 or 2, not {retain_handling!r}")
            # MQTT 5.0 §3.8.3.1: bits 0-1 Maximum QoS, bit 3 Retain As
            # Published, bits 4-5 Retain Handling.
            options |= (int(retain_as_published) << 3) | (retain_handling << 4)
            if subscription_id is not None:
                if not 1 <= subscription_id <= MAX_SUBSCRIPTION_ID:
                    raise ValueError(f"subscription_id must be 1..{MAX_SUBSCRIPTION_ID}, "
                                     f"not {subscription_id!r}")
                properties = {"subscription_identifier": [subscription_id]}
        elif retain_as_published or retain_handling or subscription_id is not None:
            raise ValueError("retain_as_published, retain_handling and subscription_id "
                             "are MQTT 5.0 subscription options")
        self._require_connection()
        packet_id = self._allocate_packet_id()
        packet = _frame.Subscribe(packet_id, [(f, options) for f in filters], properties)
        self._write(_frame.encode(packet, self.version))
        wait = self.connect_timeout if timeout is None else timeout
        if not self._run_until(lambda: packet_id in self._subacks, time.monotonic() + wait):
            raise TimeoutError(f"no SUBACK from {self.host}:{self.port} within {wait} s")
        codes = self._subacks.pop(packet_id).reason_codes
        # MQTT 5.0 §3.9.3 / 3.1.1 §3.9.3: one code per filter, in order.
        if len(codes) != len(filters):
            self._protocol_violation(PROTOCOL_ERROR, f"SUBACK with {len(codes)} codes "
                                                     f"for {len(filters)} topic filters")
        refused = [(f, code) for f, code in zip(filters, codes) if code >= FAILURE_THRESHOLD]
        if refused:
            raise suback_error(refused, self.version)
        log.debug("subscribed to %s (QoS asked %d, granted %s)",
                  ", ".join(filters), qos, ", ".join(str(c) for c in codes))
        return list(codes)

    def receive(self, timeout=None):
        """The next message; None if ``timeout`` seconds pass first (None
        waits for ever).  Raises ConnectionError when the connection is lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._run_until(lambda: self._messages, deadline):
            return None
        return self._messages.popleft()

    def messages(self, timeout=None):
        """Iterate over messages as they arrive, until ``timeout`` seconds
        from now (None: until the connection is lost, which raises)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._run_until(lambda: self._messages, deadline):
            yield self._messages.popleft()

    def close(self):
        """Send what is buffered (acks) and DISCONNECT (normal), and close.

        The broker ends a session whose expiry is 0 and keeps a persistent one
        (with its QoS 2 flows that were not complete) for the next connect,
        by this object or another.
        """
        if self._sock is None:
            return
        self._disconnect()

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()

    # -- the I/O driver ---------------------------------------------------

    def _require_connection(self):
        if self._sock is None:
            raise ConnectionError(f"not connected to {self.host}:{self.port}")

    def _run_until(self, done, deadline):
        """Drive the connection until ``done()`` or ``deadline`` (monotonic);
        return ``done()``.  Messages already read satisfy ``done`` without
        touching the socket."""
        while not done():
            self._require_connection()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self._step(deadline)
        return True

    def _step(self, deadline):
        """Wait until the socket is readable (or writable with output
        pending), a keepalive timer is due, or ``deadline``; then act."""
        now = time.monotonic()
        wake = self._keepalive_check(now)
        if deadline is not None:
            wake = deadline if wake is None else min(wake, deadline)
        timeout_ms = None if wake is None else max(0, int((wake - now) * 1000.0 + 0.999))
        mask = select.POLLIN | (select.POLLOUT if self._out else 0)
        if mask != self._poll_mask:
            self._poller.modify(self._sock, mask)
            self._poll_mask = mask
        for _fd, events in self._poller.poll(timeout_ms):
            if events & select.POLLOUT:
                self._flush_out()
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read()

    def _keepalive_check(self, now):
        """MQTT 5.0 §3.1.2.10: send PINGREQ when nothing was sent for the
        keepalive (messages received do not count); no PINGRESP within
        another keepalive means the connection is dead.  Returns when to look
        again, or None when keepalive is off or not yet connected."""
        if not self._keepalive_s or self._connack is None:
            return None
        if self._ping_deadline is not None:
            if now >= self._ping_deadline:
                self._lost(f"no PINGRESP within {self._keepalive_s} s")
            return self._ping_deadline
        due = self._last_write + self._keepalive_s
        if now < due:
            return due
        self._write(_frame.encode(_frame.Pingreq(), self.version))
        self._ping_deadline = now + self._keepalive_s
        return self._ping_deadline

    def _read(self):
        packets, error = self._receive()
        for packet in packets:
            self._dispatch(packet)
        if error is not None:
            self._protocol_violation(error.reason_code, f"bad packet from the server: {error}")

    def _lost(self, why):
        self._drop_socket()
        raise ConnectionError(f"connection to {self.host}:{self.port} lost: {why}")

    def _protocol_violation(self, reason_code, why):
        self._send_disconnect(reason_code)
        self._drop_socket()
        raise errors.MQTTError(f"{why} (0x{reason_code:02X})", reason_code=reason_code)

    def _drop_socket(self):
        super()._drop_socket()
        self._subacks.clear()

    def _allocate_packet_id(self):
        # MQTT 5.0 §2.2.1: non-zero, and free among this client's own flows;
        # a subscriber's only ones are its SUBSCRIBEs, answered in turn.
        packet_id = self._next_packet_id
        self._next_packet_id = packet_id % MAX_PACKET_ID + 1
        return packet_id

    # -- packets from the server ------------------------------------------

    def _handle_connack(self, packet):
        if self._connack is not None:
            self._protocol_violation(PROTOCOL_ERROR, "a second CONNACK")
        self._connack = packet

    def _handle_publish(self, packet):
        props = packet.properties
        # MQTT 5.0 §3.1.2.11.5: no Topic Alias Maximum in CONNECT means 0, and
        # the server must not send a Topic Alias; §3.3.2.3.4 answers one with 0x94.
        if props is not None and "topic_alias" in props:
            self._protocol_violation(errors.TopicAliasInvalid.reason_code,
                                     "a Topic Alias from the server, which was allowed none")
        if packet.qos == 1:
            self._write(_frame.encode_ack(_frame.PUBACK, packet.packet_id, 0, self.version))
        elif packet.qos == 2:
            self._write(_frame.encode_ack(_frame.PUBREC, packet.packet_id, 0, self.version))
            if packet.packet_id in self._awaiting_release:
                # The same message again before its PUBREL: handed over once.
                return
            self._awaiting_release.add(packet.packet_id)
        self._messages.append(Message(packet.topic, packet.payload, packet.qos,
                                      packet.retain, props))

    def _handle_pubrel(self, packet):
        known = packet.packet_id in self._awaiting_release
        self._awaiting_release.discard(packet.packet_id)
        # MQTT 5.0 §3.7.2.1: PUBCOMP 0x92 for a flow this client has no record
        # of (a resumed session whose PUBREC an earlier process sent).
        reason = PACKET_ID_NOT_FOUND if self.version == 5 and not known else 0
        self._write(_frame.encode_ack(_frame.PUBCOMP, packet.packet_id, reason, self.version))

    def _handle_suback(self, packet):
        self._subacks[packet.packet_id] = packet

    def _handle_pingresp(self, _packet):
        self._ping_deadline = None

    def _handle_disconnect(self, packet):
        reason = (packet.properties or {}).get("reason_string")
        self._lost(f"server sent DISCONNECT 0x{packet.reason_code:02X}"
                   + (f" ({reason})" if reason else ""))

    _HANDLERS = {
        _frame.CONNACK: _handle_connack,
        _frame.PUBLISH: _handle_publish,
        _frame.PUBREL: _handle_pubrel,
        _frame.SUBACK: _handle_suback,
        _frame.PINGRESP: _handle_pingresp,
        _frame.DISCONNECT: _handle_disconnect,
    }

    def _dispatch(self, packet):
        handler = self._HANDLERS.get(packet.type)
        # MQTT 5.0 §3.2 [MQTT-3.2.0-1]: the server's first packet is CONNACK
        # (AUTH aside, and no authentication method was sent).  Nothing else
        # (PUBACK, UNSUBACK, AUTH...) answers anything a subscriber sends.
        if handler is None or (self._connack is None and packet.type != _frame.CONNACK):
            self._protocol_violation(PROTOCOL_ERROR,
                                     f"unexpected packet type {packet.type} from the server")
        handler(self, packet)
