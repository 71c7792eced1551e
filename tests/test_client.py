"""The blocking publisher client (pushcore.client) against real brokers.

Two servers:
- ``broker``: a real MQTT broker on a free loopback port, killed and
  restarted on the same port for the reconnect tests: the pushcore daemon.
- ``fake``: a scripted MQTT server (a thread, framing by pushcore._frame) for
  the paths a real broker cannot be made to take on demand: withheld acks,
  refusals, quota exceeded, DISCONNECT, resumed sessions, dead keepalive.
"""

import logging
import random
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore import _frame, client as client_module, errors
from pushcore.client import Client, backoff_delay
from support import Daemon

VERSIONS = [4, 5]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker(tmp_path):
    """The real pushcore daemon: yields (host, port, restart).

    ``restart(down_for=0.0)`` SIGKILLs the daemon at once and starts it again
    on the same port and data directory after ``down_for`` seconds (in the
    background when ``down_for`` > 0, so a client blocked in a reconnect loop
    can see it come back).
    """
    daemon = Daemon(tmp_path).start()
    timers = []

    def restart(down_for=0.0):
        daemon.kill()
        if down_for > 0:
            timer = threading.Timer(down_for, daemon.start)
            timers.append(timer)
            timer.start()
        else:
            daemon.start()

    yield daemon.host, daemon.port, restart
    for timer in timers:
        timer.join()
    daemon.kill()


class FakeConnection:
    def __init__(self, sock, no):
        self.sock = sock
        self.no = no            # 1 for the first connection, 2 after a reconnect...
        self.version = 0
        self.pending = []       # ack packets withheld until hold_acks is reached

    def send(self, packet):
        self.sock.sendall(_frame.encode(packet, self.version))


class FakeBroker:
    """Scripted MQTT server.  Hooks (replace them in a test):

    - ``connack(conn)`` -> Connack packet to answer CONNECT with
    - ``ack_code(conn, publish)`` -> PUBACK/PUBREC reason code, None to withhold
    - ``answer_pubrel(conn)``, ``answer_pings(conn)`` -> bool
    - ``after(conn, packet)`` -> list of packets to send and/or "close",
      called after each packet from the client is answered
    ``hold_acks``: acks are sent in batches of this many (flow-control tests);
    ``refuse``: accept connections and close them at once.
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()
        self.received = []          # (connection number, packet) in arrival order
        self.connections = []
        self.refuse = False
        self.hold_acks = 1
        self.max_unacked = 0        # most PUBLISHes ever received and not yet acked
        self.session_present = False
        self.connack_props = None
        self.connack = lambda conn: _frame.Connack(session_present=self.session_present,
                                                   properties=self.connack_props)
        self.ack_code = lambda conn, publish: 0
        self.answer_pubrel = lambda conn: True
        self.answer_pings = lambda conn: True
        self.after = lambda conn, packet: ()
        self.errors = []
        self._threads = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def packets(self, ptype, conn_no=None):
        return [p for no, p in self.received
                if p.type == ptype and (conn_no is None or no == conn_no)]

    def close(self):
        self.listener.close()
        for conn in self.connections:
            self._shut(conn.sock)
        for thread in self._threads:
            thread.join(5)
        assert not self.errors, self.errors

    @staticmethod
    def _shut(sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self):
        while True:
            try:
                sock, _addr = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                self._shut(sock)
                continue
            conn = FakeConnection(sock, len(self.connections) + 1)
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        parser = _frame.Parser()
        buf = bytearray()
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    return
                buf += data
                packets, consumed, error = parser.parse(buf, 0, len(buf))
                del buf[:consumed]
                conn.version = parser.version
                for packet in packets:
                    self.received.append((conn.no, packet))
                    if self._answer(conn, packet) == "close":
                        return
                if error is not None:
                    self.errors.append(error)
                    return
        except OSError:
            return
        except Exception as exc:   # surfaced by close(), so a broken script fails the test
            self.errors.append(exc)
        finally:
            self._shut(conn.sock)

    def _answer(self, conn, packet):
        ptype = packet.type
        if ptype == _frame.CONNECT:
            conn.send(self.connack(conn))
        elif ptype == _frame.PUBLISH and packet.qos:
            code = self.ack_code(conn, packet)
            if code is not None:
                kind = _frame.PUBACK if packet.qos == 1 else _frame.PUBREC
                conn.pending.append(_frame.Ack(kind, packet.packet_id, code))
            # With every PUBLISH acked, the pending acks are the unacked PUBLISHes.
            self.max_unacked = max(self.max_unacked, len(conn.pending))
            if len(conn.pending) >= self.hold_acks:
                for ack in conn.pending:
                    conn.send(ack)
                conn.pending = []
        elif ptype == _frame.PUBREL and self.answer_pubrel(conn):
            conn.send(_frame.Ack(_frame.PUBCOMP, packet.packet_id))
        elif ptype == _frame.PINGREQ and self.answer_pings(conn):
            conn.send(_frame.Pingresp())
        elif ptype == _frame.DISCONNECT:
            return "close"
        for item in self.after(conn, packet):
            if item == "close":
                return "close"
            conn.send(item)
        return None


@pytest.fixture
def fake():
    server = FakeBroker()
    yield server
    server.close()


def make_client(host, port, **kw):
    """A client with test-sized timings: quick backoff, short timeouts."""
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_cap", 0.2)
    kw.setdefault("connect_timeout", 2.0)
    return Client(host, port, **kw)


def eventually(predicate, timeout=5.0):
    """Poll ``predicate`` until true: the fake server runs in its own thread."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def user_properties(publish):
    return dict((publish.properties or {}).get("user_property", []))


# -- backoff -----------------------------------------------------------------

def test_backoff_delay_is_full_jitter_over_capped_exponential():
    rng, twin = random.Random(1234), random.Random(1234)
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    for attempt, ceiling in enumerate(ceilings):
        assert backoff_delay(attempt, 0.05, 5.0, rng) == twin.uniform(0.0, ceiling)


def test_backoff_delay_huge_attempt_is_capped():
    assert 0.0 <= backoff_delay(10 ** 6, 0.05, 5.0, random.Random(1)) <= 5.0


@settings(max_examples=300, deadline=None)
@given(attempt=st.integers(0, 200), base=st.floats(1e-4, 10.0),
       cap=st.floats(0.0, 600.0), seed=st.integers(0, 2 ** 32))
def test_backoff_delay_bounds(attempt, base, cap, seed):
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** attempt)


# -- publishing against a real broker -----------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("qos", [1, 2])
def test_publish_acked(broker, version, qos):
    host, port, _restart = broker
    seen = []
    with make_client(host, port, version=version) as client:
        client.on_ack = seen.append
        first = client.publish("t/acked", b"one", qos=qos, msg_id="m-0", wait=True)
        # MQTT 5.0 §3.4.2.1: 0x10 No matching subscribers is a success too.
        assert first.acked and not first.failed and first.reason_code in (0x00, 0x10)
        assert 1 <= first.packet_id <= 65535
        rest = [client.publish("t/acked", b"n", qos=qos, msg_id=f"m-{i}") for i in range(1, 50)]
        assert client.flush(timeout=10)
        assert all(m.acked and m.wait(0) for m in rest)
        assert client.acked_ids() == [f"m-{i}" for i in range(50)]
        assert seen == [first, *rest]
        assert client.outstanding == 0 and client.in_flight == 0
        assert client.stats["acked"] == 50 and client.stats["failed"] == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_flush_waits_for_every_ack(broker, version):
    host, port, _restart = broker
    client = make_client(host, port, version=version, max_inflight=16)
    client.connect()
    assert client.flush(timeout=0) is True          # nothing outstanding
    messages = [client.publish("t/flush", b"x" * 100, qos=1 + i % 2, msg_id=str(i))
                for i in range(300)]
    assert client.flush(timeout=10)
    assert all(m.acked for m in messages)
    assert sorted(client.acked_ids(), key=int) == [str(i) for i in range(300)]
    assert client.outstanding == 0
    client.close()
    assert not client.connected


@pytest.mark.parametrize("version", VERSIONS)
def test_reconnect_after_broker_restart_resends_unacked(broker, version):
    host, port, restart = broker
    # max_reconnects bounds the test if the broker never comes back.
    client = make_client(host, port, version=version, max_inflight=32, max_reconnects=100)
    client.connect()
    ids = [f"r-{i}" for i in range(400)]
    for msg_id in ids[:200]:
        client.publish("t/restart", msg_id.encode(), qos=1, msg_id=msg_id)
    restart(down_for=0.5)
    # The broker is down: the first publish to notice blocks in the reconnect
    # loop until it is back, then everything unacked is resent.
    for msg_id in ids[200:]:
        client.publish("t/restart", msg_id.encode(), qos=1, msg_id=msg_id)
    assert client.flush(timeout=20)
    assert len(client.acked_ids()) == len(ids)
    assert sorted(client.acked_ids()) == sorted(ids)
    assert client.stats["failed"] == 0
    assert client.stats["reconnects"] >= 1
    client.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_max_inflight_respected_with_real_broker(broker, version):
    host, port, _restart = broker
    with make_client(host, port, version=version, max_inflight=8) as client:
        for i in range(500):
            client.publish("t/window", b"w", qos=1, msg_id=str(i))
            assert client.outstanding <= 8
        assert client.flush(timeout=10)
        assert 1 <= client.stats["peak_in_flight"] <= 8
        assert len(client.acked_ids()) == 500


@pytest.mark.parametrize("version", VERSIONS)
def test_qos0_is_written_and_forgotten(broker, version):
    host, port, _restart = broker
    with make_client(host, port, version=version) as client:
        msg = client.publish("t/qos0", b"fire", qos=0, msg_id="q0")
        assert msg.packet_id == 0 and not msg.acked and not msg.failed
        assert msg.wait(timeout=5) is False          # never acked, returns at once
        assert client.outstanding == 0 and client.in_flight == 0
        assert client.flush(timeout=0)
        assert client.acked_ids() == []
        assert client.publish("t/qos0", b"then", qos=1, msg_id="q1", wait=True).acked


# -- protocol paths, against the scripted server --------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_wire_format_of_publish(fake, version):
    client = make_client(fake.host, fake.port, version=version, id_property="mid",
                         key_property="k")
    client.connect()
    client.publish("t/wire", b"body", qos=1, retain=True, msg_id="abc", key="dev-1", wait=True)
    client.publish("t/wire", "text", qos=2, wait=True)
    client.close()
    (connect,) = fake.packets(_frame.CONNECT)
    assert connect.protocol_level == version and connect.clean_start
    first, second = fake.packets(_frame.PUBLISH)
    assert (first.topic, first.payload, first.qos, first.retain, first.dup) == \
        ("t/wire", b"body", 1, True, False)
    assert second.payload == b"text" and second.qos == 2
    if version == 5:
        assert first.properties == {"user_property": [("mid", "abc"), ("k", "dev-1")]}
    else:
        assert first.properties is None           # 3.1.1: the id is the caller's business
    assert second.properties is None
    assert client.acked_ids() == ["abc"]
    assert eventually(lambda: fake.packets(_frame.DISCONNECT))
    assert [p.reason_code for p in fake.packets(_frame.DISCONNECT)] == [0]


@pytest.mark.parametrize("version", VERSIONS)
def test_resend_after_loss_uses_dup_and_same_ids(fake, version):
    # First connection: store nothing, close after the fifth PUBLISH.
    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    fake.after = lambda conn, p: ["close"] if (
        conn.no == 1 and len(fake.packets(_frame.PUBLISH, 1)) == 5) else ()
    client = make_client(fake.host, fake.port, version=version)
    client.connect()
    ids = [f"d-{i}" for i in range(5)]
    messages = [client.publish("t/dup", i.encode(), qos=1, msg_id=i) for i in ids]
    assert client.flush(timeout=10)
    resent = fake.packets(_frame.PUBLISH, 2)
    assert [p.payload for p in resent] == [i.encode() for i in ids]     # original order
    assert all(p.dup for p in resent)
    assert not any(p.dup for p in fake.packets(_frame.PUBLISH, 1))
    if version == 5:
        assert [user_properties(p)["id"] for p in resent] == ids
    assert client.acked_ids() == ids and all(m.acked for m in messages)
    assert client.stats["resent"] == 5 and client.stats["reconnects"] == 1
    client.close()


def test_resumed_session_resends_under_original_packet_ids(fake):
    fake.session_present = True
    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    fake.after = lambda conn, p: ["close"] if (
        conn.no == 1 and len(fake.packets(_frame.PUBLISH, 1)) == 3) else ()
    client = make_client(fake.host, fake.port, version=5, client_id="pub-1", clean_start=False)
    client.connect()
    for i in range(3):
        client.publish("t/session", b"s", qos=1, msg_id=str(i))
    assert client.flush(timeout=10)
    before = [p.packet_id for p in fake.packets(_frame.PUBLISH, 1)]
    after = [p.packet_id for p in fake.packets(_frame.PUBLISH, 2)]
    assert after == before and all(p.dup for p in fake.packets(_frame.PUBLISH, 2))
    assert [c.client_id for c in fake.packets(_frame.CONNECT)] == ["pub-1", "pub-1"]
    assert not any(c.clean_start for c in fake.packets(_frame.CONNECT))
    client.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_qos2_pubrel_resent_after_loss(fake, version):
    # Stored (PUBREC) on the first connection, which dies before PUBCOMP.
    fake.answer_pubrel = lambda conn: conn.no > 1
    fake.after = lambda conn, p: ["close"] if conn.no == 1 and p.type == _frame.PUBREL else ()
    client = make_client(fake.host, fake.port, version=version)
    client.connect()
    msg = client.publish("t/q2", b"exactly", qos=2, msg_id="q2", wait=True)
    assert msg.acked                                 # counted as stored at PUBREC
    assert client.flush(timeout=10)                  # ... and the flow completes
    (pubrel,) = fake.packets(_frame.PUBREL, 2)
    assert pubrel.packet_id == msg.packet_id
    assert fake.packets(_frame.PUBLISH, 2) == []     # not published again
    assert client.acked_ids() == ["q2"]
    client.close()


def test_server_disconnect_triggers_reconnect(fake, caplog):
    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    # MQTT 5.0 §3.14.2.1: 0x8B Server shutting down.
    fake.after = lambda conn, p: [_frame.Disconnect(0x8B), "close"] if (
        conn.no == 1 and p.type == _frame.PUBLISH) else ()
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    with caplog.at_level(logging.INFO, logger="pushcore.client"):
        msg = client.publish("t/bye", b"x", qos=1, msg_id="bye", wait=True)
    assert msg.acked and client.stats["reconnects"] == 1
    assert any(r.levelno == logging.WARNING and "0x8B" in r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.INFO and "reconnected" in r.getMessage()
               for r in caplog.records)
    client.close()


def test_quota_exceeded_is_retried_with_backoff(fake):
    refusals = {"q": 2}

    def ack_code(conn, publish):
        msg_id = user_properties(publish)["id"]
        if refusals.get(msg_id):
            refusals[msg_id] -= 1
            return errors.QuotaExceeded.reason_code
        return 0

    fake.ack_code = ack_code
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    msg = client.publish("t/quota", b"x", qos=1, msg_id="q", wait=True)
    assert msg.acked and not msg.failed and msg.reason_code == 0
    assert client.stats["quota_retries"] == 2 and client.stats["reconnects"] == 0
    assert [user_properties(p)["id"] for p in fake.packets(_frame.PUBLISH)] == ["q", "q", "q"]
    assert client.acked_ids() == ["q"]
    client.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_refused_message_is_failed_and_dropped(fake, qos):
    fake.ack_code = lambda conn, p: (errors.NotAuthorized.reason_code
                                     if p.topic == "t/deny" else 0)
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    denied = client.publish("t/deny", b"x", qos=qos, msg_id="no", wait=True)
    allowed = client.publish("t/ok", b"x", qos=qos, msg_id="yes", wait=True)
    assert client.flush(timeout=5)
    assert denied.failed and not denied.acked and denied.reason_code == 0x87
    assert allowed.acked and client.acked_ids() == ["yes"]
    assert client.stats["failed"] == 1 and client.outstanding == 0
    # A refused QoS 2 flow ends at PUBREC (MQTT 5.0 §4.3.3): no PUBREL for it.
    assert [p.packet_id for p in fake.packets(_frame.PUBREL)] == (
        [allowed.packet_id] if qos == 2 else [])
    client.close()


@pytest.mark.parametrize("version, code, error", [
    (5, 0x84, errors.UnsupportedProtocolVersion),
    (5, 0x86, errors.BadUsernameOrPassword),
    (4, 0x05, errors.NotAuthorized),
    (4, 0x01, errors.UnsupportedProtocolVersion),
])
def test_connack_refusal_raises_its_error(fake, version, code, error):
    fake.connack = lambda conn: _frame.Connack(reason_code=code)
    client = make_client(fake.host, fake.port, version=version)
    with pytest.raises(error) as info:
        client.connect()
    assert (info.value.connack_v3 if version == 4 else info.value.reason_code) == code
    assert not client.connected


def test_connect_to_closed_port_raises_oserror():
    with pytest.raises(OSError):
        make_client("127.0.0.1", free_port(), connect_timeout=1.0).connect()


def test_permanent_refusal_on_reconnect_is_raised(fake):
    fake.ack_code = lambda conn, p: None
    fake.after = lambda conn, p: ["close"] if p.type == _frame.PUBLISH else ()
    fake.connack = lambda conn: _frame.Connack(reason_code=0 if conn.no == 1 else 0x87)
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    client.publish("t/x", b"x", qos=1, msg_id="x")
    with pytest.raises(errors.NotAuthorized):
        client.flush(timeout=5)
    assert len(fake.connections) == 2 and client.outstanding == 1


def test_transient_refusal_on_reconnect_is_retried(fake):
    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    fake.after = lambda conn, p: ["close"] if conn.no == 1 and p.type == _frame.PUBLISH else ()
    # MQTT 5.0 §3.2.2.2: 0x89 Server busy on the second try.
    fake.connack = lambda conn: _frame.Connack(reason_code=0x89 if conn.no == 2 else 0)
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    assert client.publish("t/x", b"x", qos=1, msg_id="x", wait=True).acked
    assert len(fake.connections) == 3 and client.stats["reconnects"] == 1
    client.close()


def test_reconnect_backoff_attempts_and_give_up(fake, monkeypatch):
    calls = []

    def recording_delay(attempt, base, cap, rng=random):
        calls.append(attempt)
        return backoff_delay(attempt, base, cap, rng)

    monkeypatch.setattr(client_module, "backoff_delay", recording_delay)

    def after(conn, packet):
        if conn.no == 1 and packet.type == _frame.PUBLISH:
            fake.refuse = True
            return ["close"]
        return ()

    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    fake.after = after
    client = make_client(fake.host, fake.port, version=5, max_reconnects=3,
                         backoff_base=0.02, backoff_cap=10.0)
    client.connect()
    msg = client.publish("t/gone", b"x", qos=1, msg_id="gone")
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        client.flush(timeout=10)
    # Three attempts: full-jitter sleeps of at most 0.02 + 0.04 + 0.08 s.
    assert calls == [0, 1, 2]
    assert time.monotonic() - started < 0.14 + 1.0
    assert not client.connected and client.outstanding == 1 and not msg.acked

    fake.refuse = False
    assert client.flush(timeout=10)                  # connects again and resends
    assert msg.acked and client.acked_ids() == ["gone"]
    # The successful CONNACK reset the backoff: the next loss starts at attempt 0.
    fake.after = lambda conn, p: ["close"] if p.type == _frame.PUBLISH and conn.no == 2 else ()
    fake.ack_code = lambda conn, p: None if conn.no == 2 else 0
    calls.clear()
    assert client.publish("t/gone", b"y", qos=1, msg_id="again", wait=True).acked
    assert calls == [0]
    client.close()


def test_keepalive_pings_keep_connection(fake):
    fake.ack_code = lambda conn, p: None
    client = make_client(fake.host, fake.port, version=5, keepalive=1)
    client.connect()
    client.publish("t/ka", b"x", qos=1, msg_id="ka")
    assert client.flush(timeout=2.6) is False        # no ack, but the link is alive
    assert client.stats["pings"] >= 2 and client.stats["reconnects"] == 0
    assert eventually(lambda: len(fake.packets(_frame.PINGREQ)) == client.stats["pings"])
    assert len(fake.connections) == 1


def test_keepalive_without_pingresp_counts_as_lost(fake):
    fake.ack_code = lambda conn, p: None if conn.no == 1 else 0
    fake.answer_pings = lambda conn: conn.no > 1
    client = make_client(fake.host, fake.port, version=4, keepalive=1)
    client.connect()
    started = time.monotonic()
    msg = client.publish("t/ka", b"x", qos=1, msg_id="ka", wait=True)
    elapsed = time.monotonic() - started
    assert msg.acked and client.stats["reconnects"] == 1
    assert fake.packets(_frame.PINGREQ, 1)
    # PINGREQ after 1 s idle, declared dead 1 s later.
    assert 1.8 <= elapsed < 5.0
    client.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_max_inflight_never_exceeded_on_the_wire(fake, version):
    # The server acks only in batches of 8: the client must stop at exactly 8.
    fake.hold_acks = 8
    client = make_client(fake.host, fake.port, version=version, max_inflight=8)
    client.connect()
    for i in range(64):
        client.publish("t/window", b"w", qos=1 + i % 2, msg_id=str(i))
        assert client.outstanding <= 8 and client.in_flight <= 8
    assert client.flush(timeout=10)
    assert client.stats["peak_in_flight"] == 8 and fake.max_unacked == 8
    assert client.acked_ids() == [str(i) for i in range(64)]
    client.close()


def test_server_receive_maximum_bounds_the_wire(fake):
    fake.connack_props = {"receive_maximum": 3}
    fake.hold_acks = 3
    client = make_client(fake.host, fake.port, version=5, max_inflight=8)
    client.connect()
    for i in range(30):
        client.publish("t/rm", b"r", qos=1, msg_id=str(i))
        assert client.in_flight <= 3
    assert client.flush(timeout=10)
    assert client.stats["peak_in_flight"] == 3 and fake.max_unacked == 3
    assert len(client.acked_ids()) == 30
    client.close()


def test_server_limits_refuse_locally(fake):
    fake.connack_props = {"maximum_qos": 1, "retain_available": 0, "maximum_packet_size": 64}
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    qos2 = client.publish("t/lim", b"x", qos=2, msg_id="qos2")
    retained = client.publish("t/lim", b"x", qos=1, retain=True, msg_id="retained")
    big = client.publish("t/lim", b"x" * 100, qos=1, msg_id="big")
    big0 = client.publish("t/lim", b"x" * 100, qos=0)
    small = client.publish("t/lim", b"x", qos=1, msg_id="small", wait=True)
    # MQTT 5.0 §2.4: 0x9B QoS not supported, 0x9A Retain not supported.
    assert (qos2.failed, qos2.reason_code) == (True, 0x9B)
    assert (retained.failed, retained.reason_code) == (True, 0x9A)
    assert (big.failed, big.reason_code) == (True, errors.PacketTooLarge.reason_code)
    assert big0.failed and small.acked
    assert [p.payload for p in fake.packets(_frame.PUBLISH)] == [b"x"]
    assert client.acked_ids() == ["small"] and client.stats["failed"] == 4
    client.close()


def test_packet_ids_cycle_and_skip_ids_in_flight():
    client = Client()
    client._next_packet_id = 65534
    client._inflight = {65535: None, 1: None}
    assert [client._allocate_packet_id() for _ in range(3)] == [65534, 2, 3]


def test_server_publish_to_publisher_is_acknowledged(fake):
    def after(conn, packet):
        if packet.type == _frame.CONNECT:
            return [_frame.Publish("t/in", b"1", qos=1, packet_id=7),
                    _frame.Publish("t/in", b"2", qos=2, packet_id=8)]
        if packet.type == _frame.PUBREC:
            return [_frame.Ack(_frame.PUBREL, packet.packet_id)]
        return ()

    fake.after = after
    client = make_client(fake.host, fake.port, version=5)
    client.connect()
    deadline = time.monotonic() + 5
    while not fake.packets(_frame.PUBCOMP) and time.monotonic() < deadline:
        client.publish("t/drive", b"x", qos=1, wait=True)
    assert [p.packet_id for p in fake.packets(_frame.PUBACK)] == [7]
    assert [p.packet_id for p in fake.packets(_frame.PUBREC)] == [8]
    assert [p.packet_id for p in fake.packets(_frame.PUBCOMP)] == [8]
    client.close()


def test_on_ack_exception_is_logged_and_publishing_goes_on(fake, caplog):
    client = make_client(fake.host, fake.port, version=5)
    client.on_ack = lambda msg: 1 / 0
    client.connect()
    with caplog.at_level(logging.ERROR, logger="pushcore.client"):
        first = client.publish("t/cb", b"x", qos=1, msg_id="1", wait=True)
        second = client.publish("t/cb", b"x", qos=1, msg_id="2", wait=True)
    assert first.acked and second.acked
    assert sum("on_ack" in r.getMessage() for r in caplog.records) == 2
    client.close()


def test_context_manager_flushes_then_disconnects(fake):
    with make_client(fake.host, fake.port, version=5) as client:
        messages = [client.publish("t/cm", b"x", qos=2, msg_id=str(i)) for i in range(5)]
    assert all(m.acked for m in messages) and not client.connected
    assert len(fake.packets(_frame.PUBREL)) == 5     # every QoS 2 flow completed
    assert eventually(lambda: fake.packets(_frame.DISCONNECT))
    assert [p.reason_code for p in fake.packets(_frame.DISCONNECT)] == [0]


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\0b"])
def test_invalid_topic_is_refused_before_sending(topic):
    with pytest.raises(errors.TopicNameInvalid):
        Client().publish(topic, b"x")


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Client(version=3)
    with pytest.raises(ValueError):
        Client(max_inflight=0)
    with pytest.raises(ValueError):
        Client().publish("t", b"x", qos=3)
    with pytest.raises(ValueError):
        Client().publish("t", b"x", msg_id="a\0")
    with pytest.raises(ValueError):
        Client().publish("t" * 65536, b"x")
