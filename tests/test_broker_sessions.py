"""Persistent sessions and outbound flow control, end to end against the real daemon.

MQTT 3.1.1 CleanSession 0 and MQTT 5.0 Clean Start + Session Expiry Interval
(§3.1.2.4, §3.1.2.11.2): Session Present, subscriptions and queued QoS 1/2
messages kept across reconnects and across daemon restarts (SIGTERM and
SIGKILL), unacknowledged deliveries re-sent with DUP and their packet ids
(§4.4), session expiry, the outbound window (Receive Maximum §3.3.4 /
mqtt.max_inflight_out) and the session queue limits (sessions.*).

paho-mqtt plays the real device where only payloads and flags matter; a raw
socket (pushcore._frame) plays it where the exact packets count: DUP flags,
packet ids, PUBREL versus PUBLISH, how many PUBLISHes are in flight.

Absence is never judged by waiting: a PINGREQ is the fence.  The daemon writes
a batch's deliveries to the subscribers' output in the same step, after the
commit, as the publisher's acks; once the test has read the last ack, every
PUBLISH owed to a subscriber is in its output ahead of the PINGRESP that
answers a later PINGREQ.  (Receive Maximum enforced on a publishing client,
DISCONNECT 0x93, is tested in test_e2e_mqtt.py.)
"""

import json
import re
import signal
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pushcore import _frame
from support import Daemon

# MQTT 5.0 Session Expiry Interval the persistent v5 clients ask for (seconds).
EXPIRY = 300
# MQTT 5.0 §3.14.2.1: DISCONNECT reason codes the server sends here.
PROTOCOL_ERROR = 0x82
SERVER_SHUTTING_DOWN = 0x8B


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the tests that use their own client ids and topics."""
    d = Daemon(tmp_path_factory.mktemp("sessions"), config="mqtt:\n  connect_timeout: 2s\n").start()
    yield d
    d.kill()


@pytest.fixture
def own_daemon(tmp_path):
    """A daemon of the test's own (restarted, or with its own configuration)."""
    daemons = []

    def make(config=""):
        d = Daemon(tmp_path, config="mqtt:\n  connect_timeout: 2s\n" + config).start()
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.kill()


# -- raw sockets ------------------------------------------------------------------------


class Raw:
    """One MQTT connection driven packet by packet."""

    def __init__(self, daemon, version=5):
        self.version = version
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=version)
        self.buf = bytearray()
        # Packets parsed but not yet returned by read().
        self.pending = []

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, self.version) for p in packets))

    def send_bytes(self, data):
        self.sock.sendall(data)

    def connect(self, client_id, clean_start=True, properties=None):
        self.send(_frame.Connect(client_id=client_id, protocol_level=self.version, keepalive=30,
                                 clean_start=clean_start, properties=properties))
        (connack,) = self.read()
        assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0)
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
            if not chunk:
                self.pending = []
                return got
            self.buf += chunk

    def read_until(self, ptype, timeout=5.0):
        """Packets up to the first of type ``ptype``: (the ones before it, it)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            got = self.read(1, max(0.01, deadline - time.monotonic()))
            assert got, f"connection closed before packet type {ptype}; got {before}"
            if got[0].type == ptype:
                return before, got[0]
            before.append(got[0])

    def fence(self):
        """Every packet the server owes now: what comes before the answer to a PINGREQ."""
        self.send(_frame.Pingreq())
        before, _ = self.read_until(_frame.PINGRESP)
        return before

    def subscribe(self, topic_filter, qos, packet_id=1):
        self.send(_frame.Subscribe(packet_id, [(topic_filter, qos)]))
        before, suback = self.read_until(_frame.SUBACK)
        assert before == []
        assert suback.packet_id == packet_id and suback.reason_codes == [qos]

    def puback(self, *packet_ids):
        self.send_bytes(b"".join(_frame.encode_ack(_frame.PUBACK, i, 0, self.version)
                                 for i in packet_ids))

    def disconnect(self, properties=None):
        """A normal DISCONNECT; returns once the server has closed the connection.

        The server closes the socket and ends the connection's session state in
        one step of its loop, so after EOF the broker sees the session offline.
        """
        self.send(_frame.Disconnect(0, properties) if self.version == 5 else _frame.Disconnect())
        assert self.read(1) == []
        self.sock.close()

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

    def close(self):
        self.sock.close()


def session(daemon, client_id, version=5, clean_start=False, expiry=EXPIRY, **props):
    """A raw connection with a persistent session (v5: Session Expiry Interval ``expiry``)."""
    c = Raw(daemon, version)
    if version == 5:
        if expiry:
            props["session_expiry_interval"] = expiry
        connack = c.connect(client_id, clean_start, props or None)
    else:
        connack = c.connect(client_id, clean_start)
    return c, connack.session_present


def publish(daemon, topic, items, version=5):
    """Publish ``items`` ((payload, qos) pairs) in one burst; return once all are acked.

    Every ack leaves only after the record is committed, and with it the queue
    entries of the persistent sessions it was routed to.
    """
    c = Raw(daemon, version)
    c.connect(f"pub-{time.monotonic_ns()}")
    c.send(*[_frame.Publish(topic, payload, qos=qos, packet_id=i)
             for i, (payload, qos) in enumerate(items, 1)])
    owed = {i: qos for i, (_payload, qos) in enumerate(items, 1) if qos}
    while owed:
        (p,) = c.read()
        assert p.reason_code == 0, p
        if p.type == _frame.PUBREC:
            c.send_bytes(_frame.encode_ack(_frame.PUBREL, p.packet_id, 0, version))
        else:
            assert p.type in (_frame.PUBACK, _frame.PUBCOMP), p
            assert (p.type == _frame.PUBCOMP) == (owed[p.packet_id] == 2), p
            del owed[p.packet_id]
    c.disconnect()


def qos1(*payloads):
    return [(p, 1) for p in payloads]


def publishes(packets):
    assert all(p.type == _frame.PUBLISH for p in packets), packets
    return [(p.payload, p.qos, p.dup) for p in packets]


def per_qos(messages):
    """Messages grouped by QoS, each group in the order received.

    paho hands a QoS 2 message to on_message when the PUBREL arrives, a QoS 1
    one on the PUBLISH, so across QoS levels paho's order is not the wire's;
    within one level it is (the wire order is checked with raw sockets).
    """
    return {qos: [m for m in messages if m[2] == qos] for qos in (0, 1, 2)}


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


def stored_session(daemon, client_id):
    """`pushcore sessions --client ID --json`: the session as LMDB holds it."""
    out = daemon.cli("sessions", "--data", daemon.data_dir, "--client", client_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# -- paho --------------------------------------------------------------------------------


class PahoSession:
    """A paho-mqtt client: CONNACK's Session Present, SUBACKs and messages received."""

    def __init__(self, daemon, version, client_id, clean, expiry=EXPIRY):
        self.messages = []
        self.cond = threading.Condition()
        self.subacks = []
        connected = threading.Event()
        if version == 5:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv311, clean_session=clean)

        def on_connect(_client, _userdata, flags, reason_code, _properties):
            self.reason_code = reason_code
            self.present = flags.session_present
            connected.set()

        def on_message(_client, _userdata, msg):
            with self.cond:
                self.messages.append(msg)
                self.cond.notify_all()

        def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
            with self.cond:
                self.subacks.append([rc.value for rc in reason_codes])
                self.cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.on_subscribe = on_subscribe
        if version == 5:
            props = None
            if expiry:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = expiry
            self.client.connect(daemon.host, daemon.port, keepalive=30, clean_start=clean,
                                properties=props)
        else:
            self.client.connect(daemon.host, daemon.port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(5), "paho got no CONNACK"
        assert self.reason_code == 0

    def subscribe(self, topic_filter, qos):
        self.client.subscribe(topic_filter, qos)
        with self.cond:
            assert self.cond.wait_for(lambda: self.subacks, 5), "no SUBACK"
            assert self.subacks.pop() == [qos]

    def take(self, n, timeout=5.0):
        """The first ``n`` messages received, as (topic, payload, qos)."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"{len(self.messages)} of {n} messages: {[m.payload for m in self.messages]}"
            return [(m.topic, m.payload, m.qos) for m in self.messages[:n]]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# -- Session Present, subscriptions and queues across reconnects ---------------------------


@pytest.mark.parametrize("version", [4, 5])
def test_persistent_session_keeps_subscription_and_offline_messages(daemon, version):
    cid = f"keep-{version}"
    topic = f"keep/{version}/t"
    first = PahoSession(daemon, version, cid, clean=False)
    # MQTT 3.1.1 §3.2.2.2 / 5.0 §3.2.2.1.1: no session stored yet.
    assert first.present is False
    first.subscribe(f"keep/{version}/#", 2)
    first.close()

    # QoS 1 and 2 interleaved while the subscriber is away: queued in LMDB, in order.
    items = [(b"m0", 1), (b"m1", 2), (b"m2", 1), (b"m3", 2), (b"m4", 2), (b"m5", 1)]
    publish(daemon, topic, items)

    again = PahoSession(daemon, version, cid, clean=False)
    assert again.present is True
    # No SUBSCRIBE this time: the stored subscription delivers, at the message's QoS.
    assert per_qos(again.take(6)) == per_qos([(topic, p, q) for p, q in items])
    # Still subscribed for live messages too.
    publish(daemon, topic, [(b"live", 1)])
    assert again.take(7)[-1] == (topic, b"live", 1)
    again.close()


@pytest.mark.parametrize("version", [4, 5])
def test_clean_start_discards_the_stored_session(daemon, version):
    cid = f"discard-{version}"
    first = PahoSession(daemon, version, cid, clean=False)
    first.subscribe(f"discard/{version}/#", 1)
    first.close()
    publish(daemon, f"discard/{version}/a", qos1(b"queued"))

    # MQTT 3.1.1 §3.1.2.4 / 5.0 §3.1.2.4: Clean Start 1 discards the session.
    clean = PahoSession(daemon, version, cid, clean=True, expiry=0)
    assert clean.present is False
    clean.close()

    # Nothing survived it: no session, no subscription, no queued message.
    after = PahoSession(daemon, version, cid, clean=False)
    assert after.present is False
    after.subscribe(f"discard/{version}/fence", 1)
    publish(daemon, f"discard/{version}/a", qos1(b"unwanted"))
    publish(daemon, f"discard/{version}/fence", qos1(b"fence"))
    assert after.take(1) == [(f"discard/{version}/fence", b"fence", 1)]
    assert [m.payload for m in after.messages] == [b"fence"]
    after.close()


def test_v5_session_without_expiry_ends_with_the_connection(daemon):
    # MQTT 5.0 §3.1.2.11.2: an absent Session Expiry Interval is 0, the session
    # ends when the connection closes, even with Clean Start 0.
    c, present = session(daemon, "noexpiry", expiry=0)
    assert present is False
    c.subscribe("noexpiry/t", 1)
    c.disconnect()
    publish(daemon, "noexpiry/t", qos1(b"lost"))
    c, present = session(daemon, "noexpiry", expiry=EXPIRY)
    assert present is False
    assert c.fence() == []
    c.disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_offline_messages_leave_in_publish_order_on_the_wire(daemon, version):
    cid = f"wire-{version}"
    c, present = session(daemon, cid, version, clean_start=version == 5)
    assert present is False
    c.subscribe(f"wire/{version}", 2)
    c.disconnect()
    items = [(b"m0", 2), (b"m1", 1), (b"m2", 2), (b"m3", 1), (b"m4", 1), (b"m5", 2)]
    publish(daemon, f"wire/{version}", items)

    c, present = session(daemon, cid, version)
    assert present is True
    got = c.fence()
    assert publishes(got) == [(p, q, False) for p, q in items]
    for p in got:
        if p.qos == 1:
            c.puback(p.packet_id)
        else:
            c.send_bytes(_frame.encode_ack(_frame.PUBREC, p.packet_id, 0, version))
            (rel,) = c.read(1)
            assert (rel.type, rel.packet_id) == (_frame.PUBREL, p.packet_id)
            c.send_bytes(_frame.encode_ack(_frame.PUBCOMP, p.packet_id, 0, version))
    assert c.fence() == []
    c.disconnect()


# -- daemon restarts ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
@pytest.mark.parametrize("version", [4, 5])
def test_offline_messages_survive_a_restart(own_daemon, version, how):
    d = own_daemon()
    cid = f"restart-{version}"
    sub = PahoSession(d, version, cid, clean=False)
    sub.subscribe("restart/#", 2)
    sub.close()
    items = [(b"a", 1), (b"b", 2), (b"c", 1), (b"d", 2)]
    publish(d, "restart/x", items)

    if how == "sigterm":
        assert d.stop() == 0
    else:
        d.kill()
    d.start()

    again = PahoSession(d, version, cid, clean=False)
    assert again.present is True
    assert per_qos(again.take(4)) == per_qos([("restart/x", p, q) for p, q in items])
    # The subscription came back with the session: a new message arrives unasked.
    publish(d, "restart/y", [(b"e", 2)])
    assert again.take(5)[-1] == ("restart/y", b"e", 2)
    again.close()


# -- unacknowledged deliveries: DUP and the same packet ids (MQTT 5.0 §4.4) -------------------


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_deliveries_resent_with_dup_before_newer_ones(daemon, version):
    cid = f"dup-{version}"
    topic = f"dup/{version}"
    # A fresh session: v5 Clean Start 1 with an expiry; 3.1.1 CleanSession 0 (a new id).
    c, _ = session(daemon, cid, version, clean_start=version == 5)
    c.subscribe(topic, 1)
    publish(daemon, topic, qos1(b"m0", b"m1", b"m2"))
    sent = c.read(3)
    assert publishes(sent) == [(b"m0", 1, False), (b"m1", 1, False), (b"m2", 1, False)]
    ids = [p.packet_id for p in sent]
    assert len(set(ids)) == 3
    # No PUBACK: the client goes away with all three unacknowledged.
    c.disconnect()
    publish(daemon, topic, qos1(b"n0", b"n1"))

    c, present = session(daemon, cid, version)
    assert present is True
    again = c.fence()
    # MQTT 3.1.1 §4.4 / 5.0 §4.4 [MQTT-4.4.0-1]: re-sent with DUP 1 [MQTT-3.3.1-1], the
    # original packet ids, in their order, before anything newer.
    assert publishes(again) == [(b"m0", 1, True), (b"m1", 1, True), (b"m2", 1, True),
                                (b"n0", 1, False), (b"n1", 1, False)]
    assert [p.packet_id for p in again[:3]] == ids
    assert not set(p.packet_id for p in again[3:]) & set(ids)
    c.puback(*[p.packet_id for p in again])
    assert c.fence() == []
    c.disconnect()

    # Acknowledged is done: nothing is re-sent on the next reconnect.
    c, present = session(daemon, cid, version)
    assert present is True
    assert c.fence() == []
    c.disconnect()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_unacked_deliveries_resent_with_dup_after_a_restart(own_daemon, how):
    d = own_daemon()
    c, _ = session(d, "dup-restart", clean_start=True)
    c.subscribe("duprs/t", 1)
    publish(d, "duprs/t", qos1(b"m0", b"m1", b"m2"))
    sent = c.read(3)
    ids = [p.packet_id for p in sent]
    assert publishes(sent) == [(b"m0", 1, False), (b"m1", 1, False), (b"m2", 1, False)]
    # The packet ids of sent copies are written with the next commit: this publish
    # makes one, and its ack says it is done.
    publish(d, "duprs/t", qos1(b"m3"))
    (m3,) = c.read(1)
    assert publishes([m3]) == [(b"m3", 1, False)]

    if how == "sigterm":
        assert d.stop() == 0
        (bye,) = c.closed()
        assert (bye.type, bye.reason_code) == (_frame.DISCONNECT, SERVER_SHUTTING_DOWN)
    else:
        d.kill()
        assert c.closed() == []
    c.close()
    queued = stored_session(d, "dup-restart")["queue"]
    assert [(e["sent"], e["packet_id"]) for e in queued[:3]] == [(True, i) for i in ids]
    d.start()

    c, present = session(d, "dup-restart")
    assert present is True
    again = c.fence()
    assert [(p.payload, p.dup, p.packet_id) for p in again[:3]] == \
        [(b"m0", True, ids[0]), (b"m1", True, ids[1]), (b"m2", True, ids[2])]
    assert [p.payload for p in again] == [b"m0", b"m1", b"m2", b"m3"]
    if how == "sigterm":
        # A drain commits the last packet-id writes too: m3 is known as sent.
        assert (again[3].dup, again[3].packet_id) == (True, m3.packet_id)
    c.puback(*[p.packet_id for p in again])
    publish(d, "duprs/t", qos1(b"m4"))
    assert publishes(c.read(1)) == [(b"m4", 1, False)]
    c.disconnect()


def test_qos2_after_pubrec_a_reconnect_resends_pubrel_not_publish(daemon):
    c, _ = session(daemon, "rel", clean_start=True)
    c.subscribe("rel/t", 2)
    publish(daemon, "rel/t", [(b"a", 2), (b"b", 2)])
    a, b = c.read(2)
    assert publishes([a, b]) == [(b"a", 2, False), (b"b", 2, False)]
    # PUBREC for b only: a stays unreceived, b is between PUBREC and PUBCOMP.
    c.send_bytes(_frame.encode_ack(_frame.PUBREC, b.packet_id, 0, 5))
    (rel,) = c.read(1)
    assert (rel.type, rel.packet_id) == (_frame.PUBREL, b.packet_id)
    c.disconnect()

    c, present = session(daemon, "rel")
    assert present is True
    again = c.fence()
    # MQTT 5.0 §4.4 [MQTT-4.4.0-1]: the PUBLISH not yet PUBREC'd again with DUP, and
    # for the PUBREC'd one only its PUBREL, each with its packet id, in order.
    assert [(p.type, p.packet_id) for p in again] == \
        [(_frame.PUBLISH, a.packet_id), (_frame.PUBREL, b.packet_id)]
    assert (again[0].payload, again[0].qos, again[0].dup) == (b"a", 2, True)
    c.send_bytes(_frame.encode_ack(_frame.PUBCOMP, b.packet_id, 0, 5) +
                 _frame.encode_ack(_frame.PUBREC, a.packet_id, 0, 5))
    (rel,) = c.read(1)
    assert (rel.type, rel.packet_id) == (_frame.PUBREL, a.packet_id)
    c.send_bytes(_frame.encode_ack(_frame.PUBCOMP, a.packet_id, 0, 5))
    assert c.fence() == []
    c.disconnect()

    c, present = session(daemon, "rel")
    assert present is True
    assert c.fence() == []
    c.disconnect()


# -- session expiry (MQTT 5.0 §3.1.2.11.2, §3.14.2.2.2) ------------------------------------


def test_v5_session_expires_after_its_interval(daemon):
    c, _ = session(daemon, "expiring-1s", clean_start=True, expiry=1)
    c.subscribe("expiry/t", 1)
    c.disconnect()
    publish(daemon, "expiry/t", qos1(b"while-kept"))
    # Setup, not an assertion: let the 1 s interval pass with a margin.
    time.sleep(2.5)
    publish(daemon, "expiry/t", qos1(b"after-expiry"))

    c, present = session(daemon, "expiring-1s")
    assert present is False
    # Neither the queued message nor the subscription is left.
    assert c.fence() == []
    c.subscribe("expiry/fence", 1, packet_id=2)
    publish(daemon, "expiry/t", qos1(b"late"))
    publish(daemon, "expiry/fence", qos1(b"fence"))
    (got,) = c.read(1)
    assert (got.topic, got.payload) == ("expiry/fence", b"fence")
    c.puback(got.packet_id)
    assert c.fence() == []
    c.disconnect()


def test_v5_disconnect_cannot_give_expiry_to_a_session_that_had_none(daemon):
    c, _ = session(daemon, "no-late-expiry", clean_start=True, expiry=0)
    c.subscribe("latexp/t", 1)
    c.send(_frame.Disconnect(0, {"session_expiry_interval": 60}))
    # MQTT 5.0 §3.14.2.2.2 [MQTT-3.14.2-2]: a Protocol Error, DISCONNECT 0x82.
    (bye,) = c.closed()
    assert (bye.type, bye.reason_code) == (_frame.DISCONNECT, PROTOCOL_ERROR)
    c.close()
    c, present = session(daemon, "no-late-expiry")
    assert present is False
    c.disconnect()


def test_v5_disconnect_with_expiry_0_ends_a_persistent_session(daemon):
    c, _ = session(daemon, "end-at-disconnect", clean_start=True)
    c.subscribe("endexp/t", 1)
    c.disconnect({"session_expiry_interval": 0})
    publish(daemon, "endexp/t", qos1(b"nobody"))
    c, present = session(daemon, "end-at-disconnect")
    assert present is False
    assert c.fence() == []
    c.disconnect()


# -- outbound flow control ---------------------------------------------------------------


def test_v5_receive_maximum_bounds_deliveries_in_flight(daemon):
    c = Raw(daemon, 5)
    c.connect("rm3", properties={"receive_maximum": 3})
    c.subscribe("rm/t", 1)
    payloads = [b"m%d" % i for i in range(10)]
    publish(daemon, "rm/t", qos1(*payloads))
    # MQTT 5.0 §3.3.4 [MQTT-3.3.4-9]: no more unacked QoS 1/2 PUBLISHes than the
    # client's Receive Maximum.
    first = c.fence()
    assert [p.payload for p in first] == payloads[:3]
    # One PUBACK opens the window by one.
    c.puback(first[0].packet_id)
    nxt = c.fence()
    assert [p.payload for p in nxt] == [payloads[3]]
    got = first + nxt
    inflight = [p.packet_id for p in got[1:]]
    while len(got) < 10:
        c.puback(inflight.pop(0))
        more = c.fence()
        assert len(more) <= 1
        got += more
        inflight += [p.packet_id for p in more]
    assert [p.payload for p in got] == payloads
    c.puback(*inflight)
    assert c.fence() == []
    c.disconnect()


def test_v311_window_is_max_inflight_out(own_daemon):
    d = own_daemon("  max_inflight_out: 4\n")
    c = Raw(d, 4)
    c.connect("win4")
    c.subscribe("win/t", 1)
    # An MQTT 5 client that states no Receive Maximum has 65535 (§3.1.2.11.3), not
    # the 3.1.1 window.
    v5 = Raw(d, 5)
    v5.connect("win-v5")
    v5.subscribe("win/t", 1)
    payloads = [b"m%d" % i for i in range(10)]
    publish(d, "win/t", qos1(*payloads))

    first = c.fence()
    assert [p.payload for p in first] == payloads[:4]
    c.puback(first[0].packet_id)
    assert [p.payload for p in c.fence()] == [payloads[4]]
    assert [p.payload for p in v5.fence()] == payloads
    c.close()
    v5.close()


# -- session queue limits (sessions.max_queued_messages, sessions.queue_full) -------------


def queue_limit_case(own_daemon, policy, one_by_one):
    d = own_daemon(f"sessions:\n  max_queued_messages: 5\n  queue_full: {policy}\n")
    c, _ = session(d, "slow", clean_start=True)
    c.subscribe("full/t", 1)
    c.disconnect()
    payloads = [b"m%d" % i for i in range(8)]
    if one_by_one:
        for p in payloads:
            publish(d, "full/t", qos1(p))
    else:
        publish(d, "full/t", qos1(*payloads))
    c, present = session(d, "slow")
    assert present is True
    got = c.fence()
    c.puback(*[p.packet_id for p in got])
    c.disconnect()
    # The publisher was acked for all eight: they are in the log for everyone else.
    assert sum(1 for r in d.dump() if r["topic"] == "full/t") == 8
    return d, [p.payload for p in got], metrics(d)


@pytest.mark.parametrize("one_by_one", [True, False], ids=["one-by-one", "burst"])
def test_queue_full_refuse_keeps_the_first(own_daemon, one_by_one):
    d, got, counters = queue_limit_case(own_daemon, "refuse", one_by_one)
    assert got == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert counters.get("queue_full_refused") == 3
    assert "queue_full_dropped" not in counters
    assert "slow queue is full" in d.log()


@pytest.mark.parametrize("one_by_one", [True, False], ids=["one-by-one", "burst"])
def test_queue_full_drop_oldest_keeps_the_last(own_daemon, one_by_one):
    d, got, counters = queue_limit_case(own_daemon, "drop_oldest", one_by_one)
    assert got == [b"m3", b"m4", b"m5", b"m6", b"m7"]
    assert counters.get("queue_full_dropped") == 3
    assert "queue_full_refused" not in counters
    assert "slow queue is full" in d.log()
