"""Retained messages, Will messages and shared subscriptions, end to end.

The real daemon on a loopback port, driven by paho-mqtt (MQTT 3.1.1 and 5.0)
and by raw sockets with pushcore._frame where the exact wire matters (a
member that never acks, a connection that drops without DISCONNECT, a Will
with its delay).  Most tests share one daemon: each uses its own client ids
and topics, so they do not see each other's messages.  Nothing here sleeps to
decide an outcome: "nothing arrived" is decided by a fence, a later message
the same subscriber must receive after anything that was due before it.
"""

import itertools
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from pushcore import _frame
from support import ROOT, Daemon

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
needs_mosquitto = pytest.mark.skipif(MOSQUITTO_SUB is None,
                                     reason="mosquitto-clients (mosquitto_sub) is not installed")

_ids = itertools.count(1)


def uid(stem):
    return f"{stem}-{next(_ids)}"


def topic(stem):
    """A topic root no other test publishes to."""
    return f"rw/{uid(stem)}"


def start(tmp_path):
    return Daemon(tmp_path, config="mqtt:\n  connect_timeout: 2s\n").start()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = start(tmp_path_factory.mktemp("rw"))
    yield d
    d.kill()


# -- paho clients -------------------------------------------------------------------


class Msg(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: object
    at: float


def prop(msg, name):
    """A v5 property of a received message, or None."""
    return getattr(msg.props, name, None) if msg.props is not None else None


class Client:
    """A started paho client that records what it receives, with the time it arrived."""

    def __init__(self, daemon, version=5, client_id=None, keepalive=30):
        self.version = version
        self.id = client_id or uid(f"paho{version}")
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        kw = {} if version == 5 else {"clean_session": True}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=proto,
                             **kw)
        self.cond = threading.Condition()
        self.messages = []
        self.subacks = {}
        self.connack = None
        self.fence_topic = None
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.connect(daemon.host, daemon.port, keepalive=keepalive)
        self.c.loop_start()
        self.wait(lambda: self.connack is not None, "no CONNACK")
        assert self.connack == 0, self.connack

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self.cond:
            self.connack = reason_code.value
            self.cond.notify_all()

    def _on_message(self, client, userdata, m):
        with self.cond:
            self.messages.append(Msg(m.topic, m.payload, m.qos, bool(m.retain),
                                     getattr(m, "properties", None), time.monotonic()))
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self.cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self.cond.notify_all()

    def wait(self, pred, what, timeout=5.0):
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"{self.id}: {what}"

    def subscribe(self, topic_filter, qos=1, retain_as_published=False):
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        if self.version == 5:
            options = SubscribeOptions(qos=qos, retainAsPublished=retain_as_published)
            result, mid = self.c.subscribe(topic_filter, options=options)
        else:
            result, mid = self.c.subscribe(topic_filter, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        self.wait(lambda: mid in self.subacks, f"no SUBACK for {topic_filter}")
        return self.subacks[mid]

    def publish(self, topic_name, payload, qos=1, retain=False, props=None):
        info = self.c.publish(topic_name, payload, qos=qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(5)
            assert info.is_published(), f"{topic_name} was not acked"
        return info

    def got(self, prefix=""):
        """What arrived so far, fence messages left out."""
        with self.cond:
            return [m for m in self.messages
                    if m.topic.startswith(prefix) and m.topic != self.fence_topic]

    def wait_count(self, n, prefix="", timeout=5.0):
        self.wait(lambda: len(self.got(prefix)) >= n,
                  f"expected {n} messages under {prefix!r}, got {len(self.got(prefix))}", timeout)
        return self.got(prefix)

    def fence(self, publisher):
        """Return once everything routed to this client before now has arrived.

        One session's copies go out in the order they were queued, so a fresh
        message on a topic only this client subscribes to arrives after them.
        """
        if self.fence_topic is None:
            self.fence_topic = f"fence/{self.id}"
            assert self.subscribe(self.fence_topic, qos=1) == [1]
        before = self._fences()
        publisher.publish(self.fence_topic, b"", qos=1)
        self.wait(lambda: self._fences() > before, "fence did not arrive")

    def _fences(self):
        return sum(1 for m in self.messages if m.topic == self.fence_topic)

    def stop(self):
        self.c.disconnect()
        self.c.loop_stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def expiry_props(seconds):
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


# -- raw sockets ----------------------------------------------------------------------


class Raw:
    """One MQTT connection driven by hand."""

    def __init__(self, daemon, version=5):
        self.version = version
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=version)
        self.buf = bytearray()

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, self.version) for p in packets))

    def connect(self, client_id, keepalive=30, clean_start=True, properties=None, will=None):
        self.send(_frame.Connect(client_id=client_id, protocol_level=self.version,
                                 keepalive=keepalive, clean_start=clean_start,
                                 properties=properties, will=will))
        (connack,) = self.read()
        assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0)
        return connack

    def read(self, want=1, timeout=5.0):
        """Packets until ``want`` have come, the server closed, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            packets, consumed, error = self.parser.parse(self.buf, 0, len(self.buf))
            assert error is None, error
            got.extend(packets)
            del self.buf[:consumed]
            left = deadline - time.monotonic()
            if len(got) >= want or left <= 0:
                return got
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                return got
            if not chunk:
                return got
            self.buf += chunk

    def closed(self, timeout=5.0):
        """Wait for the server to close; returns the packets it sent before closing."""
        deadline = time.monotonic() + timeout
        got = []
        self.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                packets, _consumed, _error = self.parser.parse(self.buf, 0, len(self.buf))
                return got + packets
            self.buf += chunk
        raise AssertionError("the server did not close the connection")

    def abort(self):
        """Close with a TCP reset: the client vanishes without DISCONNECT."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


def will_client(daemon, version, client_id, will_topic, payload=b"gone", qos=1, retain=False,
                will_props=None, keepalive=30, expiry=None, clean_start=True):
    r = Raw(daemon, version)
    props = {"session_expiry_interval": expiry} if expiry is not None else None
    r.connect(client_id, keepalive=keepalive, clean_start=clean_start, properties=props,
              will=_frame.Will(will_topic, payload, qos=qos, retain=retain,
                               properties=will_props))
    return r


def end_session(daemon, client_id):
    """Connect with Clean Start and Session Expiry 0, then DISCONNECT: the session is gone."""
    r = Raw(daemon, 5)
    r.connect(client_id, clean_start=True)
    r.send(_frame.Disconnect(0))
    r.closed()


def disconnect_normally(r):
    r.send(_frame.Disconnect(0))
    assert r.closed() == []


# -- what the store holds -------------------------------------------------------------


def stored_retained(daemon):
    """{topic: payload} of the `retained` database, read in a subprocess (read-only)."""
    script = (
        "import json, sys\n"
        "from pushcore.log import Log\n"
        "from pushcore.record import decode_record\n"
        "log = Log(sys.argv[1], partitions=None, readonly=True)\n"
        "print(json.dumps({t: decode_record(r).payload.decode('latin-1')\n"
        "                  for t, r in log.retained().items()}))\n"
        "log.close()\n")
    res = subprocess.run([sys.executable, "-c", script, daemon.data_dir], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return {t: p.encode("latin-1") for t, p in json.loads(res.stdout).items()}


def logged(daemon, topic_name):
    return [r for r in daemon.dump() if r["topic"] == topic_name]


# == retained messages =================================================================


@pytest.mark.parametrize("version", [4, 5])
def test_retained_message_sent_to_a_later_subscriber_with_retain_1(daemon, version):
    t = topic("state")
    with Client(daemon, 5) as pub:
        pub.publish(t, b"on", qos=1, retain=True)
        with Client(daemon, version) as sub, Client(daemon, version) as sub0:
            assert sub.subscribe(t, qos=2) == [2]
            # MQTT 3.1.1 §3.3.1.3 [MQTT-3.3.1-8] / 5.0 §3.3.1.3: sent because of a new
            # subscription, so RETAIN 1; at the message's QoS, not above it.
            assert [(m.topic, m.payload, m.qos, m.retain) for m in sub.wait_count(1)] == \
                [(t, b"on", 1, True)]
            # Delivered at min(message QoS, granted QoS) (§3.8.4).
            assert sub0.subscribe(t, qos=0) == [0]
            assert [(m.payload, m.qos, m.retain) for m in sub0.wait_count(1)] == \
                [(b"on", 0, True)]
            sub.fence(pub)
            assert len(sub.got(t)) == 1
    assert stored_retained(daemon)[t] == b"on"


@pytest.mark.parametrize("version", [4, 5])
def test_live_delivery_of_a_retained_publish_has_retain_0(daemon, version):
    t = topic("live")
    with Client(daemon, 5) as pub, Client(daemon, version) as sub:
        assert sub.subscribe(t, qos=1) == [1]
        pub.publish(t, b"now", qos=1, retain=True)
        # 3.1.1 §3.3.1.3 [MQTT-3.3.1-9]; 5.0 §3.3.1.3 with Retain As Published 0.
        assert [(m.payload, m.qos, m.retain) for m in sub.wait_count(1)] == [(b"now", 1, False)]
        if version == 5:
            # Retain As Published 1 (§3.8.3.1): the flag as the publisher set it.
            with Client(daemon, 5) as rap:
                assert rap.subscribe(t, qos=1, retain_as_published=True) == [1]
                assert [(m.payload, m.retain) for m in rap.wait_count(1)] == [(b"now", True)]
                pub.publish(t, b"again", qos=1, retain=True)
                pub.publish(t, b"plain", qos=1, retain=False)
                assert [(m.payload, m.retain) for m in rap.wait_count(3)] == \
                    [(b"now", True), (b"again", True), (b"plain", False)]
                assert [(m.payload, m.retain) for m in sub.wait_count(3)] == \
                    [(b"now", False), (b"again", False), (b"plain", False)]


@pytest.mark.parametrize("version", [4, 5])
def test_empty_retained_payload_clears_the_retained_message(daemon, version):
    base = topic("clear")
    with Client(daemon, 5) as pub:
        pub.publish(f"{base}/gone", b"x", qos=1, retain=True)
        pub.publish(f"{base}/kept", b"k", qos=1, retain=True)
        with Client(daemon, version) as existing:
            existing.subscribe(f"{base}/#")
            assert {m.topic for m in existing.wait_count(2)} == {f"{base}/gone", f"{base}/kept"}
            pub.publish(f"{base}/gone", b"", qos=1, retain=True)
            # 3.1.1 §3.3.1.3: the empty retained PUBLISH still goes to matching
            # subscribers as a normal message; it removes the retained one.
            last = existing.wait_count(3)[2]
            assert (last.topic, last.payload, last.retain) == (f"{base}/gone", b"", False)
        with Client(daemon, version) as later:
            later.subscribe(f"{base}/#")
            later.fence(pub)
            assert [(m.topic, m.payload) for m in later.got(base)] == [(f"{base}/kept", b"k")]
    retained = stored_retained(daemon)
    assert f"{base}/gone" not in retained
    assert retained[f"{base}/kept"] == b"k"


def test_newer_retained_message_replaces_the_older(daemon):
    t = topic("replace")
    with Client(daemon, 5) as pub:
        for payload in (b"v1", b"v2", b"v3"):
            pub.publish(t, payload, qos=1, retain=True)
        for version in (4, 5):
            with Client(daemon, version) as sub:
                sub.subscribe(t, qos=1)
                sub.fence(pub)
                assert [(m.payload, m.retain) for m in sub.got(t)] == [(b"v3", True)]
    assert stored_retained(daemon)[t] == b"v3"


@pytest.mark.parametrize("version", [4, 5])
def test_wildcard_subscribe_gets_every_matching_retained_message(daemon, version):
    base = topic("wild")
    values = {f"{base}/a/temp": b"1", f"{base}/b/temp": b"2", f"{base}/b/hum": b"3",
              f"{base}/c/d/temp": b"4", base: b"5", f"{base}x/a/temp": b"not under base"}
    with Client(daemon, 5) as pub:
        for t, payload in values.items():
            pub.publish(t, payload, qos=1, retain=True)
        with Client(daemon, version) as plus, Client(daemon, version) as multi:
            plus.subscribe(f"{base}/+/temp")
            multi.subscribe(f"{base}/#")
            plus.fence(pub)
            multi.fence(pub)
            got_plus = plus.got(base)
            got_multi = multi.got(base)
    assert sorted((m.topic, m.payload) for m in got_plus) == \
        [(f"{base}/a/temp", b"1"), (f"{base}/b/temp", b"2")]
    # §4.7.1.2: "sport/#" also matches "sport" itself.
    assert sorted((m.topic, m.payload) for m in got_multi) == sorted(
        (t, p) for t, p in values.items() if t == base or t.startswith(base + "/"))
    assert all(m.retain for m in got_plus + got_multi)


def test_wildcard_at_the_first_level_does_not_send_dollar_retained_messages(daemon):
    leaf = uid("leaf")
    with Client(daemon, 5) as pub:
        pub.publish(f"$rw/{leaf}", b"dollar", qos=1, retain=True)
        pub.publish(f"plain/{leaf}", b"plain", qos=1, retain=True)
        with Client(daemon, 5) as wild, Client(daemon, 5) as explicit:
            wild.subscribe(f"+/{leaf}")
            explicit.subscribe(f"$rw/{leaf}")
            wild.fence(pub)
            explicit.fence(pub)
            # MQTT 5.0 §4.7.2 [MQTT-4.7.2-1] (3.1.1 the same).
            assert [(m.topic, m.retain) for m in wild.got()] == [(f"plain/{leaf}", True)]
            assert [(m.topic, m.retain) for m in explicit.got()] == [(f"$rw/{leaf}", True)]


def test_retained_message_expiry(daemon):
    base = topic("expiry")
    with Client(daemon, 5) as pub:
        pub.publish(f"{base}/short", b"short", qos=1, retain=True, props=expiry_props(1))
        pub.publish(f"{base}/long", b"long", qos=1, retain=True, props=expiry_props(30))
        with Client(daemon, 5) as early:
            early.subscribe(f"{base}/#")
            got = {m.topic: m for m in early.wait_count(2, base)}
            assert prop(got[f"{base}/short"], "MessageExpiryInterval") == 1
        # The scenario: the short one's Message Expiry Interval passes.
        time.sleep(2.0)
        for version in (5, 4):
            with Client(daemon, version) as late:
                late.subscribe(f"{base}/#")
                late.fence(pub)
                got = late.got(base)
                # MQTT 5.0 §3.3.2.3.3: an expired message is not sent to a new subscriber.
                assert [(m.topic, m.payload, m.retain) for m in got] == \
                    [(f"{base}/long", b"long", True)]
                if version == 5:
                    # ... and the one sent carries what is left of its interval.
                    assert 25 <= prop(got[0], "MessageExpiryInterval") <= 28


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_retained_messages_survive_a_restart(tmp_path, how):
    d = start(tmp_path)
    try:
        raw = Raw(d, 5)
        raw.connect("retainer")
        packets = [
            _frame.Publish("keep/a", b"a1", qos=1, retain=True, packet_id=1),
            _frame.Publish("keep/a", b"a2", qos=2, retain=True, packet_id=2),
            _frame.Publish("keep/b", b"b", qos=1, retain=True, packet_id=3,
                           properties={"content_type": "text/plain"}),
            _frame.Publish("keep/c", b"c", qos=1, retain=True, packet_id=4),
            _frame.Publish("keep/c", b"", qos=1, retain=True, packet_id=5),
        ]
        raw.send(*packets)
        acks = raw.read(want=5)
        assert [(a.packet_id, a.reason_code) for a in acks] == [(i, 0) for i in range(1, 6)]
        # Acked means committed: stop (drain) or crash right away.
        if how == "sigterm":
            assert d.stop() == 0
        else:
            d.kill()
        raw.close()
        assert stored_retained(d) == {"keep/a": b"a2", "keep/b": b"b"}
        d.start()
        with Client(d, 5) as pub:
            for version in (5, 4):
                with Client(d, version) as sub:
                    sub.subscribe("keep/#", qos=2)
                    sub.fence(pub)
                    got = sorted(sub.got("keep/"), key=lambda m: m.topic)
                    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == \
                        [("keep/a", b"a2", 2, True), ("keep/b", b"b", 1, True)]
                    if version == 5:
                        assert prop(got[1], "ContentType") == "text/plain"
    finally:
        d.kill()


# == will messages =====================================================================


def test_will_published_when_keepalive_lapses(daemon):
    base = topic("will-keepalive")
    with Client(daemon, 5) as sub:
        sub.subscribe(f"{base}/#", qos=1)
        t0 = time.monotonic()
        sleepers = {v: will_client(daemon, v, uid(f"sleeper{v}"), f"{base}/{v}",
                                   payload=f"v{v} lapsed".encode(), keepalive=1)
                    for v in (4, 5)}
        # 3.1.1 and 5.0 §3.1.2.10: closed after one and a half keepalives of silence.
        got = {m.topic: m for m in sub.wait_count(2, base, timeout=6)}
        assert {t: (m.payload, m.qos, m.retain) for t, m in got.items()} == {
            f"{base}/4": (b"v4 lapsed", 1, False), f"{base}/5": (b"v5 lapsed", 1, False)}
        assert all(m.at - t0 >= 1.3 for m in got.values())
        # MQTT 5.0 §3.14.2.1: DISCONNECT 0x8D Keep Alive timeout; 3.1.1 just closes.
        assert [(p.type, p.reason_code) for p in sleepers[5].closed()] == \
            [(_frame.DISCONNECT, 0x8D)]
        assert sleepers[4].closed() == []
    for v in (4, 5):
        (rec,) = logged(daemon, f"{base}/{v}")
        assert (rec["payload"], rec["qos"], rec["retain"]) == (f"v{v} lapsed", 1, False)
        assert rec["client"].startswith(f"sleeper{v}-")


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_when_the_socket_is_reset(daemon, version):
    t = topic("will-reset")
    cid = uid("vanisher")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=2)
        r = will_client(daemon, version, cid, t, payload=b"reset", qos=2)
        t0 = time.monotonic()
        r.abort()
        (m,) = sub.wait_count(1, t)
        assert (m.payload, m.qos, m.retain) == (b"reset", 2, False)
        assert m.at - t0 < 2.0
    (rec,) = logged(daemon, t)
    assert (rec["payload"], rec["qos"], rec["client"]) == ("reset", 2, cid)


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_when_the_socket_is_closed_without_disconnect(daemon, version):
    t = topic("will-fin")
    with Client(daemon, version) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, version, uid("closer"), t, payload=b"fin")
        r.close()
        assert [(m.payload, m.retain) for m in sub.wait_count(1, t)] == [(b"fin", False)]
    assert [r["payload"] for r in logged(daemon, t)] == ["fin"]


@pytest.mark.parametrize("version", [4, 5])
def test_will_published_on_a_protocol_error(daemon, version):
    t = topic("will-garbage")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, version, uid("garbler"), t, payload=b"spoke garbage")
        # Packet type 0 is reserved (3.1.1 and 5.0 §2.1.2): a malformed packet.
        r.sock.sendall(b"\x00\x04junk")
        reply = r.closed()
        if version == 5:
            # MQTT 5.0 §4.13: DISCONNECT with a reason code >= 0x80, then close.
            assert [p.type for p in reply] == [_frame.DISCONNECT]
            assert reply[0].reason_code >= 0x80
        else:
            assert reply == []
        assert [m.payload for m in sub.wait_count(1, t)] == [b"spoke garbage"]
    assert [r["payload"] for r in logged(daemon, t)] == ["spoke garbage"]


@pytest.mark.parametrize("version", [4, 5])
def test_no_will_on_a_normal_disconnect(daemon, version):
    t = topic("will-polite")
    with Client(daemon, 5) as pub, Client(daemon, version) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, version, uid("polite"), t, payload=b"must not appear")
        disconnect_normally(r)
        # Anything the close published is routed before this fence.
        sub.fence(pub)
        assert sub.got(t) == []
    assert logged(daemon, t) == []


def test_v5_disconnect_0x04_publishes_the_will_with_its_properties(daemon):
    t = topic("will-0x04")
    will_props = {"content_type": "text/plain", "response_topic": "replies/here",
                  "correlation_data": b"\x00corr", "payload_format_indicator": 1,
                  "user_property": [("why", "leaving"), ("why", "twice")]}
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, uid("leaver"), t, payload=b"left with will",
                        will_props=will_props)
        # MQTT 5.0 §3.14.2.1: 0x04 Disconnect with Will Message.
        r.send(_frame.Disconnect(0x04))
        assert r.closed() == []
        (m,) = sub.wait_count(1, t)
        assert (m.payload, m.qos, m.retain) == (b"left with will", 1, False)
        # MQTT 5.0 §3.1.3.2: the Will Properties go out with the Will Message.
        assert prop(m, "ContentType") == "text/plain"
        assert prop(m, "ResponseTopic") == "replies/here"
        assert prop(m, "CorrelationData") == b"\x00corr"
        assert prop(m, "PayloadFormatIndicator") == 1
        assert prop(m, "UserProperty") == [("why", "leaving"), ("why", "twice")]
    assert [r["payload"] for r in logged(daemon, t)] == ["left with will"]


@pytest.mark.parametrize("version", [4, 5])
def test_retained_will_becomes_the_retained_message(daemon, version):
    t = topic("will-retained")
    with Client(daemon, 5) as pub:
        pub.publish(t, b"online", qos=1, retain=True)
        with Client(daemon, 5) as live:
            live.subscribe(t, qos=1)
            live.wait_count(1, t)
            cid = uid("status")
            r = will_client(daemon, version, cid, t, payload=b"offline", retain=True)
            r.abort()
            assert [(m.payload, m.retain) for m in live.wait_count(2, t)] == \
                [(b"online", True), (b"offline", False)]
        with Client(daemon, version) as later:
            later.subscribe(t, qos=1)
            later.fence(pub)
            assert [(m.payload, m.qos, m.retain) for m in later.got(t)] == \
                [(b"offline", 1, True)]
    assert stored_retained(daemon)[t] == b"offline"
    # Two publishers, two partitions: no order between the records to check.
    assert sorted((r["payload"], r["retain"], r["client"]) for r in logged(daemon, t)) == \
        [("offline", True, cid), ("online", True, pub.id)]


def test_will_delay_interval_publishes_after_the_delay(daemon):
    t = topic("will-delay")
    cid = uid("delayed")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, cid, t, payload=b"late", expiry=60,
                        will_props={"will_delay_interval": 2})
        t0 = time.monotonic()
        r.abort()
        (m,) = sub.wait_count(1, t, timeout=6)
        # MQTT 5.0 §3.1.3.2.2: published once the Will Delay Interval has passed.
        assert 1.8 <= m.at - t0 <= 3.5, m.at - t0
        assert (m.payload, m.retain) == (b"late", False)
        # The delay is not a PUBLISH property (§3.3.2.3): it is not passed on.
        assert prop(m, "WillDelayInterval") is None
    end_session(daemon, cid)
    assert [(r["payload"], r["client"]) for r in logged(daemon, t)] == [("late", cid)]


def test_will_delay_interval_cancelled_when_the_client_reconnects_in_time(daemon):
    t = topic("will-back")
    cid = uid("returner")
    with Client(daemon, 5) as pub, Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, cid, t, payload=b"must not appear", expiry=60,
                        will_props={"will_delay_interval": 2})
        t0 = time.monotonic()
        r.abort()
        time.sleep(0.5)
        back = Raw(daemon, 5)
        connack = back.connect(cid, clean_start=False, properties={"session_expiry_interval": 60})
        assert connack.session_present is True
        assert time.monotonic() - t0 < 1.0
        # The scenario: wait past the delay, then fence.
        time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
        sub.fence(pub)
        # MQTT 5.0 §3.1.3.2.2 [MQTT-3.1.3-9]: a new connection to the session in time.
        assert sub.got(t) == []
        disconnect_normally(back)
    end_session(daemon, cid)
    assert logged(daemon, t) == []


def test_will_delay_interval_ends_early_when_a_clean_start_discards_the_session(daemon):
    t = topic("will-clean")
    cid = uid("cleaner")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, cid, t, payload=b"session ended", expiry=60,
                        will_props={"will_delay_interval": 30})
        r.abort()
        time.sleep(0.3)
        t0 = time.monotonic()
        back = Raw(daemon, 5)
        connack = back.connect(cid, clean_start=True, properties={"session_expiry_interval": 60})
        assert connack.session_present is False
        # MQTT 5.0 §3.1.2.4 [MQTT-3.1.2-4]: Clean Start 1 discards the session, and
        # §3.1.2.5 / §3.1.3.2.2: the Will goes when the delay passes or the session
        # ends, whichever is first -- here at once (Mosquitto does the same).
        (m,) = sub.wait_count(1, t, timeout=3)
        assert m.payload == b"session ended"
        assert m.at - t0 < 1.5
        disconnect_normally(back)
    end_session(daemon, cid)


def test_will_delay_interval_with_session_expiry_0_publishes_at_once(daemon):
    t = topic("will-now")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, uid("brief"), t, payload=b"at once", expiry=0,
                        will_props={"will_delay_interval": 30})
        t0 = time.monotonic()
        r.abort()
        (m,) = sub.wait_count(1, t)
        # §3.1.3.2.2: the session ends with the connection, and the Will with it.
        assert m.at - t0 < 1.0
        assert m.payload == b"at once"


def test_will_delay_longer_than_session_expiry_publishes_when_the_session_ends(daemon):
    t = topic("will-expiry")
    with Client(daemon, 5) as sub:
        sub.subscribe(t, qos=1)
        r = will_client(daemon, 5, uid("expirer"), t, payload=b"session over", expiry=1,
                        will_props={"will_delay_interval": 30})
        t0 = time.monotonic()
        r.abort()
        (m,) = sub.wait_count(1, t, timeout=5)
        # §3.1.2.5 (non-normative): a delay longer than the session expiry makes the
        # Will announce the session's end.
        assert 0.8 <= m.at - t0 <= 2.5, m.at - t0
        assert m.payload == b"session over"


# == shared subscriptions ==============================================================

MESSAGES = 300


def publish_jobs(daemon, root, n=MESSAGES):
    with Client(daemon, 5) as pub:
        infos = [pub.c.publish(f"{root}/{i % 7}", str(i).encode(), qos=1) for i in range(n)]
        # Every PUBACK back: all stored, and routed to the group.
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()


def payloads(clients, root):
    return [int(m.payload) for c in clients for m in c.got(root + "/")]


def wait_total(clients, root, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while len(payloads(clients, root)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return payloads(clients, root)


@pytest.mark.parametrize("version", [5, 4])
def test_shared_subscription_each_message_to_exactly_one_member(daemon, version):
    root = "jobs" if version == 5 else "jobs311"
    members = [Client(daemon, version, client_id=uid(f"worker{version}")) for _ in range(3)]
    try:
        for m in members:
            assert m.subscribe(f"$share/g/{root}/#", qos=1) == [1]
        with Client(daemon, 5) as fencer:
            publish_jobs(daemon, root)
            got = wait_total(members, root, MESSAGES)
            for m in members:
                m.fence(fencer)
        got = payloads(members, root)
        # MQTT 5.0 §4.8.2: each message to one member of the group.
        assert sorted(got) == list(range(MESSAGES))
        shares = [len(m.got(root + "/")) for m in members]
        assert all(n >= MESSAGES // 5 for n in shares), shares
        assert all(not msg.retain and msg.qos == 1 for m in members for msg in m.got(root + "/"))
    finally:
        for m in members:
            m.stop()


def test_two_share_groups_on_one_filter_each_get_every_message(daemon):
    root = "jobs2"
    groups = {g: [Client(daemon, 5, client_id=uid(f"{g}-member")) for _ in range(2)]
              for g in ("g1", "g2")}
    everyone = groups["g1"] + groups["g2"]
    try:
        for g, members in groups.items():
            for m in members:
                assert m.subscribe(f"$share/{g}/{root}/#", qos=1) == [1]
        with Client(daemon, 5) as fencer:
            publish_jobs(daemon, root)
            wait_total(everyone, root, 2 * MESSAGES)
            for m in everyone:
                m.fence(fencer)
        for g, members in groups.items():
            assert sorted(payloads(members, root)) == list(range(MESSAGES)), g
            shares = [len(m.got(root + "/")) for m in members]
            assert all(n >= MESSAGES // 5 for n in shares), (g, shares)
    finally:
        for m in everyone:
            m.stop()


@pytest.mark.parametrize("expiry", [0, 60])
def test_shared_member_that_leaves_unacked_hands_its_messages_over(daemon, expiry):
    root = f"jobs-leave-{expiry}"
    cid = uid("hoarder")
    hoarder = Raw(daemon, 5)
    hoarder.connect(cid, properties={"session_expiry_interval": expiry} if expiry else None)
    hoarder.send(_frame.Subscribe(1, [(f"$share/g/{root}/#", 1)]))
    (suback,) = hoarder.read()
    assert (suback.type, suback.reason_codes) == (_frame.SUBACK, [1])
    members = [Client(daemon, 5, client_id=uid("worker")) for _ in range(2)]
    try:
        for m in members:
            assert m.subscribe(f"$share/g/{root}/#", qos=1) == [1]
        publish_jobs(daemon, root)
        # The hoarder takes its share and never sends a PUBACK.
        held = []
        deadline = time.monotonic() + 10
        while len(held) + len(payloads(members, root)) < MESSAGES and time.monotonic() < deadline:
            held += [int(p.payload) for p in hoarder.read(want=1, timeout=0.1)
                     if p.type == _frame.PUBLISH]
        assert len(held) + len(payloads(members, root)) == MESSAGES
        assert len(held) >= MESSAGES // 5, "the hoarder got no fair share to hand over"
        # It leaves without DISCONNECT, nothing acked.
        hoarder.abort()
        got = wait_total(members, root, MESSAGES)
        with Client(daemon, 5) as fencer:
            for m in members:
                m.fence(fencer)
        got = payloads(members, root)
        # Its unacked copies went to the others, each exactly once: all 300 arrived.
        assert sorted(got) == list(range(MESSAGES))
        assert set(held) <= set(got)
    finally:
        for m in members:
            m.stop()
        if expiry:
            end_session(daemon, cid)


# == mosquitto_sub interop =============================================================


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_sub_receives_a_retained_message_from_paho(daemon, version):
    t = topic("mosq")
    fmt = ["-F", "%t|%r|%q|%p"]
    with Client(daemon, 5) as pub:
        pub.publish(t, b"hello from paho", qos=1, retain=True)
        res = subprocess.run([MOSQUITTO_SUB, "-h", daemon.host, "-p", str(daemon.port),
                              "-V", version, "-q", "1", "-t", t, "-C", "1", "-W", "10", *fmt],
                             capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [f"{t}|1|1|hello from paho"]
        # -R: messages with the retain flag are stale and not printed; the first live
        # one is (and -C 1 then exits).
        sub = subprocess.Popen([MOSQUITTO_SUB, "-h", daemon.host, "-p", str(daemon.port),
                                "-V", version, "-q", "1", "-t", t, "-C", "1", "-W", "10", "-R",
                                *fmt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            n = 0
            while sub.poll() is None and time.monotonic() < deadline:
                pub.publish(t, f"live {n}".encode(), qos=1)
                n += 1
                time.sleep(0.05)
            out, err = sub.communicate(timeout=10)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait()
        assert sub.returncode == 0, err
        (line,) = out.splitlines()
        assert line.startswith(f"{t}|0|1|live ")
