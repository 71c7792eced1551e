"""Regression tests for the broker review fixes, end to end against the real daemon.

Each test reproduces one bug a reviewer found in the broker role and checks
the fixed behaviour on the wire (and across restarts where the bug was in
what LMDB kept):

1. 256 Subscription Identifiers on one copy broke the queue entry's u8 count,
   and the routing exception stopped every later commit (no more acks).
2. A persistent session's client id is an LMDB key: a longer one failed every
   commit; it is now refused at CONNECT (v5 0x85, 3.1.1 0x02).
3. A retained topic longer than an LMDB key failed the commit; it is keyed by
   its hash now.
4. A shared subscription's QoS 2 copy already sent stays with its member
   [MQTT-4.8.2-4/5]; a QoS 1 copy sent and unacknowledged moves on.
5. Nothing follows the server's DISCONNECT [MQTT-3.14.4-1].
6. A re-sent delivery too large for the new Maximum Packet Size no longer holds
   the Receive Maximum window for ever.
7. drop_oldest evicted a message for a duplicate that was never queued.
8. Queue entries of a session that stopped being kept came back in a new
   session of the same client id after a crash.
9. Retained messages for a new subscription were looked up before the commit
   in flight, so an older retained value could arrive after the newest one.

Raw sockets (pushcore._frame) play the clients where packet ids, DUP, retain
flags, Subscription Identifiers and wire order matter; paho-mqtt plays an
ordinary client where only the outcome does.  Absence is judged by a fence,
never by a sleep: the answer to a PINGREQ comes after every PUBLISH the
server owed the connection when it read the PINGREQ (deliveries of a batch
are written in the step that acks it).
"""

import itertools
import json
import re
import signal
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from pushcore import _frame
from pushcore.broker import MAX_STORED_CLIENT_ID
from support import Daemon

# MQTT 5.0 Session Expiry Interval of the persistent v5 clients here (seconds).
EXPIRY = 300
# MQTT 5.0 §3.2.2.2: CONNACK 0x85 Client Identifier not valid.
CONNACK_ID_NOT_VALID = 0x85
# MQTT 3.1.1 §3.2.2.3: CONNACK return code 0x02 Identifier rejected.
CONNACK_V3_ID_REJECTED = 0x02
# MQTT 5.0 §3.14.2.1: DISCONNECT 0x81 Malformed Packet.
MALFORMED_PACKET = 0x81
CONFIG = "mqtt:\n  connect_timeout: 2s\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the tests that keep to their own client ids and topics."""
    d = Daemon(tmp_path_factory.mktemp("regress"), config=CONFIG).start()
    yield d
    d.kill()


@pytest.fixture
def own_daemon(tmp_path):
    """A daemon of the test's own: it is restarted, or has its own configuration."""
    made = []

    def make(config=""):
        d = Daemon(tmp_path, config=CONFIG + config).start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


# -- raw sockets ------------------------------------------------------------------------


class Raw:
    """One MQTT connection driven packet by packet."""

    def __init__(self, daemon, version=5):
        self.version = version
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=version)
        self.buf = bytearray()
        self.pending = []

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, self.version) for p in packets))

    def send_bytes(self, data):
        self.sock.sendall(data)

    def connect(self, client_id, clean_start=True, properties=None, will=None):
        """Send CONNECT; return the CONNACK, whatever its code."""
        self.send(_frame.Connect(client_id=client_id, protocol_level=self.version, keepalive=30,
                                 clean_start=clean_start, properties=properties, will=will))
        (connack,) = self.read()
        assert connack.type == _frame.CONNACK, connack
        return connack

    def read(self, want=1, timeout=5.0):
        """The next ``want`` packets; fewer only if the server closed first."""
        deadline = time.monotonic() + timeout
        got = self.pending
        while True:
            packets, consumed, error = self.parser.parse(self.buf, 0, len(self.buf))
            assert error is None, error
            got.extend(packets)
            del self.buf[:consumed]
            if len(got) >= want:
                self.pending = got[want:]
                return got[:want]
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(got)} of {want} packets within {timeout}s: {got}"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise AssertionError(
                    f"only {len(got)} of {want} packets within {timeout}s: {got}") from None
            if not chunk:
                self.pending = []
                return got
            self.buf += chunk

    def read_until(self, found, timeout=5.0):
        """Packets up to the first for which ``found(packet)``: (the ones before, it)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(1, max(0.01, deadline - time.monotonic()))
            assert got, f"connection closed while waiting; got {before}"
            if found(got[0]):
                return before, got[0]
            before.append(got[0])

    def fence(self):
        """Every packet the server owes now: what comes before the answer to a PINGREQ."""
        self.send(_frame.Pingreq())
        before, _ = self.read_until(lambda p: p.type == _frame.PINGRESP)
        return before

    def closed(self, timeout=5.0):
        """Every packet until the server closes the connection."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server did not close the connection; got {got}"
            more = self.read(1, left)
            if not more:
                return got
            got += more

    def subscribe(self, topic_filter, qos, packet_id=1, properties=None):
        self.send(_frame.Subscribe(packet_id, [(topic_filter, qos)], properties))
        _, suback = self.read_until(lambda p: p.type == _frame.SUBACK)
        assert (suback.packet_id, suback.reason_codes) == (packet_id, [qos]), suback

    def ack(self, ptype, packet_id):
        self.send_bytes(_frame.encode_ack(ptype, packet_id, 0, self.version))

    def disconnect(self, properties=None):
        """A normal DISCONNECT; returns once the server has closed the connection."""
        self.send(_frame.Disconnect(0, properties) if self.version == 5 else _frame.Disconnect())
        assert self.read(1) == []
        self.sock.close()

    def close(self):
        self.sock.close()


def session(daemon, client_id, clean_start=True, **props):
    """A v5 connection with a persistent session (Session Expiry Interval EXPIRY)."""
    c = Raw(daemon)
    connack = c.connect(client_id, clean_start, {"session_expiry_interval": EXPIRY, **props})
    assert connack.reason_code == 0, connack
    return c, connack.session_present


def publish(daemon, *packets):
    """Send PUBLISH packets on a new v5 connection; return once every one is acked.

    A QoS 1/2 ack leaves only after its record (and the queue entries of the
    persistent sessions it was routed to) is committed.
    """
    c = Raw(daemon)
    assert c.connect(f"pub-{time.monotonic_ns()}").reason_code == 0
    c.send(*packets)
    owed = {p.packet_id: p.qos for p in packets if p.qos}
    while owed:
        got = c.read()
        assert got, f"the server closed the publisher with {sorted(owed)} unacknowledged"
        (ack,) = got
        assert ack.reason_code == 0, ack
        if ack.type == _frame.PUBREC:
            c.ack(_frame.PUBREL, ack.packet_id)
            continue
        assert (ack.type == _frame.PUBCOMP) == (owed[ack.packet_id] == 2), ack
        del owed[ack.packet_id]
    c.disconnect()


def msg(topic, payload, qos=1, packet_id=1, retain=False, **props):
    return _frame.Publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id,
                          properties=props or None)


def publishes(packets, topic=None):
    """(payload, qos, dup) of the PUBLISH packets (on ``topic`` when given)."""
    return [(p.payload, p.qos, p.dup) for p in packets
            if p.type == _frame.PUBLISH and (topic is None or p.topic == topic)]


def assert_publishers_acked(daemon):
    """An unrelated QoS 1 publisher still gets its PUBACK: commits are not stuck."""
    publish(daemon, msg("regress/unrelated", b"still acked"))


def sub_ids(p):
    ids = p.properties["subscription_identifier"]
    return ids if isinstance(ids, list) else [ids]


def metrics(daemon):
    """The daemon's counters, as SIGUSR1 logs them."""
    pattern = re.compile(r"metrics (\{.*\})")
    before = len(pattern.findall(daemon.log()))
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while True:
        found = pattern.findall(daemon.log())
        if len(found) > before:
            return json.loads(found[-1])
        assert time.monotonic() < deadline, "no metrics line after SIGUSR1"
        time.sleep(0.02)


# -- 1. many Subscription Identifiers on one copy ---------------------------------------------


def test_256_subscription_identifiers_on_one_copy(own_daemon):
    d = own_daemon()
    topic = "a/b/c/d/e/f/g/h"
    levels = topic.split("/")
    # Every combination of literal and '+' levels: 256 distinct filters, all matching.
    filters = ["/".join(level if keep else "+" for level, keep in zip(levels, bits))
               for bits in itertools.product((True, False), repeat=len(levels))]
    assert len(set(filters)) == 256
    s, _ = session(d, "many-ids")
    s.send(*[_frame.Subscribe(i, [(f, 1)], {"subscription_identifier": [i]})
             for i, f in enumerate(filters, 1)])
    subacks = s.read(256)
    assert [(p.type, p.packet_id, p.reason_codes) for p in subacks] == \
        [(_frame.SUBACK, i, [1]) for i in range(1, 257)]

    publish(d, msg(topic, b"boom"))
    assert_publishers_acked(d)
    # MQTT 5.0 §3.3.4: one copy (the documented choice), carrying every matching
    # subscription's identifier.
    (p,) = s.fence()
    assert (p.type, p.payload, p.qos, p.dup) == (_frame.PUBLISH, b"boom", 1, False)
    assert sorted(sub_ids(p)) == list(range(1, 257))
    s.ack(_frame.PUBACK, p.packet_id)
    s.disconnect()

    # The same copy queued offline is a queue entry with 256 ids: stored, and read
    # back after a crash.
    publish(d, msg(topic, b"offline"))
    d.kill()
    d.start()
    s, present = session(d, "many-ids", clean_start=False)
    assert present is True
    (p,) = s.fence()
    assert (p.payload, p.qos, p.dup) == (b"offline", 1, False)
    assert sorted(sub_ids(p)) == list(range(1, 257))
    s.disconnect()


# -- 2. client ids too long for a stored session ----------------------------------------------


def test_client_id_too_long_for_a_kept_session_is_refused(daemon):
    long5 = "L" * 600
    assert len(long5) > MAX_STORED_CLIENT_ID
    for clean_start in (True, False):
        c = Raw(daemon)
        connack = c.connect(long5, clean_start, {"session_expiry_interval": EXPIRY})
        # MQTT 5.0 §3.2.2.2: 0x85 Client Identifier not valid, then the server closes.
        assert connack.reason_code == CONNACK_ID_NOT_VALID, connack
        assert c.closed() == []
        assert_publishers_acked(daemon)

    # Session Expiry 0 keeps nothing: the same id is an ordinary client (paho, MQTT 5).
    got = []
    ready = threading.Event()
    arrived = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=long5,
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, rc, _p: (got.append(rc.value), ready.set())
    client.on_subscribe = lambda _c, _u, _m, rcs, _p: (got.append([r.value for r in rcs]),
                                                      ready.set())
    client.on_message = lambda _c, _u, m: (got.append((m.topic, m.payload, m.qos)),
                                           arrived.set())
    client.connect(daemon.host, daemon.port, keepalive=30)
    client.loop_start()
    try:
        assert ready.wait(5) and got == [0]
        ready.clear()
        client.subscribe("longid/t", 1)
        assert ready.wait(5) and got == [0, [1]]
        publish(daemon, msg("longid/t", b"to the long id"))
        assert arrived.wait(5)
        assert got == [0, [1], ("longid/t", b"to the long id", 1)]
    finally:
        client.disconnect()
        client.loop_stop()
    assert_publishers_acked(daemon)

    # MQTT 3.1.1 CleanSession 0 keeps the session: a 300-byte id is rejected (0x02) ...
    long3 = "M" * 300
    c = Raw(daemon, 4)
    connack = c.connect(long3, clean_start=False)
    assert connack.reason_code == CONNACK_V3_ID_REJECTED, connack
    assert c.closed() == []
    assert_publishers_acked(daemon)
    # ... while CleanSession 1 keeps nothing and is accepted.
    c = Raw(daemon, 4)
    assert c.connect(long3, clean_start=True).reason_code == 0
    c.disconnect()

    # The longest id a kept session may have still keeps it.
    edge = "E" * MAX_STORED_CLIENT_ID
    c, present = session(daemon, edge)
    assert present is False
    c.subscribe("longid/edge", 1)
    c.disconnect()
    publish(daemon, msg("longid/edge", b"kept"))
    c, present = session(daemon, edge, clean_start=False)
    assert present is True
    assert publishes(c.fence()) == [(b"kept", 1, False)]
    c.disconnect({"session_expiry_interval": 0})
    assert_publishers_acked(daemon)


# -- 3. retained message on a topic longer than an LMDB key ----------------------------------


def test_retained_message_on_a_600_byte_topic(own_daemon):
    d = own_daemon()
    # Two 600-byte topics that differ only in their last byte: one stored key each.
    stem = "r/" + "x" * 597
    ta, tb = stem + "a", stem + "b"
    assert len(ta.encode()) == 600

    def retained_now():
        s = Raw(d)
        assert s.connect(f"rsub-{time.monotonic_ns()}").reason_code == 0
        s.subscribe("r/+", 1)
        # A clean session's retained messages follow its SUBACK once the batch in
        # flight is committed: a publisher's ack is the fence for that commit.
        assert_publishers_acked(d)
        got = sorted((p.topic, p.payload, p.retain) for p in s.fence())
        s.disconnect()
        return got

    publish(d, msg(ta, b"va", retain=True), msg(tb, b"vb", packet_id=2, retain=True))
    assert_publishers_acked(d)
    # MQTT 5.0 §3.3.1.3: sent to a later subscriber with RETAIN 1.
    assert retained_now() == [(ta, b"va", True), (tb, b"vb", True)]

    assert d.stop() == 0
    d.start()
    assert retained_now() == [(ta, b"va", True), (tb, b"vb", True)]

    # An empty payload clears that topic's retained message, and only that one.
    publish(d, msg(ta, b"", retain=True))
    assert_publishers_acked(d)
    assert retained_now() == [(tb, b"vb", True)]
    assert d.stop() == 0
    d.start()
    assert retained_now() == [(tb, b"vb", True)]


# -- 4. shared subscriptions: who keeps a copy when a member leaves ---------------------------


def test_shared_qos2_copy_stays_with_its_member_qos1_copy_moves(daemon):
    b = Raw(daemon)
    assert b.connect("share-B").reason_code == 0
    b.subscribe("$share/g4/sh/t2", 2, 1)
    b.subscribe("$share/g4b/sh/t1", 1, 2)
    # The members' Wills: once B has one, the server has handled that member's end.
    b.subscribe("sh/will/#", 0, 3)
    b_got = []

    def until_member_holds_one(member, topic, qos):
        """Publish one message at a time until ``member`` holds one (round-robin spreads)."""
        for n in range(4):
            publish(daemon, msg(topic, b"%s-%d" % (topic.encode(), n), qos=qos))
            b_got.extend(b.fence())
            held = [p for p in member.fence() if p.type == _frame.PUBLISH]
            if held:
                return held
        raise AssertionError(f"{topic}: no copy reached the member in 4 messages")

    # QoS 2: A receives a copy and does not PUBREC it, then its socket closes.
    a = Raw(daemon)
    connack = a.connect("share-A2", True, {"session_expiry_interval": EXPIRY},
                        _frame.Will("sh/will/A2", b"gone"))
    assert connack.reason_code == 0
    a.subscribe("$share/g4/sh/t2", 2)
    held = until_member_holds_one(a, "sh/t2", 2)
    assert all((p.qos, p.dup) == (2, False) for p in held), held
    a.close()
    before, will = b.read_until(lambda p: p.type == _frame.PUBLISH and p.topic == "sh/will/A2")
    after = b.fence()
    # MQTT 5.0 §4.8.2 [MQTT-4.8.2-4/5]: a QoS 2 copy already sent is completed with
    # that member; B must not get it.
    assert publishes(before + after, "sh/t2") == []
    for p in b_got:
        if p.type == _frame.PUBLISH and p.qos == 2:
            assert p.payload not in {h.payload for h in held}

    # A comes back: the same copies again, DUP set, same packet ids, in order.
    a, present = session(daemon, "share-A2", clean_start=False)
    assert present is True
    again = a.fence()
    assert [(p.payload, p.qos, p.dup, p.packet_id) for p in again] == \
        [(p.payload, 2, True, p.packet_id) for p in held]
    for p in again:
        a.ack(_frame.PUBREC, p.packet_id)
        (rel,) = a.read()
        assert (rel.type, rel.packet_id) == (_frame.PUBREL, p.packet_id)
        a.ack(_frame.PUBCOMP, p.packet_id)
    assert a.fence() == []
    a.disconnect({"session_expiry_interval": 0})

    # QoS 1: a copy sent to A1 and unacknowledged goes to B when A1 leaves.
    b_got.clear()
    a = Raw(daemon)
    connack = a.connect("share-A1", True, {"session_expiry_interval": EXPIRY},
                        _frame.Will("sh/will/A1", b"gone"))
    assert connack.reason_code == 0
    a.subscribe("$share/g4b/sh/t1", 1)
    held = until_member_holds_one(a, "sh/t1", 1)
    for p in b_got:
        if p.type == _frame.PUBLISH and p.qos:
            b.ack(_frame.PUBACK, p.packet_id)
    a.close()
    before, _ = b.read_until(lambda p: p.type == _frame.PUBLISH and p.topic == "sh/will/A1")
    moved = before + b.fence()
    assert publishes(moved, "sh/t1") == [(p.payload, 1, False) for p in held]
    # Handed over, it is no longer A1's.
    a, present = session(daemon, "share-A1", clean_start=False)
    assert present is True
    assert a.fence() == []
    a.disconnect({"session_expiry_interval": 0})
    b.disconnect()


# -- 5. nothing after the server's DISCONNECT --------------------------------------------------


def test_no_publish_follows_the_servers_disconnect(daemon):
    s = Raw(daemon)
    assert s.connect("after-dc", properties={"receive_maximum": 1}).reason_code == 0
    s.subscribe("dc/t", 1)
    publish(daemon, *[msg("dc/t", b"m%d" % i, packet_id=i) for i in range(1, 4)])
    (first,) = s.read()
    assert (first.type, first.payload) == (_frame.PUBLISH, b"m1")
    # The PUBACK frees the window and a malformed packet (reserved type 0) follows
    # it in the same segment: the server disconnects while it has more to send.
    s.send_bytes(_frame.encode_ack(_frame.PUBACK, first.packet_id, 0, 5) + b"\x00\x00")
    rest = s.closed()
    kinds = [p.type for p in rest]
    assert _frame.DISCONNECT in kinds, rest
    dc = kinds.index(_frame.DISCONNECT)
    assert rest[dc].reason_code == MALFORMED_PACKET
    # MQTT 5.0 §3.14.4 [MQTT-3.14.4-1]: the server sends no packet after DISCONNECT.
    assert rest[dc + 1:] == []


# -- 6. a re-sent delivery over the new Maximum Packet Size -----------------------------------


def test_resend_too_large_for_new_maximum_packet_size_frees_the_window(daemon):
    s, _ = session(daemon, "mps", receive_maximum=1)
    s.subscribe("mps/t", 1)
    publish(daemon, msg("mps/t", b"B" * 500))
    (big,) = s.fence()
    assert (big.payload, big.qos) == (b"B" * 500, 1)
    s.disconnect()   # not acknowledged

    skipped = metrics(daemon).get("deliveries_skipped_too_large", 0)
    s, present = session(daemon, "mps", clean_start=False, receive_maximum=1,
                         maximum_packet_size=100)
    assert present is True
    # MQTT 5.0 §3.1.2.11.4 [MQTT-3.1.2-25]: the re-send would exceed the client's
    # Maximum Packet Size: not sent, counted, and out of the window.
    assert s.fence() == []
    assert metrics(daemon)["deliveries_skipped_too_large"] == skipped + 1
    publish(daemon, msg("mps/t", b"s1"), msg("mps/t", b"s2", packet_id=2))
    (p,) = s.read()
    assert (p.payload, p.qos, p.dup) == (b"s1", 1, False)
    s.ack(_frame.PUBACK, p.packet_id)
    (p,) = s.read()
    assert (p.payload, p.qos, p.dup) == (b"s2", 1, False)
    s.ack(_frame.PUBACK, p.packet_id)
    assert s.fence() == []
    s.disconnect({"session_expiry_interval": 0})


# -- 7. drop_oldest and a duplicate ------------------------------------------------------------


def test_drop_oldest_evicts_nothing_for_a_duplicate(own_daemon):
    d = own_daemon("sessions:\n  queue_full: drop_oldest\n  max_queued_messages: 2\n")
    s, _ = session(d, "dropper")
    s.subscribe("dq/t", 1)
    s.disconnect()

    def with_id(payload, msg_id, packet_id=1):
        return msg("dq/t", payload, packet_id=packet_id, user_property=[("id", msg_id)])

    publish(d, with_id(b"m1", "dq-1"), with_id(b"m2", "dq-2", 2))
    # m2 again, with its message id (dedup.id_property): acked, not stored again.
    publish(d, with_id(b"m2", "dq-2"))
    s, present = session(d, "dropper", clean_start=False)
    assert present is True
    got = s.fence()
    assert publishes(got) == [(b"m1", 1, False), (b"m2", 1, False)]
    for p in got:
        s.ack(_frame.PUBACK, p.packet_id)
    s.disconnect()

    # Three new messages for two places: the oldest one goes, as configured.
    publish(d, with_id(b"m3", "dq-3"), with_id(b"m4", "dq-4", 2), with_id(b"m5", "dq-5", 3))
    s, present = session(d, "dropper", clean_start=False)
    assert present is True
    assert publishes(s.fence()) == [(b"m4", 1, False), (b"m5", 1, False)]
    assert metrics(d)["queue_full_dropped"] == 1
    s.disconnect()


# -- 8. queue entries of an ended session after a crash --------------------------------------


def test_ended_session_leaves_no_messages_for_the_next_one(own_daemon):
    d = own_daemon()
    s, _ = session(d, "S7")
    s.subscribe("t/7", 1)
    s.disconnect()
    publish(d, msg("t/7", b"m1"), msg("t/7", b"m2", packet_id=2))

    # Back with Session Expiry 0 (absent): the session now ends with this connection.
    s = Raw(d)
    connack = s.connect("S7", clean_start=False, properties={"receive_maximum": 1})
    assert (connack.reason_code, connack.session_present) == (0, True)
    (p,) = s.read()
    assert p.payload == b"m1"
    # Everything handled so far is committed once a later publish is acked.
    assert_publishers_acked(d)
    d.kill()
    d.start()

    # A new persistent session of the same id, and a new message for it.
    s, present = session(d, "S7")
    assert present is False
    s.subscribe("t/7", 1)
    s.disconnect()
    publish(d, msg("t/7", b"m3"))
    d.kill()
    d.start()

    s, present = session(d, "S7", clean_start=False)
    assert present is True
    assert publishes(s.fence()) == [(b"m3", 1, False)]
    s.disconnect()


# -- 9. retained message and live copy on SUBSCRIBE --------------------------------------------


@pytest.mark.parametrize("who", ["subscriber", "other"])
def test_newest_retained_value_is_the_last_one_received(daemon, who):
    """A newer retained message published as the SUBSCRIBE is handled ends up last.

    ``subscriber``: the SUBSCRIBE and the new retained PUBLISH come in one
    segment from the subscriber itself, so they are handled in one batch
    (deterministic).  ``other``: another client publishes it at the same time
    (a race; the invariant must hold whichever way it goes).
    """
    pub = Raw(daemon)
    assert pub.connect(f"rl-pub-{who}").reason_code == 0
    for n in range(5):
        topic = f"rl/{who}/{n}"
        publish(daemon, msg(topic, b"OLD", retain=True))
        s, _ = session(daemon, f"rl-{who}-{n}")
        subscribe = _frame.Subscribe(1, [(topic, 1)])
        if who == "subscriber":
            s.send(subscribe, msg(topic, b"NEW", qos=0, retain=True))
        else:
            s.send(subscribe)
            pub.send(msg(topic, b"NEW", packet_id=n + 1, retain=True))
            (ack,) = pub.read()
            assert (ack.type, ack.packet_id, ack.reason_code) == (_frame.PUBACK, n + 1, 0)
        before, suback = s.read_until(lambda p: p.type == _frame.SUBACK)
        assert suback.reason_codes == [1]
        got = [p.payload for p in before + s.fence() if p.type == _frame.PUBLISH]
        assert set(got) <= {b"OLD", b"NEW"} and got, got
        # MQTT 5.0 §3.3.1.3: the retained message sent is the topic's latest; no
        # older value may overtake the newest.
        assert got[-1] == b"NEW", got
        s.disconnect({"session_expiry_interval": 0})
    pub.disconnect()
