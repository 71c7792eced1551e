"""MQTT conformance, end to end: the real daemon, raw sockets with exact wire
codes, paho-mqtt, and Mosquitto's own command-line clients.

Each test checks both sides of the contract: what the server answers on the
wire (reason codes, CONNACK properties, who closes) and what it stored
(``pushcore log dump``, and for MQTT 5 properties the record itself).
"""

import ast
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pushcore import _frame
from support import ROOT, Daemon

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO_PUB is None or MOSQUITTO_SUB is None,
    reason="mosquitto-clients (mosquitto_pub, mosquitto_sub) is not installed")


def start(tmp_path, config=""):
    """The daemon with ``config`` appended to an ``mqtt:`` section (indent mqtt keys by two)."""
    return Daemon(tmp_path, config="mqtt:\n  connect_timeout: 2s\n" + config).start()


@pytest.fixture
def daemon(tmp_path):
    d = start(tmp_path)
    yield d
    d.kill()


# -- raw sockets ------------------------------------------------------------------


class Raw:
    """One MQTT connection driven by hand: send packets, read the server's packets."""

    def __init__(self, daemon, version=5):
        self.version = version
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=version)
        self.buf = bytearray()

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, self.version) for p in packets))

    def send_bytes(self, data):
        self.sock.sendall(data)

    def connect(self, client_id="raw", keepalive=30, clean_start=True, properties=None):
        self.send(_frame.Connect(client_id=client_id, protocol_level=self.version,
                                 keepalive=keepalive, clean_start=clean_start,
                                 properties=properties))
        (connack,) = self.read()
        return connack

    def read(self, want=1, timeout=5.0):
        """The next ``want`` packets; fewer only if the server closed first."""
        self.sock.settimeout(timeout)
        got = []
        while True:
            packets, consumed, error = self.parser.parse(self.buf, 0, len(self.buf))
            assert error is None, error
            got.extend(packets)
            del self.buf[:consumed]
            if len(got) >= want:
                return got
            chunk = self.sock.recv(65536)
            if not chunk:
                return got
            self.buf += chunk

    def closed_silently(self, timeout=5.0):
        """True when the server closes the connection without sending a byte."""
        self.sock.settimeout(timeout)
        data = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        assert data == b"", f"expected no reply, got {data.hex()}"
        return True

    def closed(self, timeout=5.0):
        """True when the server closes the connection (after any packets already read)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def connected(daemon, version=5, client_id="raw", **kw):
    c = Raw(daemon, version)
    connack = c.connect(client_id, **kw)
    assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0)
    return c


def pub(topic, payload, qos=1, packet_id=None, retain=False, **props):
    if packet_id is None:
        packet_id = 1 if qos else 0
    return _frame.Publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id,
                          properties=props or None)


def stored(daemon, topic):
    return [r for r in daemon.dump() if r["topic"] == topic]


def stored_properties(daemon):
    """{topic: [decoded MQTT 5 properties of each record]} read from the log itself.

    Runs in a subprocess: py-lmdb may not open one environment twice in a
    process, and keeping the test process out of LMDB keeps that true.
    """
    script = (
        "import sys\n"
        "from pushcore.log import Log\n"
        "from pushcore.record import decode_record\n"
        "from pushcore._frame import decode_properties\n"
        "log = Log(sys.argv[1], partitions=None, readonly=True)\n"
        "out = {}\n"
        "for part in range(log.partitions):\n"
        "    for _off, data in log.read(part):\n"
        "        rec = decode_record(data)\n"
        "        out.setdefault(rec.topic, []).append(decode_properties(rec.properties))\n"
        "log.close()\n"
        "print(repr(out))\n")
    res = subprocess.run([sys.executable, "-c", script, daemon.data_dir], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return ast.literal_eval(res.stdout)


def fence(daemon):
    """Return once everything the daemon read before now is committed.

    A QoS 0 publish has no ack to wait for.  The fence is a QoS 1 publish on a
    new connection: its CONNECT is read in a later loop iteration than bytes
    that arrived before it, batches commit in order, and its PUBACK leaves only
    after its own batch is committed.
    """
    c = connected(daemon, 5, f"fence-{time.monotonic_ns()}")
    c.send(pub("fence", b"", packet_id=1))
    (ack,) = c.read()
    assert (ack.type, ack.reason_code) == (_frame.PUBACK, 0)
    c.close()


def paho(daemon, version=5, client_id="", keepalive=30):
    """A started paho client and what its CONNACK said ({"rc", "props"})."""
    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
    got = {}
    ready = threading.Event()

    def _on_connect(client, userdata, flags, reason_code, properties):
        got["rc"] = reason_code
        got["props"] = properties
        ready.set()

    c.on_connect = _on_connect
    c.connect(daemon.host, daemon.port, keepalive=keepalive)
    c.loop_start()
    assert ready.wait(5), "paho got no CONNACK"
    return c, got


def paho_stop(c):
    c.disconnect()
    c.loop_stop()


# -- MQTT 5 inbound topic aliases (§3.3.2.3.4) ------------------------------------------


def test_topic_alias_set_then_use_stores_full_topic(daemon):
    c = connected(daemon, 5, "aliaser")
    c.send(pub("alias/full/topic", b"first", packet_id=1, topic_alias=3),
           pub("", b"second", packet_id=2, topic_alias=3),
           pub("", b"third", qos=0, topic_alias=3),
           pub("", b"fourth", qos=2, packet_id=3, topic_alias=3))
    acks = c.read(3)
    assert [(a.type, a.packet_id, a.reason_code) for a in acks] == [
        (_frame.PUBACK, 1, 0), (_frame.PUBACK, 2, 0), (_frame.PUBREC, 3, 0)]
    # The alias can be pointed at another topic (§3.3.2.3.4: the mapping is replaced).
    c.send(pub("alias/other", b"fifth", packet_id=4, topic_alias=3),
           pub("", b"sixth", packet_id=5, topic_alias=3))
    assert [a.packet_id for a in c.read(2)] == [4, 5]
    records = daemon.dump()
    by_payload = {r["payload"]: r["topic"] for r in records if r["client"] == "aliaser"}
    assert by_payload == {"first": "alias/full/topic", "second": "alias/full/topic",
                          "third": "alias/full/topic", "fourth": "alias/full/topic",
                          "fifth": "alias/other", "sixth": "alias/other"}
    # The alias is a property of the connection, not of the message: not stored.
    props = stored_properties(daemon)
    assert props["alias/full/topic"] == [None] * 4
    assert props["alias/other"] == [None] * 2


@pytest.mark.parametrize("alias", [0, 65])
def test_topic_alias_zero_or_above_maximum_is_0x94(daemon, alias):
    c = connected(daemon, 5, f"badalias{alias}")
    c.send(pub("a/topic", b"x", packet_id=1, topic_alias=alias))
    (disc,) = c.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x94)
    assert c.closed()
    assert stored(daemon, "a/topic") == []


def test_topic_alias_maximum_zero_refuses_every_alias(tmp_path):
    d = start(tmp_path, "  topic_alias_maximum: 0\n")
    try:
        c = Raw(d, 5)
        connack = c.connect("noalias")
        # MQTT 5.0 §3.2.2.3.8: absent means 0, so the server may omit it or say 0.
        assert connack.properties.get("topic_alias_maximum", 0) == 0
        c.send(pub("t", b"x", packet_id=1, topic_alias=1))
        (disc,) = c.read()
        assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x94)
    finally:
        d.kill()


def test_unknown_topic_alias_with_empty_topic_is_0x82(daemon):
    c = connected(daemon, 5, "unknownalias")
    c.send(pub("known", b"ok", packet_id=1, topic_alias=1))
    (ack,) = c.read()
    assert (ack.type, ack.reason_code) == (_frame.PUBACK, 0)
    c.send(pub("", b"lost", packet_id=2, topic_alias=2))
    (disc,) = c.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x82)
    assert c.closed()
    assert [r["payload"] for r in daemon.dump() if r["client"] == "unknownalias"] == ["ok"]


def test_topic_alias_does_not_outlive_its_connection(daemon):
    first = connected(daemon, 5, "alias-conn")
    first.send(pub("per/connection", b"1", packet_id=1, topic_alias=7))
    assert first.read()[0].reason_code == 0
    first.close()
    second = connected(daemon, 5, "alias-conn2")
    second.send(pub("", b"2", packet_id=1, topic_alias=7))
    (disc,) = second.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x82)


# -- Server Keep Alive (§3.2.2.3.14) ------------------------------------------------------


@pytest.fixture
def keepalive_daemon(tmp_path):
    d = start(tmp_path, "  keepalive_max: 1\n")
    yield d
    d.kill()


def test_server_keep_alive_is_sent_and_enforced(keepalive_daemon):
    c = Raw(keepalive_daemon, 5)
    t0 = time.monotonic()
    connack = c.connect("lazy", keepalive=60)
    assert connack.reason_code == 0
    assert connack.properties["server_keep_alive"] == 1
    # The server holds the client to ITS value: 1.5 x 1 s, not 1.5 x 60 s.
    (disc,) = c.read(timeout=10)
    elapsed = time.monotonic() - t0
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x8D)
    assert 1.4 <= elapsed < 4.0
    assert c.closed()


def test_server_keep_alive_replaces_keepalive_zero(keepalive_daemon):
    c = Raw(keepalive_daemon, 5)
    connack = c.connect("forever", keepalive=0)
    assert connack.properties["server_keep_alive"] == 1
    (disc,) = c.read(timeout=10)
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x8D)


def test_keepalive_within_maximum_gets_no_server_keep_alive(keepalive_daemon):
    c = Raw(keepalive_daemon, 5)
    connack = c.connect("modest", keepalive=1)
    assert connack.reason_code == 0
    assert "server_keep_alive" not in connack.properties


def test_paho_follows_server_keep_alive(tmp_path):
    d = start(tmp_path, "  keepalive_max: 2\n")
    try:
        lost = []
        c, got = paho(d, 5, client_id="paho-ka", keepalive=60)
        c.on_disconnect = lambda client, userdata, flags, rc, props: lost.append(rc)
        assert got["rc"] == 0 and got["props"].ServerKeepAlive == 2
        # paho adopts the Server Keep Alive and pings every 2 s, so it outlives the
        # 3 s (1.5 x 2) after which a client keeping its own 60 s would be closed.
        time.sleep(3.6)
        assert lost == []
        info = c.publish("ka/alive", b"still here", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        paho_stop(c)
        assert [r["payload"] for r in stored(d, "ka/alive")] == ["still here"]
    finally:
        d.kill()


def test_v311_keepalive_above_maximum_is_refused_0x02(keepalive_daemon):
    # 3.1.1 has no Server Keep Alive to tell the client; accepting it would mean
    # closing a client that keeps its own (longer) keepalive.  Mosquitto's
    # max_keepalive answers CONNACK 0x02 Identifier rejected; so does pushcore.
    for keepalive in (10, 0):
        c = Raw(keepalive_daemon, 4)
        c.send(_frame.Connect(client_id=f"old-{keepalive}", protocol_level=4, keepalive=keepalive))
        c.sock.settimeout(5)
        assert c.sock.recv(16) == b"\x20\x02\x00\x02"
        assert c.closed()
    ok = connected(keepalive_daemon, 4, "old-ok", keepalive=1)
    ok.send(pub("ka/v311", b"ok", packet_id=1))
    (ack,) = ok.read()
    assert (ack.type, ack.packet_id) == (_frame.PUBACK, 1)


# -- Payload Format Indicator (§3.3.2.3.2) -----------------------------------------------


def test_payload_format_invalid_qos1_puback_0x99_in_order(daemon):
    c = connected(daemon, 5, "pfi1")
    # Three publishes in one write: the refusal of the middle one must not overtake
    # the ack of the first, which waits for its commit (§4.6: acks in arrival order).
    c.send(pub("pfi/ok", b"before", packet_id=1),
           pub("pfi/bad", b"\xff\xfe not utf-8", packet_id=2, payload_format_indicator=1),
           pub("pfi/ok", b"after", packet_id=3))
    acks = c.read(3)
    assert [(a.type, a.packet_id, a.reason_code) for a in acks] == [
        (_frame.PUBACK, 1, 0), (_frame.PUBACK, 2, 0x99), (_frame.PUBACK, 3, 0)]
    # Refused alone, with nothing waiting: answered at once; the connection goes on.
    c.send(pub("pfi/bad", b"\xc3\x28", packet_id=4, payload_format_indicator=1))
    (ack,) = c.read()
    assert (ack.type, ack.packet_id, ack.reason_code) == (_frame.PUBACK, 4, 0x99)
    c.send(pub("pfi/text", "grüße".encode(), packet_id=5, payload_format_indicator=1))
    (ack,) = c.read()
    assert (ack.packet_id, ack.reason_code) == (5, 0)
    assert stored(daemon, "pfi/bad") == []
    assert [r["payload"] for r in stored(daemon, "pfi/ok")] == ["before", "after"]
    assert [r["payload"] for r in stored(daemon, "pfi/text")] == ["grüße"]
    assert stored_properties(daemon)["pfi/text"] == [{"payload_format_indicator": 1}]


def test_payload_format_invalid_qos2_pubrec_0x99_ends_the_flow(daemon):
    c = connected(daemon, 5, "pfi2")
    c.send(pub("pfi2/bad", b"\x80", qos=2, packet_id=9, payload_format_indicator=1))
    (rec,) = c.read()
    assert (rec.type, rec.packet_id, rec.reason_code) == (_frame.PUBREC, 9, 0x99)
    # §4.3.3: a PUBREC >= 0x80 ends the flow; the id is free, a PUBREL finds nothing.
    c.send_bytes(_frame.encode_ack(_frame.PUBREL, 9, 0, 5))
    (comp,) = c.read()
    assert (comp.type, comp.packet_id, comp.reason_code) == (_frame.PUBCOMP, 9, 0x92)
    c.send(pub("pfi2/good", b"fine", qos=2, packet_id=9))
    (rec,) = c.read()
    assert (rec.type, rec.packet_id, rec.reason_code) == (_frame.PUBREC, 9, 0)
    assert stored(daemon, "pfi2/bad") == []
    assert len(stored(daemon, "pfi2/good")) == 1


def test_payload_format_invalid_qos0_disconnect_0x99(daemon):
    c = connected(daemon, 5, "pfi0")
    c.send(pub("pfi0/bad", b"\xed\xa0\x80", qos=0, payload_format_indicator=1))
    (disc,) = c.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x99)
    assert c.closed()
    fence(daemon)
    assert stored(daemon, "pfi0/bad") == []


# -- Maximum QoS (§3.2.2.3.4) ------------------------------------------------------------


def test_qos_above_max_qos(tmp_path):
    d = start(tmp_path, "  max_qos: 1\n")
    try:
        c = Raw(d, 5)
        connack = c.connect("q2pub")
        assert connack.reason_code == 0 and connack.properties["maximum_qos"] == 1
        c.send(pub("maxqos/ok", b"1", qos=1, packet_id=1))
        (ack,) = c.read()
        assert (ack.type, ack.reason_code) == (_frame.PUBACK, 0)
        c.send(pub("maxqos/two", b"2", qos=2, packet_id=2))
        (disc,) = c.read()
        assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x9B)
        assert c.closed()
        # 3.1.1 cannot be told: the connection is closed, as Mosquitto's max_qos does.
        old = connected(d, 4, "q2pub311")
        old.send(pub("maxqos/two", b"2", qos=2, packet_id=1))
        assert old.closed_silently()
        c, got = paho(d, 5, client_id="paho-maxqos")
        assert got["props"].MaximumQoS == 1
        paho_stop(c)
        assert stored(d, "maxqos/two") == []
        assert [r["payload"] for r in stored(d, "maxqos/ok")] == ["1"]
    finally:
        d.kill()


# -- client identifiers (§3.1.3.1) -------------------------------------------------------


def test_v311_empty_client_id_needs_clean_session(daemon):
    c = Raw(daemon, 4)
    c.send(_frame.Connect(client_id="", protocol_level=4, clean_start=False))
    c.sock.settimeout(5)
    assert c.sock.recv(16) == b"\x20\x02\x00\x02"
    assert c.closed()
    ok = Raw(daemon, 4)
    connack = ok.connect("", clean_start=True)
    assert (connack.reason_code, connack.properties) == (0, None)
    ok.send(pub("ids/v311", b"anon", packet_id=1))
    assert ok.read()[0].reason_code == 0
    (rec,) = stored(daemon, "ids/v311")
    assert rec["client"].startswith("pushcore-")


@pytest.mark.parametrize("clean_start", [True, False])
def test_v5_empty_client_id_is_assigned(daemon, clean_start):
    c = Raw(daemon, 5)
    connack = c.connect("", clean_start=clean_start)
    assert connack.reason_code == 0
    assigned = connack.properties["assigned_client_identifier"]
    assert assigned.startswith("pushcore-")
    topic = f"ids/v5/{clean_start}"
    c.send(pub(topic, b"anon", packet_id=1))
    assert c.read()[0].reason_code == 0
    assert [r["client"] for r in stored(daemon, topic)] == [assigned]


# -- packets in the wrong place ------------------------------------------------------------


def test_second_connect_v5_is_protocol_error(daemon):
    c = connected(daemon, 5, "twice")
    c.send(_frame.Connect(client_id="twice", protocol_level=5))
    (disc,) = c.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x82)
    assert c.closed()


def test_second_connect_v311_closes(daemon):
    c = connected(daemon, 4, "twice311")
    c.send(_frame.Connect(client_id="twice311", protocol_level=4))
    assert c.closed_silently()


@pytest.mark.parametrize("version", [4, 5])
def test_publish_before_connect_closes_without_reply(daemon, version):
    c = Raw(daemon, version)
    c.send(pub("early", b"x", qos=1, packet_id=1))
    assert c.closed_silently()
    assert stored(daemon, "early") == []


def test_authentication_method_connack_0x8c(daemon):
    c = Raw(daemon, 5)
    c.send(_frame.Connect(client_id="scram", protocol_level=5,
                          properties={"authentication_method": "SCRAM-SHA-1",
                                      "authentication_data": b"n,,n=user"}))
    c.sock.settimeout(5)
    # CONNACK, remaining length 3: flags 0, reason 0x8C Bad authentication method, no properties.
    assert c.sock.recv(16) == b"\x20\x03\x00\x8c\x00"
    assert c.closed()


def test_pubrel_unknown_packet_id(daemon):
    c5 = connected(daemon, 5, "pubrel5")
    c5.send_bytes(_frame.encode_ack(_frame.PUBREL, 77, 0, 5))
    c5.sock.settimeout(5)
    # MQTT 5.0 §3.7.2.1: PUBCOMP 0x92 Packet Identifier not found.
    assert c5.sock.recv(16) == b"\x70\x03\x00\x4d\x92"
    c311 = connected(daemon, 4, "pubrel311")
    c311.send_bytes(_frame.encode_ack(_frame.PUBREL, 77, 0, 4))
    c311.sock.settimeout(5)
    # 3.1.1 has no reason code: a plain PUBCOMP, so the client can free the id.
    assert c311.sock.recv(16) == b"\x70\x02\x00\x4d"


def test_unsubscribe_v5_0x11_per_filter_and_v311(daemon):
    c5 = connected(daemon, 5, "unsub5")
    c5.send(_frame.Unsubscribe(5, ["a/b", "c/#", "+/d"]))
    (ack,) = c5.read()
    assert (ack.type, ack.packet_id, ack.reason_codes) == (_frame.UNSUBACK, 5, [0x11] * 3)
    c311 = connected(daemon, 4, "unsub311")
    c311.send(_frame.Unsubscribe(6, ["a/b", "c/#"]))
    c311.sock.settimeout(5)
    assert c311.sock.recv(16) == b"\xb0\x02\x00\x06"

    got = []
    done = threading.Event()

    def on_unsubscribe(client, userdata, mid, reason_codes, properties):
        got.extend(rc.value for rc in reason_codes)
        done.set()

    c, _ = paho(daemon, 5, client_id="paho-unsub")
    c.on_unsubscribe = on_unsubscribe
    c.unsubscribe(["x/y", "z"])
    assert done.wait(5)
    paho_stop(c)
    assert got == [0x11, 0x11]


@pytest.mark.parametrize("ptype", [_frame.PUBACK, _frame.PUBCOMP])
def test_ack_for_a_delivery_not_in_flight_is_ignored(daemon, ptype):
    # A late PUBACK/PUBCOMP (e.g. for a delivery re-sent after a reconnect) is not an
    # error: nothing is in flight under that id, the connection goes on.
    for version in (5, 4):
        c = connected(daemon, version, f"acker{version}-{ptype}")
        c.send_bytes(_frame.encode_ack(ptype, 1, 0, version))
        c.send(_frame.Pingreq())
        (pong,) = c.read()
        assert pong.type == _frame.PINGRESP


def test_pubrec_for_an_unknown_id_gets_pubrel(daemon):
    c5 = connected(daemon, 5, "pubrec5")
    c5.send_bytes(_frame.encode_ack(_frame.PUBREC, 7, 0, 5))
    (rel,) = c5.read()
    # MQTT 5.0 §3.6.2.1: 0x92 Packet Identifier not found.
    assert (rel.type, rel.packet_id, rel.reason_code) == (_frame.PUBREL, 7, 0x92)
    c4 = connected(daemon, 4, "pubrec4")
    c4.send_bytes(_frame.encode_ack(_frame.PUBREC, 7, 0, 4))
    (rel,) = c4.read()
    assert (rel.type, rel.packet_id) == (_frame.PUBREL, 7)


def test_subscription_identifier_from_client_is_protocol_error(daemon):
    c = connected(daemon, 5, "subid")
    c.send(pub("subid/topic", b"x", packet_id=1, subscription_identifier=[5]))
    (disc,) = c.read()
    assert (disc.type, disc.reason_code) == (_frame.DISCONNECT, 0x82)
    assert stored(daemon, "subid/topic") == []


def test_suback_grants_or_says_why_per_filter(tmp_path):
    d = start(tmp_path, "  max_qos: 1\n  subscribe_deny: ['secret/#', '+/private']\n")
    try:
        c = connected(d, 5, "suber")
        c.send(_frame.Subscribe(3, [("a/b", 1), ("a/+", 0), ("a/#", 2), ("$share/g/a/b", 1),
                                    ("a/#/b", 1), ("$share//x", 0), ("secret/x", 1),
                                    ("x/private", 0), ("x/+", 0)]))
        (ack,) = c.read()
        # Granted QoS = min(requested, max_qos); 0x8F topic filter invalid; 0x87 Not
        # authorized for a filter in mqtt.subscribe_deny (x/+ reaches more than x/private).
        assert ack.reason_codes == [1, 0, 1, 1, 0x8F, 0x8F, 0x87, 0x87, 0]
        c311 = connected(d, 4, "suber311")
        c311.send(_frame.Subscribe(4, [("secret/#", 1), ("a/#", 1), ("a/#/b", 0)]))
        (ack,) = c311.read()
        # MQTT 3.1.1 §3.9.3: 0x80 is its only failure code.
        assert ack.reason_codes == [0x80, 1, 0x80]
    finally:
        d.kill()


# -- dedup by a JSON field for 3.1.1 publishers -------------------------------------------


def test_v311_json_field_dedup(tmp_path):
    d = start(tmp_path, "dedup:\n  json_field: id\n")
    try:
        c = connected(d, 4, "json311")
        deep = b'{"a":' * 50000 + b"1" + b"}" * 50000
        payloads = [b'{"id": "j-1", "v": 1}', b'{"v": 2, "id": "j-1"}', b"plain text",
                    b'{"id": 7}', b"[1, 2]", b'{"no": "id"}', deep, b'{"id": "j-2"}']
        c.send(*(pub("json/in", p, packet_id=i) for i, p in enumerate(payloads, 1)))
        acks = c.read(len(payloads))
        # Every message is acked (the duplicate too, as a success), in order.
        assert [(a.type, a.packet_id, a.reason_code) for a in acks] == \
            [(_frame.PUBACK, i, 0) for i in range(1, len(payloads) + 1)]
        v5 = connected(d, 5, "json5")
        v5.send(pub("json/in5", b'{"id": "j-1"}', packet_id=1))
        assert v5.read()[0].reason_code == 0
        records = stored(d, "json/in")
        ids = sorted((r["id"] is None, r["id"] or "", r.get("payload", "")[:12]) for r in records)
        assert ids == sorted([
            (False, "j-1", '{"id": "j-1"'),     # the first of the two; the second is a duplicate
            (True, "", "plain text"),
            (False, "7", '{"id": 7}'),
            (True, "", "[1, 2]"),
            (True, "", '{"no": "id"}'),
            (True, "", '{"a":{"a":{"'),         # nested too deep to parse: no id, still stored
            (False, "j-2", '{"id": "j-2"'),
        ])
        # The JSON field is for 3.1.1 publishers only; MQTT 5 carries ids in user properties.
        assert [r["id"] for r in stored(d, "json/in5")] == [None]
    finally:
        d.kill()


# -- what a record keeps -------------------------------------------------------------------


def test_retain_flag_and_properties_survive_into_the_record(daemon):
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 3600
    props.ContentType = "application/json"
    props.ResponseTopic = "reply/to/me"
    props.CorrelationData = b"\x00\x01corr"
    props.PayloadFormatIndicator = 1
    props.UserProperty = [("id", "p-1"), ("trace", "abc"), ("trace", "def")]
    c, _ = paho(daemon, 5, client_id="propper")
    info = c.publish("props/paho", b'{"t": 21.5}', qos=1, retain=True, properties=props)
    info.wait_for_publish(5)
    assert info.is_published()
    info = c.publish("props/plain", b"no props", qos=1, retain=False)
    info.wait_for_publish(5)
    paho_stop(c)

    raw = connected(daemon, 5, "raw-propper")
    raw.send(pub("props/raw", b"r", qos=2, packet_id=3, retain=True, topic_alias=4,
                 message_expiry_interval=60, content_type="text/plain",
                 user_property=[("k", "v")]))
    assert raw.read()[0].reason_code == 0
    v311 = connected(daemon, 4, "retain311")
    v311.send(pub("props/v311", b"kept", qos=1, packet_id=1, retain=True))
    assert v311.read()[0].reason_code == 0

    (rec,) = stored(daemon, "props/paho")
    assert (rec["retain"], rec["qos"], rec["id"], rec["payload"]) == (True, 1, "p-1", '{"t": 21.5}')
    assert stored(daemon, "props/plain")[0]["retain"] is False
    assert [(r["retain"], r["qos"]) for r in stored(daemon, "props/raw")] == [(True, 2)]
    assert [(r["retain"], r["qos"]) for r in stored(daemon, "props/v311")] == [(True, 1)]
    daemon.stop()
    recorded = stored_properties(daemon)
    assert recorded["props/paho"] == [{
        "payload_format_indicator": 1,
        "message_expiry_interval": 3600,
        "content_type": "application/json",
        "response_topic": "reply/to/me",
        "correlation_data": b"\x00\x01corr",
        "user_property": [("id", "p-1"), ("trace", "abc"), ("trace", "def")],
    }]
    assert recorded["props/plain"] == [None]
    # The topic alias is the connection's, not the message's: dropped; the rest is kept.
    assert recorded["props/raw"] == [{"message_expiry_interval": 60, "content_type": "text/plain",
                                      "user_property": [("k", "v")]}]
    assert recorded["props/v311"] == [None]


# -- Mosquitto's command-line clients ------------------------------------------------------


def mosquitto(tool, daemon, *args, timeout=20):
    return subprocess.run([tool, "-h", daemon.host, "-p", str(daemon.port), *args],
                          capture_output=True, text=True, timeout=timeout)


@needs_mosquitto
@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_pub(daemon, version, qos):
    topic = f"mosq/{version}/{qos}"
    extra = ["-D", "publish", "user-property", "id", f"X-{qos}"] if version == "mqttv5" else []
    for _ in range(2):
        res = mosquitto(MOSQUITTO_PUB, daemon, "-V", version, "-q", str(qos), "-t", topic,
                        "-m", f"from mosquitto q{qos}", "-i", f"mp-{version}-{qos}", "-r", *extra)
        assert res.returncode == 0, res.stderr
    fence(daemon)
    records = stored(daemon, topic)
    if version == "mqttv5":
        # The same id twice (two processes, two connections): stored once.
        assert [r["id"] for r in records] == [f"X-{qos}"]
    else:
        assert [r["id"] for r in records] == [None, None]
    assert {(r["payload"], r["qos"], r["retain"], r["client"]) for r in records} == \
        {(f"from mosquitto q{qos}", qos, True, f"mp-{version}-{qos}")}


@needs_mosquitto
def test_mosquitto_pub_lines_in_order(daemon):
    lines = "".join(f"line {i}\n" for i in range(200))
    res = subprocess.run([MOSQUITTO_PUB, "-h", daemon.host, "-p", str(daemon.port), "-V", "mqttv5",
                          "-q", "1", "-t", "mosq/lines", "-l", "-i", "mp-lines"],
                         input=lines, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    records = sorted(stored(daemon, "mosq/lines"), key=lambda r: r["offset"])
    assert [r["payload"] for r in records] == [f"line {i}" for i in range(200)]


@needs_mosquitto
@pytest.mark.parametrize("version,code", [("mqttv5", 135), ("mqttv311", 128)])
def test_mosquitto_sub_is_told_subscriptions_are_refused(tmp_path, version, code):
    d = start(tmp_path, "  subscribe_deny: ['denied/#']\n")
    try:
        res = mosquitto(MOSQUITTO_SUB, d, "-V", version, "-t", "denied/#", "-C", "1", "-W", "10",
                        "-d")
    finally:
        d.kill()
    # SUBACK 0x87 Not authorized (v5) / 0x80 (3.1.1): mosquitto_sub prints the code, says
    # why on stderr and quits at once (2.0.11 with exit status 0; 27 would be the -W timeout).
    assert f"Subscribed (mid: 1): {code}" in res.stdout
    assert "All subscription requests were denied." in res.stderr
    assert res.returncode != 27


@needs_mosquitto
def test_mosquitto_clients_understand_connack_refusals(tmp_path):
    d = start(tmp_path, "  keepalive_max: 5\n  max_qos: 1\n")
    try:
        res = mosquitto(MOSQUITTO_PUB, d, "-V", "mqttv5", "-t", "refused", "-m", "x",
                        "-D", "connect", "authentication-method", "SCRAM-SHA-1")
        assert res.returncode != 0
        assert "bad authentication method" in res.stderr.lower()
        res = mosquitto(MOSQUITTO_PUB, d, "-V", "mqttv311", "-k", "60", "-t", "refused", "-m", "x")
        assert res.returncode != 0
        assert "identifier rejected" in res.stderr.lower()
        # MQTT 5: the client learns Maximum QoS 1 from the CONNACK and refuses QoS 2
        # itself, before anything is sent (mosquitto_pub 2.0.11 then exits 0 all the same).
        res = mosquitto(MOSQUITTO_PUB, d, "-V", "mqttv5", "-k", "60", "-q", "2", "-t", "refused",
                        "-m", "x")
        assert "Message QoS not supported on broker" in res.stderr
        assert stored(d, "refused") == []
    finally:
        d.kill()


# -- many connections at once ------------------------------------------------------------


def test_many_connections_all_acked_and_stored(tmp_path):
    d = start(tmp_path)
    conns, per_conn = 200, 50
    socks = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(conns):
            s = socket.create_connection((d.host, d.port), timeout=10)
            s.sendall(_frame.encode(_frame.Connect(client_id=f"many-{i}", protocol_level=5 - (i % 2),
                                                   keepalive=60), 5 - (i % 2)))
            socks.append(s)
        parsers = {}
        bufs = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            version = 5 - (i % 2)
            parsers[s] = _frame.Parser(version=version)
            bufs[s] = bytearray()
            sel.register(s, selectors.EVENT_READ, i)
        got = {i: [] for i in range(conns)}

        def pump(deadline, until):
            while not until() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.5):
                    s, i = key.fileobj, key.data
                    chunk = s.recv(1 << 16)
                    assert chunk, f"connection {i} closed by the server"
                    buf = bufs[s]
                    buf += chunk
                    packets, consumed, error = parsers[s].parse(buf, 0, len(buf))
                    assert error is None
                    del buf[:consumed]
                    got[i].extend(packets)

        pump(time.monotonic() + 20, lambda: all(got[i] for i in range(conns)))
        assert all(got[i][0].type == _frame.CONNACK and got[i][0].reason_code == 0
                   for i in range(conns))
        for i, s in enumerate(socks):
            version = 5 - (i % 2)
            burst = b"".join(
                _frame.encode(_frame.Publish(f"many/{i}", f"{i}:{n}".encode(), qos=1,
                                             packet_id=n,
                                             properties={"user_property": [("id", f"{i}-{n}")]}
                                             if version == 5 else None), version)
                for n in range(1, per_conn + 1))
            s.setblocking(True)
            s.sendall(burst)
            s.setblocking(False)
        pump(time.monotonic() + 40, lambda: all(len(got[i]) == per_conn + 1 for i in range(conns)))
        for i in range(conns):
            acks = got[i][1:]
            # Every publish acked, successfully, in the order it was sent.
            assert [(a.type, a.packet_id, a.reason_code) for a in acks] == \
                [(_frame.PUBACK, n, 0) for n in range(1, per_conn + 1)], i
    finally:
        for s in socks:
            s.close()
        sel.close()
    try:
        records = d.dump()
    finally:
        d.kill()
    assert len(records) == conns * per_conn
    for i in range(conns):
        mine = sorted((r for r in records if r["client"] == f"many-{i}"), key=lambda r: r["offset"])
        assert [r["payload"] for r in mine] == [f"{i}:{n}" for n in range(1, per_conn + 1)]
        assert len({r["partition"] for r in mine}) == 1
    # The MQTT 5 half (even i) sent an id with each message; the 3.1.1 half could not.
    assert {r["id"] for r in records if int(r["client"].split("-")[1]) % 2 == 0} == \
        {f"{i}-{n}" for i in range(0, conns, 2) for n in range(1, per_conn + 1)}
    assert {r["id"] for r in records if int(r["client"].split("-")[1]) % 2 == 1} == {None}
