"""Flow control end to end: per-connection limits, output watermarks, global pauses."""

import socket
import threading
import time

from pushcore import _frame
from support import Daemon


def connect(daemon, version, client_id, rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((daemon.host, daemon.port))
    s.sendall(_frame.encode(_frame.Connect(client_id=client_id, protocol_level=version), version))
    parser = _frame.Parser(version=version)
    data = s.recv(64)
    packets, _, error = parser.parse(data, 0, len(data))
    assert error is None and packets[0].type == _frame.CONNACK and packets[0].reason_code == 0
    return s, parser


def read_acks(s, parser, want, timeout=30.0):
    s.settimeout(timeout)
    buf = bytearray()
    ids = []
    while len(ids) < want:
        chunk = s.recv(1 << 16)
        assert chunk, f"closed after {len(ids)} acks"
        buf += chunk
        packets, consumed, error = parser.parse(buf, 0, len(buf))
        assert error is None
        del buf[:consumed]
        ids.extend(p.packet_id for p in packets if p.type == _frame.PUBACK and p.reason_code == 0)
    return ids


def publishes(n, topic, version, first_id=1):
    return b"".join(_frame.encode(_frame.Publish(topic, b"p" * 32, qos=1,
                                                 packet_id=(first_id + i - 1) % 65535 + 1), version)
                    for i in range(n))


def count_stored(daemon, topic):
    return sum(1 for r in daemon.dump() if r["topic"] == topic)


def test_v311_receive_maximum_pauses_reading_not_the_client(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  receive_maximum: 4\n", durability="os").start()
    try:
        s, parser = connect(d, 4, "burst311")
        # 3.1.1 has no Receive Maximum: the server may only stop reading; all arrive acked.
        s.sendall(publishes(500, "rm/311", 4))
        ids = read_acks(s, parser, 500)
        assert len(ids) == 500
        s.close()
    finally:
        d.stop()
    assert count_stored(d, "rm/311") == 500


def test_outbuf_watermark_stops_reading_until_the_client_reads(tmp_path):
    # In-process, over a socketpair with tiny kernel buffers, so the daemon's own
    # output buffer is what fills: past outbuf_high it must stop reading.
    from pushcore.config import load_config
    from server.connection import PAUSE_OUTBUF, Connection
    from server.daemon import Server

    cfg = load_config(None, {"storage.data_dir": str(tmp_path / "data"), "storage.durability": "os",
                             "mqtt.outbuf_high": "8KiB", "mqtt.outbuf_low": "2KiB",
                             "mqtt.receive_maximum": 65535})
    srv = Server(cfg)
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    conn = Connection(srv, ours, "socketpair")
    srv.conns[conn.fd] = conn
    conn.start()
    loop_thread = threading.Thread(target=srv.loop.run)
    loop_thread.start()
    try:
        theirs.sendall(_frame.encode(_frame.Connect(client_id="nonreader"), 4))
        parser = _frame.Parser(version=4)
        theirs.settimeout(5)
        assert theirs.recv(4) == b"\x20\x02\x00\x00"
        theirs.settimeout(1.0)
        burst = publishes(500, "wm/topic", 4)
        total = 0
        with_pause = False
        try:
            while total < 200_000:
                theirs.sendall(burst)
                total += 500
        except socket.timeout:
            with_pause = bool(conn.paused & PAUSE_OUTBUF)
        assert with_pause, "the daemon kept reading a connection that never drains its acks"
        assert len(conn.proto.out) > 8 * 1024
        # The client reads: output drains below the low mark, reading resumes, all acked.
        acked = read_acks(theirs, parser, total)
        assert len(acked) >= total
        assert not conn.paused & PAUSE_OUTBUF
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        loop_thread.join(10)
        srv.writer.stop()
        srv.store.close()
        theirs.close()


def test_global_backpressure_with_tiny_batches(tmp_path):
    # A one-message batch limit pauses every connection whenever a message
    # arrives while a commit runs: the pause/resume path is exercised over and
    # over; nothing may be lost or doubled.
    d = Daemon(tmp_path, config="storage:\n  batch:\n    max_messages: 1\n").start()
    results = {}
    rounds = 20
    try:
        def worker(n):
            s, parser = connect(d, 5, f"gp-{n}")
            got = 0
            for r in range(rounds):
                s.sendall(publishes(10, f"gp/{n}", 5, first_id=r * 10 + 1))
                time.sleep(0.002)
            got += len(read_acks(s, parser, 10 * rounds))
            results[n] = got
            s.close()

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {n: 10 * rounds for n in range(8)}
    finally:
        d.stop()
    stored = d.dump()
    for n in range(8):
        assert sum(1 for r in stored if r["topic"] == f"gp/{n}") == 10 * rounds
    assert '"global_pauses": ' in d.log()


def test_sigusr1_logs_counters(tmp_path):
    import signal

    d = Daemon(tmp_path, durability="os").start()
    try:
        s, parser = connect(d, 5, "counted")
        s.sendall(publishes(3, "m", 5))
        read_acks(s, parser, 3)
        d.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while "messages_stored" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"messages_stored": 3' in d.log()
    finally:
        d.stop()


def test_a_bug_in_one_connection_closes_it_with_0x83_and_the_rest_go_on(tmp_path):
    # Fault injection in-process: a handler raising a non-MQTT exception is a bug;
    # that connection gets DISCONNECT 0x83, the daemon and other connections carry on.
    from pushcore.config import load_config
    from pushcore.mqtt import MQTTServerConnection
    from server.daemon import Server

    cfg = load_config(None, {"storage.data_dir": str(tmp_path / "data"), "storage.durability": "os",
                             "mqtt.bind": "127.0.0.1:0"})
    srv = Server(cfg)
    host, port = srv.listen()
    loop_thread = threading.Thread(target=srv.loop.run)
    loop_thread.start()

    def broken_pingreq(self, packet):
        raise KeyError("injected")

    original = MQTTServerConnection._handlers[_frame.PINGREQ]
    MQTTServerConnection._handlers[_frame.PINGREQ] = broken_pingreq
    try:
        d = type("D", (), {"host": host, "port": port})
        victim, vparser = connect(d, 5, "victim")
        other, oparser = connect(d, 5, "other")
        victim.sendall(b"\xc0\x00")
        victim.settimeout(5)
        data = victim.recv(64)
        packets, _, _ = vparser.parse(data, 0, len(data))
        assert packets[0].type == _frame.DISCONNECT and packets[0].reason_code == 0x83
        assert victim.recv(64) == b""
        other.sendall(publishes(5, "after/bug", 5))
        assert len(read_acks(other, oparser, 5)) == 5
        assert srv.metrics["internal_errors"] == 1
    finally:
        MQTTServerConnection._handlers[_frame.PINGREQ] = original
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        loop_thread.join(10)
        srv.writer.stop()
        srv.store.close()


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slowloris_partial_packets_do_not_pin_receive_buffers(tmp_path):
    # keepalive 0 and one byte of the next packet, then silence: each such
    # connection must cost a few bytes of tail, not a 64 KiB pool buffer.
    d = Daemon(tmp_path, durability="os").start()
    socks = []
    try:
        time.sleep(0.3)
        before = _rss_kb(d.proc.pid)
        for i in range(300):
            s, _parser = connect(d, 4, f"slow-{i}")
            s.sendall(b"\x30")
            socks.append(s)
        # Everyone is still connected, the daemon still serves.
        other, oparser = connect(d, 5, "normal")
        other.sendall(publishes(5, "slow/other", 5))
        assert len(read_acks(other, oparser, 5)) == 5
        grown = _rss_kb(d.proc.pid) - before
        assert grown < 300 * 16, f"RSS grew {grown} KiB for 300 slow connections"
    finally:
        for s in socks:
            s.close()
        d.stop()


def test_qos2_resend_of_a_refused_original_is_refused_too(tmp_path):
    # In-process: batch A (the original QoS 2 PUBLISH) is refused for a full
    # store while batch B holds only the re-sent copy (an ack owed, no record).
    # The copy must not get PUBREC 0x00 for a message that was never stored.
    from pushcore.config import load_config
    from pushcore.errors import StoreFull
    from pushcore.mqtt import MQTTServerConnection
    from server.daemon import Server

    class Transport:
        def acks_ready(self):
            pass

        def pause(self, flag):
            pass

        def close(self, reason):
            pass

    srv = Server(load_config(None, {"storage.data_dir": str(tmp_path / "data"),
                                    "storage.durability": "os"}))
    try:
        proto = MQTTServerConnection(srv.mqtt_settings, srv.ingest, srv)
        proto.transport = Transport()

        def feed(packet):
            data = bytearray(_frame.encode(packet, 5))
            proto.receive(data, 0, len(data))

        feed(_frame.Connect(client_id="c", protocol_level=5, keepalive=0))
        proto.out.clear()
        pub = _frame.Publish("t", b"payload", qos=2, packet_id=7)
        feed(pub)
        batch_a = srv.ingest.take()
        pub.dup = True
        feed(pub)
        batch_b = srv.ingest.take()
        assert not batch_b.items and len(batch_b.waiters) == 1
        srv.ingest.batch = batch_b   # B is the pending batch while A commits
        srv._committed(batch_a, None, StoreFull("full"))
        batch_b = srv.ingest.take()
        srv._committed(batch_b, srv.store.append_batch(batch_b.items, 0), None)
        packets, _, _ = _frame.Parser(version=5).parse(proto.out, 0, len(proto.out))
        assert [(p.type, p.packet_id, p.reason_code) for p in packets] == \
            [(_frame.PUBREC, 7, 0x97), (_frame.PUBREC, 7, 0x97)]
        assert srv.store.stats()["records"] == 0
        # And the store is still taken as full: nothing was stored.
        assert srv.store_full_until > 0
    finally:
        srv.writer.stop()
        srv.store.close()


def test_out_of_descriptors_backs_off_instead_of_spinning(tmp_path):
    d = Daemon(tmp_path, durability="os", wrapper=("prlimit", "--nofile=40:40")).start()
    socks = []

    def cpu_ticks():
        return sum(int(x) for x in open(f"/proc/{d.proc.pid}/stat").read().split()[13:15])

    try:
        time.sleep(0.3)
        before = cpu_ticks()
        for _ in range(80):
            socks.append(socket.create_connection((d.host, d.port), timeout=5))
        time.sleep(1.5)
        cpu = cpu_ticks() - before
        failures = d.log().count("accept failed")
        # Level-triggered epoll on a listener it cannot accept from would spin a
        # core and log thousands of lines a second; the back-off keeps both low.
        assert 1 <= failures < 100, failures
        assert cpu < 75, f"{cpu} clock ticks of CPU in 1.5 s"
        for s in socks:
            s.close()
        socks = []
        time.sleep(0.3)
        # Descriptors are back: the daemon accepts and serves again.
        s, parser = connect(d, 5, "after-emfile")
        s.sendall(publishes(3, "emfile/ok", 5))
        assert len(read_acks(s, parser, 3)) == 3
        s.close()
    finally:
        for s in socks:
            s.close()
        d.stop()
