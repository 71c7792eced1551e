"""Crash: SIGKILL the daemon while the client library streams; nothing acked is lost."""

import collections
import threading
import time

import pytest

from pushcore.client import Client
from support import Daemon

TOTAL = 50_000


# durability os commits on the reactor thread, fsync in the writer thread: both paths.
@pytest.mark.parametrize("version,durability", [(5, "fsync"), (4, "fsync"), (5, "os")])
def test_sigkill_mid_stream_loses_nothing_acked(tmp_path, version, durability):
    config = "dedup:\n  json_field: id\n" if version == 4 else ""
    daemon = Daemon(tmp_path, config=config, durability=durability).start()
    acked = []
    failures = []
    stats = {}

    def on_ack(message):
        acked.append(message.msg_id)

    def stream():
        try:
            client = Client(port=daemon.port, client_id=f"streamer-{version}", version=version,
                            max_inflight=256, backoff_base=0.02, backoff_cap=0.5,
                            max_reconnects=200)
            client.on_ack = on_ack
            client.connect()
            for i in range(TOTAL):
                msg_id = f"m-{i}"
                # MQTT 3.1.1 has no user properties: the id travels in the JSON payload.
                payload = f'{{"id": "{msg_id}", "n": {i}}}'.encode()
                client.publish("stream/data", payload, qos=1, msg_id=msg_id)
            assert client.flush(timeout=120)
            stats.update(client.stats)
            client.close()
        except BaseException as err:  # reported to the main thread
            failures.append(err)

    t = threading.Thread(target=stream)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while len(acked) < TOTAL // 3 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.005)
        assert len(acked) >= TOTAL // 3, f"stream too slow: {len(acked)} acked"
        acked_before_kill = set(acked)
        daemon.kill()
        time.sleep(0.3)
        daemon.start()
        t.join(180)
        assert not t.is_alive(), "client did not finish after the restart"
        assert not failures, failures
    finally:
        daemon.kill()

    # The kill really cut the stream: the client had to reconnect and resend.
    assert stats["reconnects"] >= 1 and stats["resent"] >= 1, stats
    stored = collections.Counter(r["id"] for r in daemon.dump() if r["topic"] == "stream/data")
    # Every id acked before the crash survived it ...
    assert all(stored[i] == 1 for i in acked_before_kill)
    # ... and after the client's resends every id is acked and stored exactly once.
    assert set(acked) == {f"m-{i}" for i in range(TOTAL)}
    assert len(stored) == TOTAL
    assert set(stored.values()) == {1}
