"""End to end: the real daemon on a loopback port, real MQTT clients (paho-mqtt)."""

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pushcore import _frame
from support import Daemon


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  connect_timeout: 1s\n").start()
    yield d
    d.kill()


def paho_client(daemon, version, client_id=""):
    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    kw = {} if version == 5 else {"clean_session": True}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw)
    c.connect(daemon.host, daemon.port, keepalive=30)
    c.loop_start()
    return c


def user_props(**pairs):
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(pairs.items())
    return props


def wait_connected(client, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not client.is_connected():
        assert time.monotonic() < deadline, "paho did not connect"
        time.sleep(0.01)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_publish_is_stored(daemon, version, qos):
    c = paho_client(daemon, version, client_id=f"dev-{version}-{qos}")
    wait_connected(c)
    infos = [c.publish(f"sensors/{i}", f"payload {i}".encode(), qos=qos) for i in range(20)]
    for info in infos:
        info.wait_for_publish(5)
        assert info.is_published()
    if qos == 0:
        # QoS 0 has no ack to wait for; a QoS 1 publish after them is acked only once
        # they (earlier in the same connection) are committed too.
        c.publish("sensors/fence", b"fence", qos=1).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    records = [r for r in daemon.dump() if r["topic"].startswith("sensors/") and r["topic"] != "sensors/fence"]
    assert sorted(r["payload"] for r in records) == sorted(f"payload {i}" for i in range(20))
    assert {r["qos"] for r in records} == {qos}
    assert {r["client"] for r in records} == {f"dev-{version}-{qos}"}
    # One publisher, no key: one partition, offsets in publish order.
    assert len({r["partition"] for r in records}) == 1
    assert [r["payload"] for r in sorted(records, key=lambda r: r["offset"])] == \
        [f"payload {i}" for i in range(20)]


def test_v5_id_and_key_properties(daemon):
    c = paho_client(daemon, 5, client_id="keyed")
    wait_connected(c)
    for i in range(30):
        c.publish("orders", f"o{i}".encode(), qos=1,
                  properties=user_props(id=f"order-{i}", key=f"customer-{i % 3}")).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()
    records = daemon.dump()
    assert sorted(r["id"] for r in records) == sorted(f"order-{i}" for i in range(30))
    by_key = {}
    for r in records:
        by_key.setdefault(r["key"], set()).add(r["partition"])
    # Each key lives in exactly one partition, so its order is kept.
    assert all(len(parts) == 1 for parts in by_key.values())
    for key in by_key:
        mine = sorted((r for r in records if r["key"] == key), key=lambda r: r["offset"])
        assert [int(r["payload"][1:]) for r in mine] == sorted(int(r["payload"][1:]) for r in mine)


def test_duplicates_across_connections_stored_once(daemon):
    acked = 0
    for conn in range(5):
        version = 5
        c = paho_client(daemon, version, client_id=f"dup-{conn}")
        wait_connected(c)
        for _ in range(10):
            info = c.publish("dup/topic", b"same", qos=1 if conn % 2 else 2,
                             properties=user_props(id="the-one-id"))
            info.wait_for_publish(5)
            assert info.is_published()
            acked += 1
        c.disconnect()
        c.loop_stop()
    assert acked == 50
    records = [r for r in daemon.dump() if r["id"] == "the-one-id"]
    assert len(records) == 1


def test_connack_v5_properties(daemon):
    got = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        got["rc"] = reason_code
        got["props"] = properties
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
    c.on_connect = on_connect
    c.connect(daemon.host, daemon.port)
    c.loop_start()
    assert done.wait(5)
    c.disconnect()
    c.loop_stop()
    props = got["props"]
    assert got["rc"] == 0
    assert props.ReceiveMaximum == 1024
    assert props.MaximumPacketSize == 1 << 20
    assert props.TopicAliasMaximum == 64
    assert props.AssignedClientIdentifier.startswith("pushcore-")


def test_session_takeover_v5(daemon):
    reasons = []
    first = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="same", protocol=mqtt.MQTTv5)
    first.on_disconnect = lambda c, u, flags, rc, props: reasons.append(rc)
    first.connect(daemon.host, daemon.port)
    first.loop_start()
    wait_connected(first)
    second = paho_client(daemon, 5, client_id="same")
    wait_connected(second)
    deadline = time.monotonic() + 5
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.02)
    first.loop_stop()
    assert reasons and reasons[0].value == 0x8E
    info = second.publish("after/takeover", b"x", qos=1)
    info.wait_for_publish(5)
    assert info.is_published()
    second.disconnect()
    second.loop_stop()


def test_subscribe_granted_and_delivered_v311(daemon):
    granted = []
    got = []
    done = threading.Event()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        granted.extend(reason_codes)
        done.set()

    c = paho_client(daemon, 4, client_id="sub311")
    c.on_subscribe = on_subscribe
    c.on_message = lambda client, userdata, m: got.append((m.topic, m.payload, m.qos))
    wait_connected(c)
    c.subscribe("a/#", qos=1)
    assert done.wait(5)
    assert [rc.value for rc in granted] == [1]
    c.publish("a/b", b"hello", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got == [("a/b", b"hello", 1)]
    c.disconnect()
    c.loop_stop()


# -- raw sockets: exact bytes on the wire --------------------------------------------


def raw(daemon):
    s = socket.create_connection((daemon.host, daemon.port), timeout=5)
    return s


def read_packets(sock, version, want=1, timeout=5.0):
    sock.settimeout(timeout)
    parser = _frame.Parser(version=version)
    buf = bytearray()
    got = []
    while len(got) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        packets, consumed, error = parser.parse(buf, 0, len(buf))
        assert error is None
        got.extend(packets)
        del buf[:consumed]
    return got


def closed_by_server(sock, timeout=5.0):
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def connect_raw(daemon, version=5, client_id="raw", keepalive=30):
    s = raw(daemon)
    s.sendall(_frame.encode(_frame.Connect(client_id=client_id, protocol_level=version,
                                           keepalive=keepalive), version))
    (connack,) = read_packets(s, version)
    assert connack.type == _frame.CONNACK and connack.reason_code == 0
    return s


def healthy(daemon):
    c = paho_client(daemon, 4, client_id=f"healthy-{time.monotonic_ns()}")
    wait_connected(c)
    info = c.publish("health", b"ok", qos=1)
    info.wait_for_publish(5)
    ok = info.is_published()
    c.disconnect()
    c.loop_stop()
    return ok


def test_garbage_closes_only_that_connection(daemon):
    bystander = connect_raw(daemon, 5, "bystander")
    s = raw(daemon)
    s.sendall(b"\x00\xff\xff\xff\xff\xff garbage")
    assert closed_by_server(s)
    bystander.sendall(_frame.encode(_frame.Publish("still/here", b"1", qos=1, packet_id=7), 5))
    (ack,) = read_packets(bystander, 5)
    assert (ack.type, ack.packet_id, ack.reason_code) == (_frame.PUBACK, 7, 0)
    assert healthy(daemon)


def test_unsupported_protocol_level_gets_connack_0x01(daemon):
    s = raw(daemon)
    # MQTT 3.1 ("MQIsdp", level 3): 3.1.1 §3.1.2.2 answer is CONNACK return code 0x01.
    body = b"\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x01x"
    s.sendall(b"\x10" + bytes([len(body)]) + body)
    data = s.recv(16)
    assert data == b"\x20\x02\x00\x01"
    assert closed_by_server(s)


def test_oversize_publish_v5_disconnect_0x95(daemon):
    s = connect_raw(daemon, 5, "big")
    big = _frame.encode(_frame.Publish("big", b"x" * (2 << 20), qos=1, packet_id=1), 5)
    try:
        s.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    (disc,) = read_packets(s, 5)
    assert disc.type == _frame.DISCONNECT and disc.reason_code == 0x95
    assert healthy(daemon)


def test_wildcard_topic_v5_disconnect_0x90(daemon):
    s = connect_raw(daemon, 5, "wild")
    # A PUBLISH with '+' in the topic, built by hand (the encoder refuses nothing here).
    topic = b"a/+/b"
    body = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + b"\x00" + b"p"
    s.sendall(b"\x32" + bytes([len(body)]) + body)
    (disc,) = read_packets(s, 5)
    assert disc.type == _frame.DISCONNECT and disc.reason_code == 0x90
    assert closed_by_server(s)


def test_truncated_packet_then_close_stores_nothing(daemon):
    s = connect_raw(daemon, 4, "trunc")
    full = _frame.encode(_frame.Publish("cut", b"y" * 100, qos=1, packet_id=3), 4)
    s.sendall(full[:50])
    s.close()
    assert healthy(daemon)
    assert not [r for r in daemon.dump() if r["topic"] == "cut"]


def test_connect_never_comes(daemon):
    s = raw(daemon)
    t0 = time.monotonic()
    assert closed_by_server(s, timeout=5)
    assert 0.9 <= time.monotonic() - t0 < 4
    assert healthy(daemon)


def test_keepalive_lapse_v5_disconnect_0x8d(daemon):
    s = connect_raw(daemon, 5, "sleepy", keepalive=1)
    t0 = time.monotonic()
    (disc,) = read_packets(s, 5, timeout=5)
    elapsed = time.monotonic() - t0
    assert disc.type == _frame.DISCONNECT and disc.reason_code == 0x8D
    assert 1.4 <= elapsed < 3.5


def test_pingreq_keeps_connection(daemon):
    s = connect_raw(daemon, 4, "pinger", keepalive=1)
    for _ in range(3):
        time.sleep(0.6)
        s.sendall(b"\xc0\x00")
        (resp,) = read_packets(s, 4)
        assert resp.type == _frame.PINGRESP


def test_qos2_resend_before_pubrel_stored_once(daemon):
    s = connect_raw(daemon, 5, "q2")
    pub = _frame.Publish("q2/topic", b"exactly-once", qos=2, packet_id=9)
    s.sendall(_frame.encode(pub, 5))
    (rec1,) = read_packets(s, 5)
    assert (rec1.type, rec1.packet_id) == (_frame.PUBREC, 9)
    pub.dup = True
    s.sendall(_frame.encode(pub, 5))
    (rec2,) = read_packets(s, 5)
    assert (rec2.type, rec2.packet_id, rec2.reason_code) == (_frame.PUBREC, 9, 0)
    s.sendall(_frame.encode_ack(_frame.PUBREL, 9, 0, 5))
    (comp,) = read_packets(s, 5)
    assert (comp.type, comp.packet_id) == (_frame.PUBCOMP, 9)
    assert len([r for r in daemon.dump() if r["topic"] == "q2/topic"]) == 1


def test_receive_maximum_exceeded_v5_0x93(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  receive_maximum: 2\n").start()
    try:
        s = connect_raw(d, 5, "greedy")
        burst = b"".join(_frame.encode(_frame.Publish("g", b"x", qos=1, packet_id=i), 5)
                         for i in range(1, 40))
        s.sendall(burst)
        got = read_packets(s, 5, want=50, timeout=5)
        assert got[-1].type == _frame.DISCONNECT and got[-1].reason_code == 0x93
    finally:
        d.kill()


def test_store_full_v5_gets_0x97_and_daemon_keeps_serving(tmp_path):
    d = Daemon(tmp_path, config="storage:\n  map_size: 1MiB\n  retention:\n    max_age: 0\n",
               durability="os").start()
    try:
        s = connect_raw(d, 5, "filler")
        codes = []
        payload = b"z" * 8000
        for i in range(1, 400):
            s.sendall(_frame.encode(_frame.Publish("fill", payload, qos=1, packet_id=i), 5))
            (ack,) = read_packets(s, 5)
            codes.append(ack.reason_code)
            if ack.reason_code == 0x97:
                break
        assert codes[0] == 0 and codes[-1] == 0x97
        assert "store full" in d.log()
        assert d.alive()
        s.sendall(b"\xc0\x00")
        (resp,) = read_packets(s, 5)
        assert resp.type == _frame.PINGRESP
    finally:
        d.kill()


def test_sigterm_drains_and_exits_zero(daemon):
    c = paho_client(daemon, 5, client_id="drainer")
    wait_connected(c)
    c.publish("drain", b"last", qos=1).wait_for_publish(5)
    assert daemon.stop() == 0
    c.loop_stop()
    assert [r["payload"] for r in daemon.dump() if r["topic"] == "drain"] == ["last"]


def test_store_full_v311_is_held_unacked_then_stored_when_space_returns(tmp_path):
    config = ("storage:\n  map_size: 1MiB\n  retention:\n    max_age: 4s\n    check_interval: 1s\n")
    d = Daemon(tmp_path, config=config, durability="os").start()
    payload = b"z" * 8000
    try:
        filler = connect_raw(d, 5, "filler5")

        def fill(first_id):
            for i in range(first_id, first_id + 400):
                filler.sendall(_frame.encode(_frame.Publish("fill", payload, qos=1, packet_id=i), 5))
                (ack,) = read_packets(filler, 5)
                if ack.reason_code == 0x97:
                    return i
            raise AssertionError("the store never filled")

        last = fill(1)
        # Still full after the daemon's own retry a second later.
        time.sleep(1.2)
        fill(last + 1)
        # A 3.1.1 publisher cannot be told "quota exceeded": it gets no ack (and is
        # not read) until retention has made room, then its message is stored and acked.
        # Its 1 s keepalive is suspended meanwhile: the server, not the client, is silent.
        v3 = connect_raw(d, 4, "patient311", keepalive=1)
        t0 = time.monotonic()
        v3.sendall(_frame.encode(_frame.Publish("held", payload, qos=1, packet_id=5), 4))
        (ack,) = read_packets(v3, 4, timeout=20)
        waited = time.monotonic() - t0
        assert (ack.type, ack.packet_id) == (_frame.PUBACK, 5)
        assert waited > 1.0, "acked while the store was full"
    finally:
        d.stop()
    assert len([r for r in d.dump() if r["topic"] == "held"]) == 1
    assert '"store_full_holds": ' in d.log()
    assert "store has room again" in d.log()


def test_acks_follow_publish_order_across_a_qos2_resend(daemon):
    # MQTT 5.0 §4.6: acks in the order the PUBLISH packets arrived, including the
    # PUBREC owed for a QoS 2 PUBLISH re-sent before PUBREL (stored only once).
    s = connect_raw(daemon, 5, "ordered")
    first = _frame.Publish("order/q2", b"once", qos=2, packet_id=9)
    s.sendall(_frame.encode(first, 5))
    (rec,) = read_packets(s, 5)
    assert (rec.type, rec.packet_id) == (_frame.PUBREC, 9)
    first.dup = True
    s.sendall(_frame.encode(first, 5)
              + _frame.encode(_frame.Publish("order/q1", b"a", qos=1, packet_id=10), 5)
              + _frame.encode(_frame.Publish("order/q2b", b"b", qos=2, packet_id=11), 5))
    acks = read_packets(s, 5, want=3)
    assert [(a.type, a.packet_id) for a in acks] == \
        [(_frame.PUBREC, 9), (_frame.PUBACK, 10), (_frame.PUBREC, 11)]
    assert len([r for r in daemon.dump() if r["topic"] == "order/q2"]) == 1


# -- will messages: stored in the log when a connection ends without DISCONNECT ------


def connect_with_will(daemon, version, client_id, keepalive=30, will_props=None, qos=1, retain=True):
    s = raw(daemon)
    will = _frame.Will(f"wills/{client_id}", f"{client_id} is gone".encode(), qos=qos,
                       retain=retain, properties=will_props)
    s.sendall(_frame.encode(_frame.Connect(client_id=client_id, protocol_level=version,
                                           keepalive=keepalive, will=will), version))
    (connack,) = read_packets(s, version)
    assert connack.type == _frame.CONNACK and connack.reason_code == 0
    return s


def wills(daemon):
    return {r["topic"]: r for r in daemon.dump() if r["topic"].startswith("wills/")}


def test_will_stored_on_abrupt_close_not_on_disconnect(daemon):
    gone = connect_with_will(daemon, 4, "dropped")
    polite = connect_with_will(daemon, 4, "polite")
    polite.sendall(b"\xe0\x00")
    assert closed_by_server(polite)
    gone.close()
    deadline = time.monotonic() + 5
    while "wills/dropped" not in wills(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    got = wills(daemon)
    assert set(got) == {"wills/dropped"}
    w = got["wills/dropped"]
    assert (w["payload"], w["qos"], w["retain"], w["client"]) == ("dropped is gone", 1, True, "dropped")


def test_will_v5_disconnect_0x04_keepalive_lapse_and_takeover(daemon):
    props = {"will_delay_interval": 30, "content_type": "text/plain",
             "user_property": [("id", "will-1"), ("key", "fleet-7")]}
    with_will = connect_with_will(daemon, 5, "leaver", will_props=props)
    with_will.sendall(_frame.encode(_frame.Disconnect(0x04), 5))
    assert closed_by_server(with_will)
    connect_with_will(daemon, 5, "sleeper", keepalive=1)
    connect_with_will(daemon, 5, "replaced")
    connect_raw(daemon, 5, "replaced")
    deadline = time.monotonic() + 6
    while len(wills(daemon)) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    got = wills(daemon)
    assert set(got) == {"wills/leaver", "wills/sleeper", "wills/replaced"}
    # The will's id and key user properties work as a publish's do.
    assert (got["wills/leaver"]["id"], got["wills/leaver"]["key"]) == ("will-1", "fleet-7")


def test_will_qos_above_max_qos_is_refused_0x9b(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  max_qos: 1\n", durability="os").start()
    try:
        s = raw(d)
        will = _frame.Will("wills/q2", b"x", qos=2)
        s.sendall(_frame.encode(_frame.Connect(client_id="q2will", protocol_level=5, will=will), 5))
        (connack,) = read_packets(s, 5)
        assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0x9B)
    finally:
        d.stop()


def test_will_kept_by_v5_disconnect_with_an_error_code(daemon):
    # MQTT 5.0 §3.14.4 [MQTT-3.14.4-3]: only reason 0x00 discards the Will.
    for client_id, code in (("rc00", 0x00), ("rc80", 0x80), ("rc83", 0x83)):
        s = connect_with_will(daemon, 5, client_id)
        s.sendall(_frame.encode(_frame.Disconnect(code), 5))
        assert closed_by_server(s)
    deadline = time.monotonic() + 5
    while len(wills(daemon)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(wills(daemon)) == {"wills/rc80", "wills/rc83"}


def test_connack_session_present_only_for_a_kept_session(daemon):
    def connect(clean_start, expiry):
        s = raw(daemon)
        s.sendall(_frame.encode(_frame.Connect(client_id="expiring", protocol_level=5,
                                               clean_start=clean_start,
                                               properties={"session_expiry_interval": expiry}), 5))
        (connack,) = read_packets(s, 5)
        s.sendall(_frame.encode(_frame.Disconnect(0), 5))
        assert closed_by_server(s)
        assert connack.reason_code == 0
        # The server keeps the interval asked for (sessions.max_expiry is 0, no cap).
        assert "session_expiry_interval" not in (connack.properties or {})
        return connack.session_present

    assert connect(True, 3600) is False
    # MQTT 5.0 §3.2.2.1.1: Clean Start 0 and a stored session: Session Present 1.
    assert connect(False, 0) is True
    # That connection ended its session (expiry 0): nothing to resume now.
    assert connect(False, 0) is False
