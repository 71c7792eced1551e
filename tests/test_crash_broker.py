"""Crash: SIGKILL the broker mid-stream; no acked message is lost for a persistent subscriber.

The broker counterpart of test_crash.py.  A persistent session's queue entry is
written in the same LMDB commit as the record it points to (pushcore/broker.py
docstring), so once a publisher has its PUBACK/PUBREC the message is owed to
every persistent subscriber, across a SIGKILL and a restart on the same data
directory.  The subscriber is offline during the crash (its queue only) or
online with deliveries in flight (MQTT 5.0 §4.4: unacknowledged PUBLISHes are
resent with DUP and their packet ids on reconnect; the README "What is stored
where" paragraph allows DUP 0 for a copy sent in the last milliseconds).

Each message carries its publisher and sequence number in the payload, and a
unique message id (user property "id"), so the test knows which ones were
acked, stored and delivered.
"""

import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pushcore import _frame
from pushcore.client import Client
from support import Daemon

TOTAL = 10_000
# The daemon is killed once this many publishes are acked, while the rest stream.
KILL_AFTER = 3_000
# MQTT 5.0 Session Expiry Interval of the subscribers (seconds).
EXPIRY = 3600
# The default per-session limit (1000) would refuse most of the stream.
CONFIG = "sessions:\n  max_queued_messages: 100000\n"
# Receive Maximum of the slow online subscriber (MQTT 5.0 §3.1.2.11.3): how many
# deliveries the broker may have in flight to it.
SLOW_WINDOW = 64


def payload_of(publisher, i):
    return f"{publisher}:{i}".encode()


def parse_payload(payload):
    publisher, i = payload.decode().split(":")
    return publisher, int(i)


class Publisher(threading.Thread):
    """Streams ``count`` messages with pushcore.client.Client, recording each ack.

    ``qos_of(i)`` is the QoS of message ``i``.  With ``resume`` False the
    publisher stops at the first connection loss (the kill); with True it
    reconnects to the restarted daemon and resends, deduplicated by message id.
    """

    def __init__(self, daemon, name, topic, count, qos_of=lambda i: 1, resume=False):
        super().__init__(daemon=True)
        self.port = daemon.port
        self.name = name
        self.topic = topic
        self.count = count
        self.qos_of = qos_of
        self.resume = resume
        self.acked = []
        self.cut = False
        self.error = None
        self.stats = {}

    def run(self):
        client = Client(port=self.port, client_id=self.name, version=5, max_inflight=256,
                        backoff_base=0.02, backoff_cap=0.5,
                        max_reconnects=200 if self.resume else 0)
        client.on_ack = lambda message: self.acked.append(int(message.msg_id.rsplit("-", 1)[1]))
        try:
            client.connect()
            for i in range(self.count):
                client.publish(self.topic, payload_of(self.name, i), qos=self.qos_of(i),
                               msg_id=f"{self.name}-{i}")
            if not client.flush(timeout=60):
                raise TimeoutError(f"{self.name}: not every message acked within 60 s")
        except ConnectionError:
            self.cut = True
        except BaseException as err:  # reported to the main thread
            self.error = err
        finally:
            self.stats = client.stats
            client.close()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def kill_mid_stream(daemon, publishers):
    """SIGKILL the daemon once KILL_AFTER publishes are acked; the acks seen by then."""
    wait_for(lambda: sum(len(p.acked) for p in publishers) >= KILL_AFTER
             or not any(p.is_alive() for p in publishers), 60, f"{KILL_AFTER} acks")
    daemon.kill()
    acked = {p.name: set(p.acked) for p in publishers}
    assert sum(len(a) for a in acked.values()) >= KILL_AFTER, \
        f"publishers ended before {KILL_AFTER} acks: {[p.error for p in publishers]}"
    return acked


# -- paho subscriber --------------------------------------------------------------------------


class PahoSubscriber:
    """A paho-mqtt v5 client with a persistent session (Clean Start 0, expiry EXPIRY)."""

    def __init__(self, daemon, client_id):
        self.messages = []
        self.connacks = []
        c = self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv5)
        c.on_connect = lambda _c, _u, flags, rc, _p: self.connacks.append(
            (flags.session_present, rc.value))
        c.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload, m.qos, m.dup))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = EXPIRY
        c.connect(daemon.host, daemon.port, keepalive=30, clean_start=False, properties=props)
        c.loop_start()
        wait_for(lambda: self.connacks, 5, "CONNACK")
        assert self.connacks[0][1] == 0, self.connacks

    @property
    def session_present(self):
        return self.connacks[0][0]

    def subscribe(self, topic_filter, qos):
        granted = []
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.extend(
            code.value for code in codes)
        self.client.subscribe(topic_filter, qos)
        wait_for(lambda: granted, 5, "SUBACK")
        assert granted == [qos]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# -- raw subscriber ---------------------------------------------------------------------------


class Raw:
    """One MQTT 5.0 connection driven packet by packet (exact DUP flags and packet ids)."""

    def __init__(self, daemon):
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=5)
        self.parser = _frame.Parser(version=5)
        self.buf = bytearray()
        # Packets parsed but not yet returned by receive().
        self.pending = []

    def send(self, *packets):
        self.sock.sendall(b"".join(_frame.encode(p, 5) for p in packets))

    def ack(self, packets):
        """Answer deliveries: PUBACK a QoS 1 PUBLISH, PUBREC a QoS 2 one, PUBCOMP a PUBREL."""
        out = []
        for p in packets:
            if p.type == _frame.PUBLISH and p.qos:
                out.append(_frame.encode_ack(_frame.PUBACK if p.qos == 1 else _frame.PUBREC,
                                             p.packet_id, 0, 5))
            elif p.type == _frame.PUBREL:
                out.append(_frame.encode_ack(_frame.PUBCOMP, p.packet_id, 0, 5))
        if out:
            self.sock.sendall(b"".join(out))

    def drain(self, done, timeout, missing):
        """Receive and acknowledge deliveries until ``done(arrivals)``, then up to the
        answer of a PINGREQ (whatever else the broker owes comes before it).

        Returns the arrivals in wire order: (topic, publisher, seq, qos, dup, packet id).
        ``missing(arrivals)`` says what is still owed when ``timeout`` passes.
        """
        arrivals = []
        deadline = time.monotonic() + timeout
        fenced = False
        while True:
            if not fenced and done(arrivals):
                self.send(_frame.Pingreq())
                fenced = True
            left = deadline - time.monotonic()
            assert left > 0, f"after {len(arrivals)} deliveries, still owed: {missing(arrivals)}"
            try:
                packets = self.receive(timeout=min(left, 1.0))
            except TimeoutError:
                continue
            assert packets, "the daemon closed the subscriber's connection"
            for p in packets:
                if p.type == _frame.PUBLISH:
                    arrivals.append((p.topic, *parse_payload(p.payload), p.qos, p.dup,
                                     p.packet_id))
                else:
                    assert p.type in (_frame.PUBREL, _frame.PINGRESP), p
            self.ack(packets)
            if fenced and any(p.type == _frame.PINGRESP for p in packets):
                return arrivals

    def receive(self, timeout=5.0):
        """The packets of the next read; [] when the server closed the connection."""
        if self.pending:
            packets, self.pending = self.pending, []
            return packets
        self.sock.settimeout(timeout)
        while True:
            packets, consumed, error = self.parser.parse(self.buf, 0, len(self.buf))
            assert error is None, error
            del self.buf[:consumed]
            if packets:
                return packets
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return []
            self.buf += chunk

    def connect(self, client_id, clean_start, **props):
        self.send(_frame.Connect(client_id=client_id, protocol_level=5, keepalive=60,
                                 clean_start=clean_start,
                                 properties={"session_expiry_interval": EXPIRY, **props}))
        connack, *self.pending = self.receive()
        assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0), connack
        return connack.session_present

    def subscribe(self, topic_filter, qos):
        self.send(_frame.Subscribe(1, [(topic_filter, qos)]))
        (suback,) = self.receive()
        assert (suback.type, suback.reason_codes) == (_frame.SUBACK, [qos]), suback

    def close(self):
        self.sock.close()


# -- 1 and 3: the subscriber is offline during the crash ---------------------------------------


@pytest.mark.parametrize("sub_qos,durability", [(1, "fsync"), (2, "os")])
def test_offline_persistent_subscriber_gets_every_acked_message(tmp_path, sub_qos, durability):
    daemon = Daemon(tmp_path, config=CONFIG, durability=durability).start()
    # With a QoS 2 subscription every other message is published at QoS 2, so both
    # flows reach the subscriber, each at min(published, granted) QoS (MQTT 5.0 §3.8.4).
    qos_of = (lambda i: 1) if sub_qos == 1 else (lambda i: 2 - i % 2)
    try:
        # The device: paho-mqtt, Clean Start 0 and a Session Expiry Interval.
        sub = PahoSubscriber(daemon, "crash-sub")
        assert sub.session_present is False
        sub.subscribe("crash/#", sub_qos)
        sub.close()

        publisher = Publisher(daemon, "P", "crash/data", TOTAL, qos_of)
        publisher.start()
        acked = kill_mid_stream(daemon, [publisher])["P"]
        publisher.join(30)
        assert not publisher.is_alive() and publisher.error is None, publisher.error
        # The kill cut the stream: the rest was never acked.
        assert publisher.cut and len(acked) < TOTAL, (publisher.cut, len(acked))
        stored = {parse_payload(r["payload"].encode())[1] for r in daemon.dump()
                  if r["topic"] == "crash/data"}
        assert acked <= stored

        daemon.start()
        # It comes back as a raw connection, to see the wire order and the DUP flags
        # (paho hands a QoS 2 message over only at PUBREL).
        raw = Raw(daemon)
        assert raw.connect("crash-sub", clean_start=False) is True
        arrivals = raw.drain(lambda got: stored <= {a[2] for a in got}, 30,
                             lambda got: sorted(stored - {a[2] for a in got})[:10])
        # The subscription itself survived the crash: a message published now arrives.
        late = Client(port=daemon.port, client_id="late", version=5)
        late.connect()
        assert late.publish("crash/late", payload_of("late", 0), qos=sub_qos, wait=True).acked
        late.close()
        assert [a[:4] for a in raw.drain(lambda got: got, 10, lambda got: "crash/late")] == \
            [("crash/late", "late", 0, sub_qos)]
        raw.close()
    finally:
        daemon.kill()

    assert {a[0] for a in arrivals} == {"crash/data"}
    seqs = [a[2] for a in arrivals]
    received = set(seqs)
    missing = sorted(acked - received)
    assert not missing, f"{len(missing)} acked messages lost, first {missing[:10]}"
    # No subscriber sees a message the log does not hold ...
    assert received <= stored
    # ... and every stored one was queued in its commit (broker.py docstring).
    assert received == stored, f"stored, never delivered: {sorted(stored - received)[:10]}"
    # MQTT 5.0 §4.6: one publisher, one topic: delivered in publish order, each once
    # (nothing was in flight to the offline subscriber, so nothing is a redelivery) ...
    assert seqs == sorted(received)
    # ... as first attempts [MQTT-3.3.1-2], at min(published, granted) QoS.
    assert {a[4] for a in arrivals} == {False}
    assert [a[3] for a in arrivals] == [min(qos_of(seq), sub_qos) for seq in seqs]
    print(f"\n[qos {sub_qos}, {durability}] acked before the kill {len(acked)}, "
          f"stored {len(stored)}, unacked but stored and delivered {len(received - acked)}")


# -- 2: the subscriber is online, acking slowly, during the crash -------------------------------


class SlowSubscriber(threading.Thread):
    """Records every delivery as it is read, then acks them one by one after a pause."""

    def __init__(self, raw):
        super().__init__(daemon=True)
        self.raw = raw
        # (publisher, seq, dup, packet id) in arrival order.
        self.arrivals = []
        self.acked = set()
        self.error = None

    def run(self):
        try:
            while True:
                packets = self.raw.receive(timeout=30)
                if not packets:
                    return
                for p in packets:
                    assert p.type == _frame.PUBLISH and p.qos == 1, p
                    self.arrivals.append((*parse_payload(p.payload), p.dup, p.packet_id))
                for p in packets:
                    time.sleep(0.002)
                    self.raw.ack([p])
                    self.acked.add(parse_payload(p.payload))
        except OSError:
            return
        except BaseException as err:  # reported to the main thread
            self.error = err


def test_online_slow_subscriber_gets_in_flight_messages_again(tmp_path):
    daemon = Daemon(tmp_path, config=CONFIG).start()
    names = ("A", "B")
    per_publisher = TOTAL // len(names)
    try:
        raw = Raw(daemon)
        assert raw.connect("slow-sub", clean_start=True, receive_maximum=SLOW_WINDOW) is False
        raw.subscribe("online/#", 1)
        slow = SlowSubscriber(raw)
        slow.start()

        # The publishers reconnect to the restarted daemon and resend what was not acked;
        # the message id makes a resend of a stored message a duplicate, not a new copy.
        publishers = [Publisher(daemon, name, f"online/{name}", per_publisher, resume=True)
                      for name in names]
        for p in publishers:
            p.start()
        kill_mid_stream(daemon, publishers)
        slow.join(10)
        assert not slow.is_alive() and slow.error is None, slow.error
        raw.close()
        before = slow.arrivals
        first_ids = {(pub, seq): pid for pub, seq, _dup, pid in before}
        in_flight = set(first_ids) - slow.acked
        # The premise: deliveries were unacknowledged when the daemon died.
        assert in_flight, "no delivery was in flight at the kill"

        daemon.start()
        raw = Raw(daemon)
        assert raw.connect("slow-sub", clean_start=False) is True
        owed = {(name, i) for name in names for i in range(per_publisher)}

        def not_arrived(got):
            return owed - set(first_ids) - {(a[1], a[2]) for a in got}

        def all_arrived(got):
            return not not_arrived(got) and not any(p.is_alive() for p in publishers)

        def missing(got):
            return (f"{sorted(not_arrived(got))[:10]}; publishers "
                    f"{[(p.name, p.is_alive(), len(p.acked), p.error) for p in publishers]}")

        after = [(pub, seq, dup, pid) for _topic, pub, seq, _qos, dup, pid
                 in raw.drain(all_arrived, 30, missing)]
        raw.close()
        for p in publishers:
            p.join(10)
            assert not p.is_alive() and p.error is None, (p.name, p.error)
            assert p.stats["reconnects"] >= 1, (p.name, p.stats)
            assert set(p.acked) == set(range(per_publisher)), p.name
    finally:
        daemon.kill()

    # Every message was acked to its publisher (after resends) and arrived at least once.
    again = {(pub, seq) for pub, seq, _dup, _pid in after}
    assert owed <= set(first_ids) | again
    # The copies in flight at the kill come again after the restart.
    assert in_flight <= again, f"in flight, not resent: {sorted(in_flight - again)[:10]}"
    # MQTT 5.0 §4.4: the unacknowledged deliveries are resent first, with DUP and
    # their original packet ids; then the queue drains with DUP 0.
    dups = [a for a in after if a[2]]
    assert dups, "no delivery was resent with DUP 1 after the restart"
    assert after[:len(dups)] == dups, "a DUP 0 delivery came before a resend"
    for pub, seq, _dup, pid in dups:
        if (pub, seq) in first_ids:
            assert pid == first_ids[(pub, seq)], (pub, seq, pid)
    # MQTT 5.0 §4.6: each publisher's messages in its publish order -- before the
    # kill, after the restart, and counting first arrivals over both.
    for name in names:
        pre = [seq for pub, seq, _dup, _pid in before if pub == name]
        post = [seq for pub, seq, _dup, _pid in after if pub == name]
        assert pre == sorted(set(pre)), f"{name}: out of order before the kill"
        assert post == sorted(set(post)), f"{name}: out of order after the restart"
        first = list(dict.fromkeys(pre + post))
        assert first == list(range(per_publisher)), f"{name}: first arrivals out of order"
    dup_in_flight = {(pub, seq) for pub, seq, _dup, _pid in dups} & in_flight
    print(f"\n[online] delivered before the kill {len(before)}, in flight {len(in_flight)} "
          f"(resent with DUP 1 {len(dup_in_flight)}, with DUP 0 {len(in_flight - dup_in_flight)}), "
          f"resent with DUP 1 in all {len(dups)}, deliveries after the restart {len(after)}")
