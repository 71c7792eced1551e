"""`pushcore sub` and the subscriber client (server.subscriber) against the
real daemon, with messages published by `pushcore pub`, the publisher client
and paho-mqtt.

Most tests share one daemon (module scope) and keep apart by unique topics and
client ids; tests that need their own configuration start their own.  A
background `pushcore sub` runs with -d, and the test publishes only after its
"subscribed to" log line: the SUBACK has come, so the subscription is in place
for every publish committed after it (MQTT 5.0 §3.8.4).
"""

import json
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from pushcore import errors
from pushcore.client import Client
from pushcore.config import OPTIONS
from server.subscriber import SESSION_NEVER_EXPIRES, Message, Subscriber
from support import ROOT, Daemon, free_port, pushcore_cmd

VERSIONS = [4, 5]
# The -V spelling of each protocol version.
CLI_VERSION = {4: "311", 5: "5"}
DENY_SUPPORTED = "mqtt.subscribe_deny" in OPTIONS
needs_deny = pytest.mark.skipif(not DENY_SUPPORTED,
                                reason="mqtt.subscribe_deny is not a config option yet")
EXIT_SUB_TIMEOUT = 27


def uniq():
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    config = "mqtt:\n  subscribe_deny: [secret/#]\n" if DENY_SUPPORTED else ""
    d = Daemon(tmp_path_factory.mktemp("sub"), config=config, durability="os").start()
    yield d
    d.kill()


def publish(daemon, topic, payload, qos=1, retain=False, msg_id=None):
    """Publish one message and wait for its ack (QoS 1/2): it is committed,
    so its deliveries are on their way."""
    with Client(port=daemon.port, max_reconnects=0) as c:
        c.publish(topic, payload, qos=qos, retain=retain, msg_id=msg_id, wait=qos > 0)


def paho_publish(daemon, topic, payload, qos, properties=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(daemon.host, daemon.port)
    c.loop_start()
    try:
        info = c.publish(topic, payload, qos=qos, properties=properties)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def run_sub(daemon, *args):
    return subprocess.run(pushcore_cmd("sub", "-p", str(daemon.port), *args), cwd=ROOT,
                          capture_output=True, timeout=60)


class BackgroundSub:
    """`pushcore sub -d ...` running while the test publishes."""

    def __init__(self, daemon, *args):
        self.proc = subprocess.Popen(pushcore_cmd("sub", "-p", str(daemon.port), "-d", *args),
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err_lines = []
        self._subscribed = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.err_lines.append(line.decode(errors="replace"))
            if b"subscribed to" in line:
                self._subscribed.set()

    @property
    def stderr(self):
        return "".join(self.err_lines)

    def wait_subscribed(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(5)
                assert self._subscribed.is_set(), \
                    f"pushcore sub exited with {self.proc.returncode}:\n{self.stderr}"
                return
            assert time.monotonic() < deadline, f"pushcore sub did not subscribe:\n{self.stderr}"

    def finish(self, timeout=20.0):
        """Wait for the exit; return (status, stdout bytes)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pushcore sub still running after {timeout} s:\n{self.stderr}")
        out = self.proc.stdout.read()
        self._reader.join(5)
        return rc, out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def background(daemon):
    started = []

    def start(*args):
        sub = BackgroundSub(daemon, *args)
        started.append(sub)
        return sub

    yield start
    for sub in started:
        sub.kill()


def drain_release(sub, timeout=5.0):
    """Read on until every QoS 2 flow has had its PUBREL (and PUBCOMP)."""
    deadline = time.monotonic() + timeout
    while sub.awaiting_release:
        assert time.monotonic() < deadline, "no PUBREL from the server"
        assert sub.receive(timeout=0.05) is None


# -- pushcore sub ------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_sub_count_verbose_with_pushcore_pub(daemon, background, version):
    p = uniq()
    sub = background("-t", f"{p}/#", "-C", "3", "-v", "-q", "1", "-V", CLI_VERSION[version])
    sub.wait_subscribed()
    # MQTT 5.0 §4.7.1.2: "p/#" also matches the parent level "p"; "x/p/1" is
    # not under it.
    for topic, text in ((f"x/{p}/1", "not me"), (p, "one"), (f"{p}/b", "two"),
                        (f"{p}/b/c", "three")):
        r = daemon.cli("pub", "-p", str(daemon.port), "-t", topic, "-m", text)
        assert r.returncode == 0, r.stderr
    rc, out = sub.finish()
    assert rc == 0, sub.stderr
    assert out.splitlines() == [f"{p} one".encode(), f"{p}/b two".encode(),
                                f"{p}/b/c three".encode()]


def test_sub_prints_raw_payload_lines_by_default(daemon, background):
    p = uniq()
    sub = background("-t", f"{p}/+", "-C", "2")
    sub.wait_subscribed()
    publish(daemon, f"{p}/a", b"first")
    publish(daemon, f"{p}/b", b"second")
    rc, out = sub.finish()
    assert (rc, out) == (0, b"first\nsecond\n"), sub.stderr


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sub_qos", [1, 2])
def test_sub_qos_is_the_lower_of_publish_and_subscription(daemon, background, version, sub_qos):
    p = uniq()
    sub = background("-t", f"{p}/#", "-q", str(sub_qos), "-C", "3", "-F", "json",
                     "-V", CLI_VERSION[version])
    sub.wait_subscribed()
    for qos in (0, 1, 2):
        paho_publish(daemon, f"{p}/{qos}", f"at {qos}".encode(), qos)
    rc, out = sub.finish()
    assert rc == 0, sub.stderr
    got = [json.loads(line) for line in out.splitlines()]
    # MQTT 5.0 §3.8.4: delivered at the lower of the publish QoS and the
    # subscription's maximum QoS.
    assert [(m["topic"], m["payload"], m["qos"], m["retain"]) for m in got] == \
        [(f"{p}/{qos}", f"at {qos}", min(qos, sub_qos), False) for qos in (0, 1, 2)]


def test_sub_timeout_exits_27(daemon):
    started = time.monotonic()
    r = run_sub(daemon, "-t", f"{uniq()}/#", "-W", "1")
    assert r.returncode == EXIT_SUB_TIMEOUT, r.stderr
    assert time.monotonic() - started >= 1.0
    assert r.stdout == b""


def test_sub_timeout_before_count_exits_27_after_printing(daemon, background):
    p = uniq()
    sub = background("-t", f"{p}/#", "-C", "5", "-W", "3")
    sub.wait_subscribed()
    publish(daemon, f"{p}/1", b"only one")
    rc, out = sub.finish()
    assert (rc, out) == (EXIT_SUB_TIMEOUT, b"only one\n"), sub.stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_sub_persistent_session_gets_what_came_while_away(daemon, version):
    p = uniq()
    cid = f"cli-{version}-{p}"
    session = ["-c", "-i", cid, "-V", CLI_VERSION[version], "-q", "1"]
    if version == 5:
        session += ["-x", "300"]
    r = run_sub(daemon, "-t", f"{p}/#", *session, "-W", "0.5")
    assert r.returncode == EXIT_SUB_TIMEOUT, r.stderr
    for i in range(3):
        publish(daemon, f"{p}/{i}", f"away {i}".encode(), qos=1)
    r = run_sub(daemon, "-t", f"{p}/#", *session, "-C", "3", "-v", "-W", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{p}/{i} away {i}".encode() for i in range(3)]
    # They were acknowledged: the resumed session has nothing left to send.
    r = run_sub(daemon, "-t", f"{p}/#", *session, "-W", "1")
    assert (r.returncode, r.stdout) == (EXIT_SUB_TIMEOUT, b""), r.stderr


def test_sub_without_c_keeps_no_session(daemon):
    p = uniq()
    r = run_sub(daemon, "-t", f"{p}/#", "-i", f"clean-{p}", "-q", "1", "-W", "0.5")
    assert r.returncode == EXIT_SUB_TIMEOUT, r.stderr
    publish(daemon, f"{p}/1", b"nobody home", qos=1)
    r = run_sub(daemon, "-t", f"{p}/#", "-i", f"clean-{p}", "-q", "1", "-W", "1")
    assert (r.returncode, r.stdout) == (EXIT_SUB_TIMEOUT, b""), r.stderr


@needs_deny
@pytest.mark.parametrize("version, code", [(5, "0x87"), (4, "0x80")])
def test_sub_suback_refusal_names_filter_and_code(daemon, version, code):
    r = run_sub(daemon, "-t", f"ok/{uniq()}", "-t", "secret/keys", "-V", CLI_VERSION[version],
                "-W", "5")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "'secret/keys'" in err and code in err
    assert "ok/" not in err
    assert r.stdout == b""


def test_sub_invalid_filter_is_refused_before_sending(daemon):
    r = run_sub(daemon, "-t", "a/#/b", "-W", "5")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "'a/#/b'" in err and "0x8F" in err


def test_sub_retained_messages_and_R(daemon, background):
    p = uniq()
    publish(daemon, f"{p}/kept", b"stale value", retain=True)
    r = run_sub(daemon, "-t", f"{p}/#", "-C", "1", "-F", "json", "-W", "10")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"topic": f"{p}/kept", "qos": 0, "retain": True,
                                    "payload": "stale value", "properties": {}}
    # -R: the retained message is skipped, a live one is printed.
    sub = background("-t", f"{p}/#", "-R", "-C", "1", "-v")
    sub.wait_subscribed()
    publish(daemon, f"{p}/live", b"fresh")
    rc, out = sub.finish()
    assert (rc, out) == (0, f"{p}/live fresh\n".encode()), sub.stderr


def test_sub_retained_only_exits_at_first_live_message(daemon, background):
    p = uniq()
    publish(daemon, f"{p}/a", b"ra", retain=True)
    publish(daemon, f"{p}/b", b"rb", retain=True)
    sub = background("-t", f"{p}/#", "--retained-only", "-v")
    sub.wait_subscribed()
    publish(daemon, f"{p}/c", b"live")
    rc, out = sub.finish()
    assert rc == 0, sub.stderr
    assert sorted(out.splitlines()) == [f"{p}/a ra".encode(), f"{p}/b rb".encode()]


def test_sub_json_binary_payload_and_properties(daemon, background):
    p = uniq()
    sub = background("-t", f"{p}/#", "-C", "2", "-F", "json", "-q", "1")
    sub.wait_subscribed()
    publish(daemon, f"{p}/bin", b"\xff\x00", msg_id="m-1")
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "text/x"
    props.CorrelationData = b"\xff\x01"
    props.UserProperty = [("id", "m-2"), ("k", "v")]
    paho_publish(daemon, f"{p}/text", "héllo".encode(), 1, props)
    rc, out = sub.finish()
    assert rc == 0, sub.stderr
    first, second = (json.loads(line) for line in out.splitlines())
    assert first == {"topic": f"{p}/bin", "qos": 1, "retain": False, "payload_b64": "/wA=",
                     "properties": {"user_property": [["id", "m-1"]]}}
    # MQTT 5.0 §3.3.2.3: the server forwards these properties unaltered,
    # user properties in their order.
    assert second["payload"] == "héllo"
    assert second["properties"]["content_type"] == "text/x"
    assert second["properties"]["correlation_data_b64"] == "/wE="
    assert second["properties"]["user_property"] == [["id", "m-2"], ["k", "v"]]


def test_sub_reader_gone_exits_quietly(daemon, background):
    p = uniq()
    sub = background("-t", f"{p}/#")
    sub.wait_subscribed()
    publish(daemon, f"{p}/1", b"read me")
    assert sub.proc.stdout.readline() == b"read me\n"
    sub.proc.stdout.close()
    publish(daemon, f"{p}/2", b"nobody reads me")
    assert sub.proc.wait(20) == 1
    sub._reader.join(5)
    assert "Traceback" not in sub.stderr and "Exception ignored" not in sub.stderr


@pytest.mark.parametrize("args, complaint", [
    (["-t", "a", "-c"], "-c needs a client id"),
    (["-t", "a", "-V", "311", "-x", "60"], "-x is an MQTT 5.0 option"),
    (["-t", "a", "-R", "--retained-only"], "-R drops the retained messages"),
    (["-t", "a", "-C", "0"], "must be at least 1"),
    (["-t", "a", "-W", "0"], "must be above 0"),
    (["-t", "a", "-x", "4294967296"], "-1 (never)"),
    (["-q", "1"], "-t"),
])
def test_sub_usage_errors_exit_2(args, complaint):
    # No daemon: each is refused before connecting.
    r = subprocess.run(pushcore_cmd("sub", "-p", str(free_port()), *args), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert complaint in r.stderr


def test_sub_help_and_h_is_the_host():
    r = subprocess.run(pushcore_cmd("sub", "--help"), cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "-W SECONDS" in r.stdout
    port = free_port()
    r = subprocess.run(pushcore_cmd("sub", "-h", "127.0.0.1", "-p", str(port), "-t", "a"),
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert f"127.0.0.1:{port}: Connection refused" in r.stderr


def test_sub_connack_refusal_exits_1(tmp_path):
    d = Daemon(tmp_path, config="mqtt:\n  keepalive_max: 30\n", durability="os").start()
    try:
        # MQTT 3.1.1 has no Server Keep Alive: a keepalive above the cap is
        # refused with CONNACK 0x02.
        r = subprocess.run(pushcore_cmd("sub", "-p", str(d.port), "-V", "311", "-k", "60",
                                        "-t", "a"),
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        d.kill()
    assert r.returncode == 1
    assert "CONNACK refused: return code 0x02 (identifier rejected)" in r.stderr


# -- server.subscriber ---------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_subscriber_receives_each_qos(daemon, version):
    p = uniq()
    with Subscriber(port=daemon.port, version=version) as sub:
        assert sub.session_present is False
        assert sub.subscribe(f"{p}/#", qos=2) == [2]
        for qos in (0, 1, 2):
            publish(daemon, f"{p}/{qos}", f"q{qos}".encode(), qos=qos)
        got = [sub.receive(timeout=10) for _ in range(3)]
        assert got == [Message(f"{p}/{qos}", f"q{qos}".encode(), qos, False, None)
                       for qos in (0, 1, 2)]
        drain_release(sub)
        assert sub.receive(timeout=0.3) is None


def test_subscriber_several_filters_one_subscribe(daemon):
    p = uniq()
    with Subscriber(port=daemon.port) as sub:
        assert sub.subscribe([f"{p}/a/+", f"{p}/b/#"], qos=1) == [1, 1]
        for topic in (f"{p}/a/1", f"{p}/a/1/2", f"{p}/b", f"{p}/b/2"):
            publish(daemon, topic, b"x")
        got = [m.topic for m in sub.messages(timeout=2)]
    # "+" is exactly one level (§4.7.1.3); "#" includes the parent (§4.7.1.2).
    assert got == [f"{p}/a/1", f"{p}/b", f"{p}/b/2"]


@pytest.mark.parametrize("version", VERSIONS)
def test_subscriber_persistent_session_resumes(daemon, version):
    p = uniq()
    cid = f"lib-{version}-{p}"
    expiry = 300 if version == 5 else None

    def session():
        return Subscriber(port=daemon.port, client_id=cid, version=version, clean_start=False,
                          session_expiry=expiry)

    with session() as sub:
        assert sub.session_present is False
        sub.subscribe(f"{p}/#", qos=1)
    for i in range(3):
        publish(daemon, f"{p}/{i}", f"m{i}".encode(), qos=1)
    with session() as sub:
        assert sub.session_present is True
        # No SUBSCRIBE: the session kept the subscription and queued these.
        got = [sub.receive(timeout=10) for _ in range(3)]
        assert [(m.topic, m.payload, m.qos) for m in got] == \
            [(f"{p}/{i}", f"m{i}".encode(), 1) for i in range(3)]
        assert sub.receive(timeout=0.3) is None
    with session() as sub:
        assert sub.session_present is True
        assert sub.receive(timeout=0.5) is None
    # A clean start discards the session.
    with Subscriber(port=daemon.port, client_id=cid, version=version) as sub:
        assert sub.session_present is False
    with session() as sub:
        assert sub.session_present is False


def test_subscriber_v5_session_without_expiry_ends_with_the_connection(daemon):
    p = uniq()
    cid = f"noexp-{p}"
    with Subscriber(port=daemon.port, client_id=cid, clean_start=False) as sub:
        sub.subscribe(f"{p}/#", qos=1)
    publish(daemon, f"{p}/1", b"lost", qos=1)
    # MQTT 5.0 §3.1.2.11.2: Session Expiry Interval absent is 0: no session
    # outlives the connection, even with Clean Start 0.
    with Subscriber(port=daemon.port, client_id=cid, clean_start=False) as sub:
        assert sub.session_present is False
        assert sub.receive(timeout=0.5) is None


def test_subscriber_session_never_expires(daemon):
    p = uniq()
    cid = f"never-{p}"
    with Subscriber(port=daemon.port, client_id=cid, clean_start=False,
                    session_expiry=SESSION_NEVER_EXPIRES) as sub:
        sub.subscribe(f"{p}/#", qos=1)
    publish(daemon, f"{p}/1", b"kept", qos=1)
    with Subscriber(port=daemon.port, client_id=cid, clean_start=False,
                    session_expiry=SESSION_NEVER_EXPIRES) as sub:
        assert sub.session_present is True
        assert sub.receive(timeout=10).payload == b"kept"


@pytest.mark.parametrize("version", VERSIONS)
def test_subscriber_qos2_is_not_redelivered_after_pubrec(daemon, version):
    p = uniq()
    cid = f"q2-{version}-{p}"
    expiry = 300 if version == 5 else None
    with Subscriber(port=daemon.port, client_id=cid, version=version, clean_start=False,
                    session_expiry=expiry) as sub:
        sub.subscribe(f"{p}/#", qos=2)
        publish(daemon, f"{p}/once", b"exactly once", qos=2)
        assert sub.receive(timeout=10).payload == b"exactly once"
        # Close right after the PUBREC, most likely before the PUBREL.
    with Subscriber(port=daemon.port, client_id=cid, version=version, clean_start=False,
                    session_expiry=expiry) as sub:
        assert sub.session_present is True
        # MQTT 5.0 §4.4: the resumed session re-sends the PUBREL, not the PUBLISH.
        assert sub.receive(timeout=1.0) is None


def test_subscriber_retained_flags_and_retain_handling(daemon):
    p = uniq()
    publish(daemon, f"{p}/r", b"old", retain=True)
    with Subscriber(port=daemon.port) as plain, \
            Subscriber(port=daemon.port) as rap, \
            Subscriber(port=daemon.port) as rh2:
        plain.subscribe(f"{p}/#", qos=1)
        rap.subscribe(f"{p}/#", qos=1, retain_as_published=True)
        rh2.subscribe(f"{p}/#", qos=1, retain_handling=2)
        # §3.3.1.3: a retained message sent because of a new subscription has RETAIN 1.
        assert plain.receive(timeout=10)[:4] == (f"{p}/r", b"old", 1, True)
        assert rap.receive(timeout=10)[:4] == (f"{p}/r", b"old", 1, True)
        publish(daemon, f"{p}/r", b"new", qos=1, retain=True)
        # Live delivery: RETAIN 0 unless Retain As Published (§3.8.3.1).
        assert plain.receive(timeout=10)[:4] == (f"{p}/r", b"new", 1, False)
        assert rap.receive(timeout=10)[:4] == (f"{p}/r", b"new", 1, True)
        # Retain Handling 2: no retained message at subscribe, live ones still come.
        assert rh2.receive(timeout=10)[:4] == (f"{p}/r", b"new", 1, False)


def test_subscriber_retain_handling_1_only_for_a_new_subscription(daemon):
    p = uniq()
    publish(daemon, f"{p}/r", b"kept", retain=True)
    with Subscriber(port=daemon.port) as sub:
        sub.subscribe(f"{p}/#", retain_handling=1)
        assert sub.receive(timeout=10).payload == b"kept"
        sub.subscribe(f"{p}/#", retain_handling=1)
        assert sub.receive(timeout=0.5) is None
        # Retain Handling 0 sends it again on every subscribe (§3.3.1.3).
        sub.subscribe(f"{p}/#", retain_handling=0)
        assert sub.receive(timeout=10).payload == b"kept"


def test_subscriber_v311_live_retained_message_has_retain_0(daemon):
    p = uniq()
    with Subscriber(port=daemon.port, version=4) as sub:
        sub.subscribe(f"{p}/#", qos=1)
        publish(daemon, f"{p}/r", b"live", qos=1, retain=True)
        # 3.1.1 §3.3.1.3 [MQTT-3.3.1-9]: RETAIN 0 for an established subscription.
        assert sub.receive(timeout=10)[:4] == (f"{p}/r", b"live", 1, False)
    with Subscriber(port=daemon.port, version=4) as sub:
        sub.subscribe(f"{p}/#", qos=1)
        # [MQTT-3.3.1-8]: RETAIN 1 when sent because of a new subscription.
        assert sub.receive(timeout=10)[:4] == (f"{p}/r", b"live", 1, True)


def test_subscriber_subscription_identifier(daemon):
    p = uniq()
    with Subscriber(port=daemon.port) as sub:
        sub.subscribe(f"{p}/#", qos=1, subscription_id=7)
        publish(daemon, f"{p}/1", b"x")
        msg = sub.receive(timeout=10)
    assert msg.properties["subscription_identifier"] == [7]


def test_subscriber_shared_subscription_delivers_each_message_once(daemon):
    p = uniq()
    with Subscriber(port=daemon.port) as a, Subscriber(port=daemon.port) as b:
        a.subscribe(f"$share/g/{p}/#", qos=1)
        b.subscribe(f"$share/g/{p}/#", qos=1)
        for i in range(6):
            publish(daemon, f"{p}/{i}", str(i).encode())
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 6 and time.monotonic() < deadline:
            for sub in (a, b):
                msg = sub.receive(timeout=0.05)
                if msg is not None:
                    got.append(msg.payload)
        assert a.receive(timeout=0.3) is None and b.receive(timeout=0.3) is None
    assert sorted(got) == [str(i).encode() for i in range(6)]


def test_subscriber_keepalive_pings_keep_the_connection(daemon):
    p = uniq()
    with Subscriber(port=daemon.port, keepalive=1) as sub:
        sub.subscribe(f"{p}/#")
        # The server closes a connection silent for 1.5 x keepalive (§3.1.2.10);
        # PINGREQs keep this one open while nothing arrives.
        assert sub.receive(timeout=3.0) is None
        assert sub.connected
        publish(daemon, f"{p}/1", b"still here")
        assert sub.receive(timeout=10).payload == b"still here"


def test_subscriber_assigned_client_id(daemon):
    with Subscriber(port=daemon.port, client_id="") as sub:
        assert sub.client_id
        assert sub.connack_properties["assigned_client_identifier"] == sub.client_id


@pytest.mark.parametrize("version, cls, text", [
    (5, errors.ClientIdentifierNotValid, "reason 0x85"),
    (4, errors.ClientIdentifierNotValid, "return code 0x02 (identifier rejected)"),
])
def test_subscriber_connack_refusal(tmp_path, version, cls, text):
    d = Daemon(tmp_path, config="mqtt:\n  allow_zero_length_clientid: false\n",
               durability="os").start()
    try:
        sub = Subscriber(port=d.port, client_id="", version=version)
        with pytest.raises(cls) as info:
            sub.connect()
        assert text in str(info.value)
        assert not sub.connected
    finally:
        d.kill()


def test_subscriber_invalid_filter_raises_and_connection_stays(daemon):
    p = uniq()
    with Subscriber(port=daemon.port) as sub:
        with pytest.raises(errors.TopicFilterInvalid) as info:
            sub.subscribe([f"{p}/ok", f"{p}/bad+"])
        assert f"'{p}/bad+'" in str(info.value) and "0x8F" in str(info.value)
        assert sub.subscribe(f"{p}/ok") == [0]


@needs_deny
@pytest.mark.parametrize("version", VERSIONS)
def test_subscriber_suback_refusal(daemon, version):
    p = uniq()
    with Subscriber(port=daemon.port, version=version) as sub:
        with pytest.raises(errors.MQTTError) as info:
            sub.subscribe([f"{p}/ok", "secret/x"], qos=1)
        err = info.value
        if version == 5:
            assert type(err) is errors.NotAuthorized and err.reason_code == 0x87
            assert "'secret/x' refused with 0x87 (Not authorized)" in str(err)
        else:
            assert err.reason_code == 0x80
            assert "'secret/x' refused with 0x80 (Failure)" in str(err)
        assert f"{p}/ok" not in str(err)
        # The granted filter stays subscribed.
        publish(daemon, f"{p}/ok", b"granted")
        assert sub.receive(timeout=10).payload == b"granted"


def test_subscriber_takeover_raises_connection_error(daemon):
    cid = f"taken-{uniq()}"
    with Subscriber(port=daemon.port, client_id=cid) as first:
        with Subscriber(port=daemon.port, client_id=cid):
            # MQTT 5.0 §3.1.4: the server closes the existing connection,
            # telling a v5 client 0x8E Session taken over.
            with pytest.raises(ConnectionError, match="DISCONNECT 0x8E"):
                first.receive(timeout=10)
        assert not first.connected


def test_subscriber_local_argument_errors():
    with pytest.raises(ValueError):
        Subscriber(version=4, client_id="", clean_start=False)
    with pytest.raises(ValueError):
        Subscriber(version=4, session_expiry=60)
    with pytest.raises(ValueError):
        Subscriber(session_expiry=SESSION_NEVER_EXPIRES + 1)
    sub = Subscriber(port=free_port())
    with pytest.raises(ValueError):
        sub.subscribe("a", qos=3)
    with pytest.raises(ValueError):
        sub.subscribe("a", retain_handling=3)
    with pytest.raises(ValueError):
        sub.subscribe("a", subscription_id=0)
    with pytest.raises(ConnectionError):
        sub.subscribe("a")
    with pytest.raises(ValueError):
        Subscriber(version=4).subscribe("a", retain_as_published=True)
    with pytest.raises(ConnectionRefusedError):
        sub.connect()
