"""The broker role end to end: SUBSCRIBE, UNSUBSCRIBE, what a subscriber receives.

The real daemon on a loopback port; paho-mqtt clients (MQTT 3.1.1 and 5.0) for
ordinary use, a raw socket (pushcore._frame) where the exact packet matters
(QoS and RETAIN bits, Topic Alias, Subscription Identifiers, what is *not*
sent), and Mosquitto's own command-line clients for interop.

A negative ("not delivered") is never judged by waiting: the subscriber also
gets a later message from the same publisher (a sentinel).  One publisher's
messages are committed and routed in order and one session's copies go out
in order, so once the sentinel has arrived, anything published before it
that was going to arrive has arrived.
"""

import shutil
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from pushcore import _frame
from support import Daemon

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO_PUB is None or MOSQUITTO_SUB is None,
    reason="mosquitto-clients (mosquitto_pub, mosquitto_sub) is not installed")

VERSIONS = [pytest.param(4, id="v311"), pytest.param(5, id="v5")]
DENY = ["secret/#", "+/private"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the module: every test uses its own client ids and topics."""
    d = Daemon(tmp_path_factory.mktemp("broker"),
               config="mqtt:\n  connect_timeout: 2s\n"
                      f"  subscribe_deny: [{', '.join(DENY)}]\n").start()
    yield d
    d.kill()


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- paho clients ---------------------------------------------------------------------


class Client:
    """A connected paho client that records everything it receives."""

    def __init__(self, daemon, version, client_id, clean=True, properties=None):
        self.version = version
        kw = {"protocol": mqtt.MQTTv5} if version == 5 else \
            {"protocol": mqtt.MQTTv311, "clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, **kw)
        self.lock = threading.Lock()
        self.messages = []
        self.acks = {}
        self.connack = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        ckw = {"clean_start": clean, "properties": properties} if version == 5 else {}
        self.c.connect(daemon.host, daemon.port, keepalive=30, **ckw)
        self.c.loop_start()
        wait_until(lambda: self.connack is not None, what="CONNACK")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = (flags, reason_code, properties)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append(msg)

    def _on_ack(self, client, userdata, mid, reason_codes, properties):
        self.acks[mid] = [rc.value for rc in reason_codes]

    def subscribe(self, topics, properties=None):
        """SUBSCRIBE and wait for the SUBACK: the reason codes / granted QoS."""
        kw = {"properties": properties} if properties is not None else {}
        rc, mid = self.c.subscribe(topics, **kw)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return wait_until(lambda: self.acks.get(mid), what="SUBACK")

    def unsubscribe(self, topics):
        """UNSUBSCRIBE and wait for the UNSUBACK: its reason codes (v5; [] on 3.1.1)."""
        rc, mid = self.c.unsubscribe(topics)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        wait_until(lambda: mid in self.acks, what="UNSUBACK")
        return self.acks[mid]

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        """Publish and, for QoS 1/2, wait until the server acknowledged (it is stored)."""
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            info.wait_for_publish(5)
            assert info.is_published()

    def received(self):
        with self.lock:
            return list(self.messages)

    def until(self, topic, timeout=5.0):
        """Every message received up to and including the first one on ``topic``."""
        def upto():
            got = self.received()
            for i, m in enumerate(got):
                if m.topic == topic:
                    return got[:i + 1]
            return None
        return wait_until(upto, timeout, f"a message on {topic}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def publish_props(**kw):
    props = Properties(PacketTypes.PUBLISH)
    for name, value in kw.items():
        setattr(props, name, value)
    return props


# -- raw sockets --------------------------------------------------------------------------


class Raw:
    """One MQTT connection driven by hand, reading the server's packets as they are."""

    def __init__(self, daemon, version=5, client_id="raw", clean_start=True, properties=None):
        self.version = version
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=version)
        self.buf = bytearray()
        # Packets parsed but not yet handed out.
        self.pending = []
        # PUBACKs for its own publishes that publishes_until() stepped over.
        self.acks = []
        self.send(_frame.Connect(client_id=client_id, protocol_level=version, keepalive=30,
                                 clean_start=clean_start, properties=properties))
        (self.connack,) = self.read()
        assert (self.connack.type, self.connack.reason_code) == (_frame.CONNACK, 0)

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, self.version) for p in packets))

    def read(self, want=1, timeout=5.0):
        """The next ``want`` packets; fewer only if the server closed first."""
        self.sock.settimeout(timeout)
        got = self.pending
        while True:
            packets, consumed, error = self.parser.parse(self.buf, 0, len(self.buf))
            assert error is None, error
            got.extend(packets)
            del self.buf[:consumed]
            if len(got) >= want:
                self.pending = got[want:]
                return got[:want]
            chunk = self.sock.recv(65536)
            if not chunk:
                self.pending = []
                return got
            self.buf += chunk

    def subscribe(self, packet_id, subscriptions, sub_id=None):
        props = {"subscription_identifier": [sub_id]} if sub_id else None
        self.send(_frame.Subscribe(packet_id, subscriptions, props))
        (ack,) = self.read()
        assert (ack.type, ack.packet_id) == (_frame.SUBACK, packet_id)
        return ack.reason_codes

    def publishes_until(self, topic, timeout=5.0):
        """The PUBLISH packets received up to and including the first on ``topic``.

        Acknowledges each as a client should: PUBACK for QoS 1, PUBREC (then
        PUBCOMP for the PUBREL) for QoS 2.
        """
        deadline = time.monotonic() + timeout
        got = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no PUBLISH on {topic}; got {[(p.topic, p.payload) for p in got]}"
            packets = self.read(1, left)
            assert packets, "the server closed the connection"
            (p,) = packets
            if p.type == _frame.PUBREL:
                self.sock.sendall(_frame.encode_ack(_frame.PUBCOMP, p.packet_id, 0, self.version))
                continue
            if p.type == _frame.PUBACK:
                # For a PUBLISH of its own, which may come before or after deliveries.
                self.acks.append(p)
                continue
            assert p.type == _frame.PUBLISH, p
            got.append(p)
            if p.qos == 1:
                self.sock.sendall(_frame.encode_ack(_frame.PUBACK, p.packet_id, 0, self.version))
            elif p.qos == 2:
                self.sock.sendall(_frame.encode_ack(_frame.PUBREC, p.packet_id, 0, self.version))
            if p.topic == topic:
                return got

    def close(self):
        self.sock.close()


def props_of(p):
    return dict(p.properties or {})


def raw_publish(daemon, *messages, client_id):
    """Publish (topic, payload, qos, retain, properties) tuples on a v5 connection; each
    QoS 1/2 one is acked (so stored and routed) before this returns."""
    c = Raw(daemon, 5, client_id)
    for i, (topic, payload, qos, retain, props) in enumerate(messages, 1):
        c.send(_frame.Publish(topic, payload, qos=qos, retain=retain,
                              packet_id=i if qos else 0, properties=props))
        if qos:
            (ack,) = c.read()
            assert (ack.packet_id, ack.reason_code) == (i, 0)
            if qos == 2:
                c.sock.sendall(_frame.encode_ack(_frame.PUBREL, i, 0, 5))
                (comp,) = c.read()
                assert comp.type == _frame.PUBCOMP
    c.close()


# -- wildcards ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_plus_and_hash_wildcards(daemon, version):
    p = f"wc{version}"
    sub = Client(daemon, version, f"wc-sub-{version}")
    # MQTT 5.0 §4.7.1: '+' is exactly one level (possibly empty), '#' any number of
    # levels including the parent itself.
    assert sub.subscribe([(f"{p}/+/temp", 1), (f"{p}/house/#", 1), (f"+/{p}solo", 1)]) == \
        [1, 1, 1]
    pub = Client(daemon, 5, f"wc-pub-{version}")
    topics = [f"{p}/kitchen/temp",        # +: one level
              f"{p}/kitchen/temp/raw",    # +/temp does not reach a deeper level
              f"{p}//temp",               # +: an empty level
              f"{p}/temp",                # +: one level, not zero
              f"{p}/house",               # #: the parent level
              f"{p}/house/a/b/c",         # #: any depth
              f"{p}/houses/a",            # not the level 'house'
              f"x/{p}solo",
              f"x/y/{p}solo"]
    for t in topics:
        pub.publish(t, t.encode())
    pub.publish(f"{p}/house/end", b"sentinel")
    got = sub.until(f"{p}/house/end")
    assert [m.topic for m in got] == [f"{p}/kitchen/temp", f"{p}//temp", f"{p}/house",
                                      f"{p}/house/a/b/c", f"x/{p}solo", f"{p}/house/end"]
    assert all(m.payload == m.topic.encode() for m in got[:-1])
    pub.close()
    sub.close()


def test_dollar_topics_not_matched_by_first_level_wildcards(daemon):
    everything = Client(daemon, 5, "dollar-hash")
    plus = Client(daemon, 4, "dollar-plus")
    sys_sub = Client(daemon, 5, "dollar-sys")
    assert everything.subscribe([("#", 1)]) == [1]
    assert plus.subscribe([("+/dollartest/x", 1)]) == [1]
    assert sys_sub.subscribe([("$SYS/#", 1), ("$SYS/+/x", 1)]) == [1, 1]
    pub = Client(daemon, 5, "dollar-pub")
    pub.publish("$SYS/dollartest/x", b"sys")
    pub.publish("plain/dollartest/x", b"plain")
    # MQTT 5.0 §4.7.2 / 3.1.1 §4.7.2: '#' and '+/...' do not match a topic starting
    # with '$'; a filter starting with '$SYS' does.
    got = everything.until("plain/dollartest/x")
    assert not [m for m in got if m.topic.startswith("$")]
    assert [m.topic for m in plus.until("plain/dollartest/x")] == ["plain/dollartest/x"]
    got = sys_sub.until("$SYS/dollartest/x")
    assert [(m.topic, m.payload) for m in got] == [("$SYS/dollartest/x", b"sys")]
    # One copy for the two overlapping filters, with nothing else after it.
    pub.publish("$SYS/end", b"")
    assert [m.topic for m in sys_sub.until("$SYS/end")] == ["$SYS/dollartest/x", "$SYS/end"]
    for c in (pub, everything, plus, sys_sub):
        c.close()


# -- UNSUBSCRIBE ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_unsubscribe_stops_deliveries(daemon, version):
    p = f"unsub{version}"
    sub = Client(daemon, version, f"unsub-sub-{version}")
    assert sub.subscribe([(f"{p}/a/#", 1), (f"{p}/b", 1)]) == [1, 1]
    pub = Client(daemon, 5, f"unsub-pub-{version}")
    pub.publish(f"{p}/a/1", b"before")
    assert [m.topic for m in sub.until(f"{p}/a/1")] == [f"{p}/a/1"]
    codes = sub.unsubscribe([f"{p}/a/#"])
    # MQTT 5.0 §3.11.3: 0x00 Success; 3.1.1's UNSUBACK has no payload.
    assert codes == ([0x00] if version == 5 else [])
    pub.publish(f"{p}/a/2", b"after")
    pub.publish(f"{p}/b", b"sentinel")
    assert [m.topic for m in sub.until(f"{p}/b")] == [f"{p}/a/1", f"{p}/b"]
    if version == 5:
        # MQTT 5.0 §3.11.3: 0x11 No subscription existed, per filter.
        assert sub.unsubscribe([f"{p}/a/#", f"{p}/b"]) == [0x11, 0x00]
    pub.close()
    sub.close()


def test_unsuback_v5_codes_per_filter_raw(daemon):
    c = Raw(daemon, 5, "unsub-raw")
    assert c.subscribe(1, [("ur/x", 1), ("ur/+/y", 0)]) == [1, 0]
    c.send(_frame.Unsubscribe(2, ["ur/x", "ur/never", "ur/+/y", "ur/x"]))
    (ack,) = c.read()
    # The second "ur/x" is no longer subscribed: 0x11 for it too.
    assert (ack.type, ack.packet_id, ack.reason_codes) == \
        (_frame.UNSUBACK, 2, [0x00, 0x11, 0x00, 0x11])
    c.close()


# -- QoS -------------------------------------------------------------------------------


def test_granted_qos_is_capped_by_max_qos(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  max_qos: 1\n").start()
    try:
        for version in (4, 5):
            sub = Client(d, version, f"cap-sub-{version}")
            if version == 5:
                # MQTT 5.0 §3.2.2.3.4: Maximum QoS is advertised in CONNACK.
                assert sub.connack[2].MaximumQoS == 1
            # min(requested, mqtt.max_qos) per filter.
            assert sub.subscribe([(f"cap{version}/two", 2), (f"cap{version}/one", 1),
                                  (f"cap{version}/zero", 0)]) == [1, 1, 0]
            pub = Client(d, 5, f"cap-pub-{version}")
            pub.publish(f"cap{version}/two", b"x", qos=1)
            pub.publish(f"cap{version}/zero", b"y", qos=1)
            got = sub.until(f"cap{version}/zero")
            assert [(m.topic, m.qos) for m in got] == [(f"cap{version}/two", 1),
                                                       (f"cap{version}/zero", 0)]
            pub.close()
            sub.close()
    finally:
        d.kill()


@pytest.mark.parametrize("version", VERSIONS)
def test_delivery_downgraded_to_subscription_qos(daemon, version):
    p = f"dg{version}"
    c = Raw(daemon, version, f"dg-sub-{version}")
    assert c.subscribe(1, [(f"{p}/q0", 0), (f"{p}/q1", 1), (f"{p}/q2", 2)]) == [0, 1, 2]
    raw_publish(daemon, (f"{p}/q0", b"a", 2, False, None), (f"{p}/q1", b"b", 2, False, None),
                (f"{p}/q2", b"c", 2, False, None), (f"{p}/q2", b"d", 1, False, None),
                (f"{p}/q2", b"e", 0, False, None), (f"{p}/q1", b"end", 1, False, None),
                client_id=f"dg-pub-{version}")
    got = c.publishes_until(f"{p}/q1")
    got += c.publishes_until(f"{p}/q1")
    # MQTT 5.0 §3.8.4 / 3.1.1 §3.8.4: delivered at min(published QoS, granted QoS).
    assert [(p_.topic, p_.payload, p_.qos) for p_ in got] == [
        (f"{p}/q0", b"a", 0), (f"{p}/q1", b"b", 1), (f"{p}/q2", b"c", 2),
        (f"{p}/q2", b"d", 1), (f"{p}/q2", b"e", 0), (f"{p}/q1", b"end", 1)]
    # Packet ids only on QoS 1/2, none reused while in flight.
    ids = [p_.packet_id for p_ in got if p_.qos]
    assert all(ids) and len(set(ids)) == len(ids)
    c.close()


# -- overlapping subscriptions -----------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_overlapping_subscriptions_one_copy_at_highest_qos(daemon, version):
    p = f"ov{version}"
    c = Raw(daemon, version, f"ov-sub-{version}")
    sid = (lambda n: n) if version == 5 else (lambda n: None)
    assert c.subscribe(1, [(f"{p}/+/x", 0)], sub_id=sid(7)) == [0]
    assert c.subscribe(2, [(f"{p}/#", 1)], sub_id=sid(9)) == [1]
    assert c.subscribe(3, [(f"{p}/a/x", 2)]) == [2]
    raw_publish(daemon, (f"{p}/a/x", b"three", 2, False, None),
                (f"{p}/b/x", b"two", 2, False, None), (f"{p}/end", b"", 1, False, None),
                client_id=f"ov-pub-{version}")
    got = c.publishes_until(f"{p}/end")
    # MQTT 3.1.1 §3.3.5 asks for one copy at the highest QoS; for 5.0 (§3.3.4) it is the
    # documented choice (broker.py), carrying every matching Subscription Identifier.
    assert [(x.topic, x.payload, x.qos) for x in got] == [
        (f"{p}/a/x", b"three", 2), (f"{p}/b/x", b"two", 1), (f"{p}/end", b"", 1)]
    if version == 5:
        assert sorted(props_of(got[0])["subscription_identifier"]) == [7, 9]
        assert sorted(props_of(got[1])["subscription_identifier"]) == [7, 9]
        assert props_of(got[2])["subscription_identifier"] == [9]
    else:
        assert all(x.properties is None for x in got)
    c.close()


def test_subscription_identifier_paho(daemon):
    pub = Client(daemon, 5, "sid-pub")
    pub.publish("sid/kept", b"retained", qos=2, retain=True)
    sub = Client(daemon, 5, "sid-paho")
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 42
    assert sub.subscribe([("sid/#", SubscribeOptions(qos=1))], properties=props) == [1]
    # MQTT 5.0 §3.3.4: the retained message sent on subscribe carries the identifier
    # too, and comes at the subscription's QoS with RETAIN set.
    (kept,) = sub.until("sid/kept")
    assert (kept.payload, kept.qos, kept.retain, kept.properties.SubscriptionIdentifier) == \
        (b"retained", 1, True, [42])
    assert sub.subscribe([("sid/plain", SubscribeOptions(qos=0))]) == [0]
    pub.publish("sid/plain", b"x")
    (_, m) = sub.until("sid/plain")
    # Both filters match: one copy at QoS 1, with the one identifier there is.
    assert (m.qos, m.retain, m.properties.SubscriptionIdentifier) == (1, False, [42])
    pub.publish("sid/kept", b"", qos=1, retain=True)
    pub.close()
    sub.close()


# -- MQTT 5 subscription options ------------------------------------------------------------


def test_no_local(daemon):
    me = Raw(daemon, 5, "nl-me")
    # MQTT 5.0 §3.8.3.1: No Local is bit 2 of the options.
    assert me.subscribe(1, [("nl/t", 1 | 0x04), ("nl/other", 1)]) == [1, 1]
    other = Client(daemon, 5, "nl-other")
    assert other.subscribe([("nl/t", 1)]) == [1]
    me.send(_frame.Publish("nl/t", b"mine", qos=1, packet_id=1))
    (ack,) = me.read()
    assert (ack.type, ack.packet_id, ack.reason_code) == (_frame.PUBACK, 1, 0)
    other.publish("nl/t", b"theirs")
    other.publish("nl/other", b"sentinel")
    # Its own message is not sent back to it; another client's is.
    got = me.publishes_until("nl/other")
    assert [(x.topic, x.payload) for x in got] == [("nl/t", b"theirs"), ("nl/other", b"sentinel")]
    # The option is per subscription: another subscriber gets both.
    assert [m.payload for m in other.until("nl/t")] == [b"mine"]
    wait_until(lambda: len([m for m in other.received() if m.topic == "nl/t"]) == 2)
    # And without No Local, one's own message comes back.
    assert me.subscribe(2, [("nl/self", 1)]) == [1]
    me.send(_frame.Publish("nl/self", b"echo", qos=1, packet_id=2))
    got = me.publishes_until("nl/self")
    assert [(x.topic, x.payload) for x in got] == [("nl/self", b"echo")]
    assert [(a.packet_id, a.reason_code) for a in me.acks] == [(2, 0)]
    me.close()
    other.close()


def test_retain_as_published(daemon):
    keep = Raw(daemon, 5, "rap-keep")
    clear = Raw(daemon, 5, "rap-clear")
    old = Raw(daemon, 4, "rap-311")
    # MQTT 5.0 §3.8.3.1: Retain As Published is bit 3 of the options.
    assert keep.subscribe(1, [("rap/t", 1 | 0x08), ("rap/end", 1)]) == [1, 1]
    assert clear.subscribe(1, [("rap/t", 1), ("rap/end", 1)]) == [1, 1]
    assert old.subscribe(1, [("rap/t", 1), ("rap/end", 1)]) == [1, 1]
    raw_publish(daemon, ("rap/t", b"live", 1, True, None), ("rap/end", b"", 1, False, None),
                client_id="rap-pub")
    # MQTT 5.0 §3.3.1.3: on an established subscription the RETAIN flag is kept only
    # with Retain As Published; otherwise (and always in 3.1.1 §3.3.1.3) it is 0.
    assert [(x.topic, x.retain) for x in keep.publishes_until("rap/end")] == \
        [("rap/t", True), ("rap/end", False)]
    assert [(x.topic, x.retain) for x in clear.publishes_until("rap/end")] == \
        [("rap/t", False), ("rap/end", False)]
    assert [(x.topic, x.retain) for x in old.publishes_until("rap/end")] == \
        [("rap/t", False), ("rap/end", False)]
    # A retained message sent because of a new subscription has RETAIN 1 either way.
    for c in (clear, old):
        assert c.subscribe(2, [("rap/+", 1)]) == [1]
        (x,) = c.publishes_until("rap/t")
        assert (x.payload, x.retain) == (b"live", True)
    # An empty retained payload clears the topic's retained message (§3.3.1.3).
    raw_publish(daemon, ("rap/t", b"", 1, True, None), client_id="rap-pub")
    for c in (keep, clear, old):
        c.close()


def test_retain_handling(daemon):
    raw_publish(daemon, ("rh/t", b"kept", 1, True, None), ("rh/u", b"kept too", 1, True, None),
                client_id="rh-pub")
    c = Raw(daemon, 5, "rh-sub")
    assert c.subscribe(1, [("rh/end", 1)]) == [1]

    def retained_after(packet_id, topic_filter, options):
        """The retained messages the SUBSCRIBE brought, judged against a sentinel."""
        assert c.subscribe(packet_id, [(topic_filter, options)]) == [options & 3]
        raw_publish(daemon, ("rh/end", b"", 1, False, None), client_id="rh-fence")
        got = c.publishes_until("rh/end")
        assert all(x.retain for x in got[:-1])
        return sorted(x.payload for x in got[:-1])

    # MQTT 5.0 §3.8.3.1, Retain Handling (bits 4-5):
    # 0: retained messages on every subscribe, new or not.
    assert retained_after(2, "rh/t", 1 | 0 << 4) == [b"kept"]
    assert retained_after(3, "rh/t", 1 | 0 << 4) == [b"kept"]
    assert retained_after(4, "rh/#", 1 | 0 << 4) == [b"kept", b"kept too"]
    # 1: only if the subscription did not exist.
    assert retained_after(5, "rh/+", 1 | 1 << 4) == [b"kept", b"kept too"]
    assert retained_after(6, "rh/+", 1 | 1 << 4) == []
    # 2: never.
    assert retained_after(7, "rh/u", 1 | 2 << 4) == []
    c.close()
    # A new session with 2 gets nothing; 3.1.1 always gets them (its default behaviour).
    fresh = Raw(daemon, 5, "rh-fresh")
    assert fresh.subscribe(1, [("rh/t", 2 << 4 | 1), ("rh/end", 1)]) == [1, 1]
    raw_publish(daemon, ("rh/end", b"", 1, False, None), client_id="rh-fence")
    assert [x.topic for x in fresh.publishes_until("rh/end")] == ["rh/end"]
    fresh.close()
    old = Raw(daemon, 4, "rh-311")
    assert old.subscribe(1, [("rh/t", 1)]) == [1]
    (x,) = old.publishes_until("rh/t")
    assert (x.payload, x.retain) == (b"kept", True)
    old.close()


# -- subscribe refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_subscribe_deny(daemon, version):
    sub = Client(daemon, version, f"deny-sub-{version}")
    codes = sub.subscribe([("secret/keys", 1), ("deny/ok", 1), ("x/private", 0),
                           ("secret/#", 2), ("deny/+", 1)])
    # mqtt.subscribe_deny [secret/#, +/private]: MQTT 5.0 §3.9.3 0x87 Not authorized,
    # 3.1.1 §3.9.3 0x80 Failure; the other filters of the SUBSCRIBE are granted.
    no = 0x87 if version == 5 else 0x80
    assert codes == [no, 1, no, no, 1]
    pub = Client(daemon, 5, f"deny-pub-{version}")
    pub.publish("secret/keys", b"hidden")
    pub.publish("x/private", b"hidden")
    pub.publish("deny/ok", b"sentinel")
    got = sub.until("deny/ok")
    # A refused filter delivers nothing; deny/ok matches two granted filters: one copy.
    assert [(m.topic, m.payload) for m in got] == [("deny/ok", b"sentinel")]
    pub.close()
    sub.close()


# -- MQTT 5 properties towards the subscriber ---------------------------------------------


def test_publish_properties_passed_through(daemon):
    sub = Client(daemon, 5, "props-sub")
    assert sub.subscribe([("props/#", 2)]) == [2]
    pub = Client(daemon, 5, "props-pub")
    users = [("k", "v1"), ("k", "v2"), ("other", "x y"), ("émoji", "✓")]
    props = publish_props(PayloadFormatIndicator=1, ContentType="application/json",
                          ResponseTopic="props/reply", CorrelationData=b"\x00\x01corr\xff",
                          UserProperty=users)
    pub.publish("props/full", b'{"a": 1}', qos=2, properties=props)
    pub.publish("props/none", b"bare", qos=1)
    got = sub.until("props/none")
    assert [m.topic for m in got] == ["props/full", "props/none"]
    full, bare = got
    # MQTT 5.0 §3.3.2.3: passed unchanged, user properties in order, duplicates kept.
    assert full.payload == b'{"a": 1}'
    assert full.properties.PayloadFormatIndicator == 1
    assert full.properties.ContentType == "application/json"
    assert full.properties.ResponseTopic == "props/reply"
    assert full.properties.CorrelationData == b"\x00\x01corr\xff"
    assert full.properties.UserProperty == users
    assert not hasattr(full.properties, "MessageExpiryInterval")
    for name in ("PayloadFormatIndicator", "ContentType", "ResponseTopic", "CorrelationData",
                 "UserProperty"):
        assert not hasattr(bare.properties, name)
    pub.close()
    sub.close()


def test_message_expiry_decremented_and_expired_not_delivered(daemon):
    # A persistent session (MQTT 5.0 §3.1.2.11.2), offline while messages arrive.
    c = Raw(daemon, 5, "exp-sub", properties={"session_expiry_interval": 300})
    assert c.subscribe(1, [("exp/#", 1)]) == [1]
    c.send(_frame.Disconnect(0))
    c.close()
    raw_publish(daemon,
                ("exp/short", b"1s", 1, False, {"message_expiry_interval": 1}),
                ("exp/long", b"60s", 1, False, {"message_expiry_interval": 60}),
                ("exp/forever", b"none", 1, False, None),
                client_id="exp-pub")
    time.sleep(2.5)  # the scenario: the short one expires while the session is offline
    c = Raw(daemon, 5, "exp-sub", clean_start=False,
            properties={"session_expiry_interval": 300})
    assert c.connack.session_present
    got = c.publishes_until("exp/forever")
    # MQTT 5.0 §3.3.2.3.3: an expired message is not delivered; the interval sent is
    # what is left of it (at least 2 s of the 60 have passed).
    assert [(x.topic, x.payload) for x in got] == [("exp/long", b"60s"), ("exp/forever", b"none")]
    left = props_of(got[0])["message_expiry_interval"]
    assert 50 <= left <= 59
    assert "message_expiry_interval" not in props_of(got[1])
    # End the session.
    c.send(_frame.Disconnect(0, {"session_expiry_interval": 0}))
    c.close()


# -- flow towards the client: Topic Alias, Maximum Packet Size ---------------------------------


def test_topic_alias_towards_the_client(daemon):
    c = Raw(daemon, 5, "ta-sub", properties={"topic_alias_maximum": 5})
    plain = Raw(daemon, 5, "ta-plain")
    assert c.subscribe(1, [("ta/#", 1)]) == [1]
    assert plain.subscribe(1, [("ta/#", 1)]) == [1]
    raw_publish(daemon, ("ta/one", b"1", 1, False, None), ("ta/one", b"2", 1, False, None),
                ("ta/two", b"3", 1, False, None), ("ta/one", b"4", 1, False, None),
                ("ta/end", b"", 1, False, None), client_id="ta-pub")
    got = c.publishes_until("ta/end")
    assert [x.payload for x in got] == [b"1", b"2", b"3", b"4", b""]
    first, second, other, again, _ = got
    # MQTT 5.0 §3.3.2.3.4: the first PUBLISH sets the alias (topic name and alias), later
    # ones on the topic send a zero-length topic name with the alias.
    alias = props_of(first)["topic_alias"]
    assert first.topic == "ta/one" and 1 <= alias <= 5
    assert (second.topic, props_of(second)["topic_alias"]) == ("", alias)
    assert other.topic == "ta/two"
    assert props_of(other)["topic_alias"] not in (alias, None)
    assert (again.topic, props_of(again)["topic_alias"]) == ("", alias)
    # A client that allows no aliases (Topic Alias Maximum absent = 0) never gets one.
    got = plain.publishes_until("ta/end")
    assert [x.topic for x in got] == ["ta/one", "ta/one", "ta/two", "ta/one", "ta/end"]
    assert all("topic_alias" not in props_of(x) for x in got)
    c.close()
    plain.close()


def test_topic_alias_never_above_client_maximum(daemon):
    c = Raw(daemon, 5, "ta-max", properties={"topic_alias_maximum": 2})
    assert c.subscribe(1, [("tam/#", 0)]) == [0]
    topics = ["tam/a", "tam/b", "tam/c", "tam/c", "tam/a"]
    raw_publish(daemon, *((t, b"", 0, False, None) for t in topics),
                ("tam/end", b"", 1, False, None), client_id="tam-pub")
    got = c.publishes_until("tam/end")
    aliases = [props_of(x).get("topic_alias") for x in got]
    # Never an alias above the client's Topic Alias Maximum (§3.3.2.3.4 [MQTT-3.3.2-9]);
    # a topic without one is always sent by name.
    assert all(a is None or 1 <= a <= 2 for a in aliases)
    seen = {}
    for x, a in zip(got, aliases):
        if x.topic:
            if a is not None:
                seen[a] = x.topic
        else:
            assert a in seen
    assert [x.topic or seen[props_of(x)["topic_alias"]] for x in got] == topics + ["tam/end"]
    c.close()


def test_maximum_packet_size_of_the_client(daemon):
    c = Raw(daemon, 5, "mps-sub", properties={"maximum_packet_size": 100})
    assert c.subscribe(1, [("mps/#", 1)]) == [1]
    raw_publish(daemon, ("mps/big", b"b" * 500, 1, False, None),
                ("mps/small", b"s" * 20, 1, False, None), client_id="mps-pub")
    # MQTT 5.0 §3.1.2.11.4 [MQTT-3.1.2-25]: a packet larger than the client's Maximum
    # Packet Size is not sent; the next message is.
    got = c.publishes_until("mps/small")
    assert [(x.topic, x.payload) for x in got] == [("mps/small", b"s" * 20)]
    c.close()


def test_maximum_packet_size_skip_does_not_leave_an_unknown_topic_alias(daemon):
    c = Raw(daemon, 5, "mpsa-sub", properties={"maximum_packet_size": 100,
                                                "topic_alias_maximum": 5})
    assert c.subscribe(1, [("mpsa/#", 1)]) == [1]
    raw_publish(daemon, ("mpsa/t", b"b" * 500, 1, False, None),
                ("mpsa/t", b"small", 1, False, None), client_id="mpsa-pub")
    (x,) = c.read()
    # The client never received the oversized PUBLISH, so it knows no alias for the
    # topic: a zero-length topic name with an alias it never saw is a Protocol Error
    # for it (MQTT 5.0 §3.3.2.3.4).  The topic must be sent by name.
    assert (x.type, x.payload) == (_frame.PUBLISH, b"small")
    assert x.topic == "mpsa/t"
    c.close()


# -- interop with Mosquitto's clients --------------------------------------------------------


class MosquittoSub:
    """mosquitto_sub in the background, its output lines collected as they come."""

    def __init__(self, daemon, version, prefix, count, client_id):
        self.prefix = prefix
        self.client_id = client_id
        # A retained message under the filter tells when the subscription is in place:
        # mosquitto_sub flushes its output when it prints a message, not before.
        raw_publish(daemon, (f"{prefix}/ready", b"ready", 1, True, None),
                    client_id=f"{client_id}-ready")
        self.proc = subprocess.Popen(
            [MOSQUITTO_SUB, "-h", daemon.host, "-p", str(daemon.port), "-V", version,
             "-i", client_id, "-q", "1", "-t", f"{prefix}/#", "-C", str(count + 1), "-W", "20",
             "-v", "-d"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_until(lambda: f"{prefix}/ready ready" in self.lines, 10,
                   f"mosquitto_sub's retained message; output so far: {self.lines}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def finish(self, daemon):
        rc = self.proc.wait(25)
        self.reader.join(5)
        # Clear the retained message (§3.3.1.3: an empty retained payload).
        raw_publish(daemon, (f"{self.prefix}/ready", b"", 1, True, None),
                    client_id=f"{self.client_id}-ready")
        return rc


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_sub_receives_from_paho(daemon, version):
    topic = f"interop/{version}"
    ms = MosquittoSub(daemon, version, topic, 3, f"ms-{version}")
    pub = Client(daemon, 5, f"ms-pub-{version}")
    for qos in (0, 1, 2):
        pub.publish(f"{topic}/q{qos}", f"hello q{qos}".encode(), qos=qos)
    rc = ms.finish(daemon)
    pub.close()
    assert rc == 0, ms.lines
    # -v prints "topic payload"; -d adds "Client ... received PUBLISH (d0, q1, ...)".
    printed = [line for line in ms.lines if line.startswith(topic)]
    assert printed == [f"{topic}/ready ready"] + [f"{topic}/q{q} hello q{q}" for q in (0, 1, 2)]
    received = [line for line in ms.lines if "received PUBLISH" in line]
    # The retained one with RETAIN set (sent on subscribe), the live ones without; and
    # subscribed at QoS 1, the QoS 2 one arrives downgraded.
    assert [(" r1," in r, " q0," in r, " q1," in r) for r in received] == [
        (True, False, True), (False, True, False), (False, False, True), (False, False, True)]


@needs_mosquitto
def test_paho_receives_from_mosquitto_pub(daemon):
    sub5 = Client(daemon, 5, "mqpub-sub5")
    sub4 = Client(daemon, 4, "mqpub-sub4")
    assert sub5.subscribe([("mqpub/#", 2)]) == [2]
    assert sub4.subscribe([("mqpub/#", 2)]) == [2]
    base = [MOSQUITTO_PUB, "-h", daemon.host, "-p", str(daemon.port)]
    res = subprocess.run(base + ["-V", "mqttv5", "-q", "1", "-t", "mqpub/v5", "-m", "five",
                                 "-i", "mqpub-5", "-D", "publish", "user-property", "from",
                                 "mosquitto", "-D", "publish", "content-type", "text/plain"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(base + ["-V", "mqttv311", "-q", "2", "-t", "mqpub/v311", "-m", "four",
                                 "-i", "mqpub-4"], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    for sub in (sub5, sub4):
        got = sub.until("mqpub/v311")
        assert [(m.topic, m.payload, m.qos) for m in got] == [("mqpub/v5", b"five", 1),
                                                              ("mqpub/v311", b"four", 2)]
    five = sub5.received()[0]
    assert five.properties.UserProperty == [("from", "mosquitto")]
    assert five.properties.ContentType == "text/plain"
    sub5.close()
    sub4.close()
