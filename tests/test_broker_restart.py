"""Broker state that must outlive a restart of the daemon (SIGTERM and SIGKILL).

A Will waiting for its Will Delay Interval is part of the stored session, and a
copy that came through a shared subscription remembers its group, so either
survives a restart and behaves as it would have without one.
"""

import json
import time

import pytest

from pushcore import _frame
from support import Daemon
from test_broker_retained_will import Raw, will_client


def start(tmp_path):
    return Daemon(tmp_path, durability="fsync").start()


def wait_offline(d, client_id, timeout=5.0):
    """Until the stored session of ``client_id`` says it went offline (and holds its Will)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = d.cli("sessions", "--data", d.data_dir, "--json", text=True)
        sessions = json.loads(res.stdout)["sessions"] if res.returncode == 0 else []
        if any(s["client_id"] == client_id and s["disconnected_ms"] for s in sessions):
            return
        time.sleep(0.05)
    raise AssertionError(f"{client_id} not stored as offline")


def restart(d, how):
    if how == "sigterm":
        d.stop()
    else:
        # Let the commit carrying the last session write land first: fsync mode acks
        # nothing before it, but a Will or a session row has no ack to wait for.
        time.sleep(0.3)
        d.kill()
    return d.start()


def subscriber(d, client_id, topic_filter, qos=1):
    s = Raw(d, 5)
    s.connect(client_id, clean_start=False, properties={"session_expiry_interval": 600})
    s.send(_frame.Subscribe(1, [(topic_filter, qos)]))
    (ack,) = s.read()
    assert ack.reason_codes == [qos]
    return s


def resume(d, client_id, **props):
    """Reconnect a persistent session; (connection, CONNACK, packets that came with it)."""
    r = Raw(d, 5)
    r.send(_frame.Connect(client_id=client_id, protocol_level=5, clean_start=False,
                          properties={"session_expiry_interval": 600, **props}))
    connack, *rest = r.read()
    assert (connack.type, connack.reason_code) == (_frame.CONNACK, 0)
    return r, connack, rest


def publishes(packets):
    return [p for p in packets if p.type == _frame.PUBLISH]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_delayed_will_survives_a_restart(tmp_path, how):
    d = start(tmp_path)
    try:
        sub = subscriber(d, "will-watcher", "restart/will")
        sub.close()
        r = will_client(d, 5, "will-owner", "restart/will", payload=b"late", expiry=600,
                        will_props={"will_delay_interval": 3})
        r.abort()
        # The server must have seen the connection end before it is stopped: a
        # connection it closes itself while draining leaves no Will.
        wait_offline(d, "will-owner")
        restart(d, how)
        t0 = time.monotonic()
        sub = Raw(d, 5)
        connack = sub.connect("will-watcher", clean_start=False,
                              properties={"session_expiry_interval": 600})
        assert connack.session_present
        got = publishes(sub.read(1, timeout=8))
        # MQTT 5.0 §3.1.3.2.2: the Will is published once its delay has passed; the
        # restart neither drops it nor publishes it early.
        assert [(p.topic, p.payload) for p in got] == [("restart/will", b"late")]
        assert time.monotonic() - t0 >= 1.0
    finally:
        d.kill()


def test_delayed_will_cancelled_by_a_reconnect_after_a_restart(tmp_path):
    d = start(tmp_path)
    try:
        sub = subscriber(d, "cancel-watcher", "restart/cancel")
        r = will_client(d, 5, "cancel-owner", "restart/cancel", payload=b"never", expiry=600,
                        will_props={"will_delay_interval": 2})
        r.abort()
        sub.close()
        wait_offline(d, "cancel-owner")
        restart(d, "sigterm")
        back = Raw(d, 5)
        connack = back.connect("cancel-owner", clean_start=False,
                               properties={"session_expiry_interval": 600})
        assert connack.session_present
        sub = Raw(d, 5)
        sub.connect("cancel-watcher", clean_start=False,
                    properties={"session_expiry_interval": 600})
        # Past the delay: nothing arrives, then a later message does.
        time.sleep(2.5)
        back.send(_frame.Publish("restart/cancel", b"after", qos=1, packet_id=1))
        got = publishes(sub.read(1, timeout=5))
        assert [p.payload for p in got] == [b"after"]
    finally:
        d.kill()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_shared_copies_keep_their_group_across_a_restart(tmp_path, how):
    d = start(tmp_path)
    try:
        a = subscriber(d, "member-a", "$share/g/restart/jobs")
        b = subscriber(d, "member-b", "$share/g/restart/jobs")
        a.close()
        b.close()
        p = Raw(d, 5)
        p.connect("jobs-publisher")
        p.send(*(_frame.Publish("restart/jobs", b"job-%d" % i, qos=1, packet_id=i + 1)
                 for i in range(6)))
        assert len(p.read(6)) == 6
        restart(d, how)
        # Only member-b comes back: the copies queued for member-a go to it when a
        # leaves again, because each stored copy still knows its share group.
        b, _, b_got = resume(d, "member-b")
        a, _, a_got = resume(d, "member-a", receive_maximum=1)
        a_got += a.read(1, timeout=5) if not publishes(a_got) else []
        first = publishes(a_got)
        assert len(first) == 1
        a.abort()
        b_got = publishes(b_got)
        deadline = time.monotonic() + 5
        while len(b_got) + 1 < 6 and time.monotonic() < deadline:
            b_got += publishes(b.read(6 - len(b_got) - 1, timeout=1))
        # member-a's unacknowledged QoS 1 copy went to member-b as well (§4.8.2).
        assert sorted(p.payload for p in b_got) == [b"job-%d" % i for i in range(6)]
    finally:
        d.kill()
