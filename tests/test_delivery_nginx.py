"""End to end: the delivery engine against Debian's nginx as the webhook receiver.

nginx runs in the foreground as the test's child, with its own prefix, pid
file, logs and temp directories under tmp_path, on a free loopback port.  It
answers every request itself (``return 204``); what it received is read back
from its access log, one tab-separated line per request, written as soon as
the request is answered.  nginx cannot log a body without a proxy, so batches
are checked by their X-Pushcore-Count and Content-Length.  Pacing comes from
``limit_req`` without ``nodelay``: nginx holds each request past the zone's
rate until its turn, then answers it.
"""

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from support import Daemon, delivery_config, free_port, publish, sink_stats, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                  else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian's nginx package; ./run test "
                          "installs it when run as root)")

# One line per request.  Tabs separate the fields: nginx escapes control characters
# (and '"', '\') in logged values, so a tab in a line is always a separator.
LOG_FIELDS = (
    ("$msec", "at_ms"),
    ("$status", "status"),
    ("$request_method", "method"),
    ("$request_uri", "uri"),
    ("$http_content_type", "content_type"),
    ("$http_idempotency_key", "key"),
    ("$http_x_pushcore_partition", "partition"),
    ("$http_x_pushcore_offset", "offset"),
    ("$http_x_pushcore_count", "count"),
    ("$http_content_length", "content_length"),
    ("$request_length", "request_length"),
    ("$connection", "connection"),
)
INT_FIELDS = {"status", "partition", "offset", "count", "content_length", "request_length",
              "connection"}


@dataclass(frozen=True)
class Logged:
    """One request as nginx logged it; a header the request lacked is None."""

    at_ms: int
    status: int
    method: str
    uri: str
    content_type: str | None
    key: str | None
    partition: int | None
    offset: int | None
    count: int | None
    content_length: int | None
    request_length: int
    connection: int


def parse_line(line):
    values = {}
    for (_, name), text in zip(LOG_FIELDS, line.split("\t"), strict=True):
        if text == "-" and name not in ("at_ms", "status", "method", "uri"):
            values[name] = None
        elif name == "at_ms":
            # $msec is seconds with exactly three decimals: integer ms, no float error.
            seconds, _, millis = text.partition(".")
            values[name] = int(seconds) * 1000 + int(millis)
        elif name in INT_FIELDS:
            values[name] = int(text)
        else:
            values[name] = text
    return Logged(**values)


class Nginx:
    """Debian's nginx in the foreground (``daemon off``), one worker, on 127.0.0.1.

    ``locations`` maps a path prefix to the directives of its ``location``
    block; ``http`` is added to the ``http`` block (e.g. a ``limit_req_zone``).
    ``reload`` rewrites the configuration and sends SIGHUP, as an operator would.
    """

    def __init__(self, rundir, locations, http=""):
        self.rundir = rundir
        self.port = free_port()
        self.conf = rundir / "nginx.conf"
        self.error_log = rundir / "error.log"
        self.access_log = rundir / "access.log"
        self.proc = None
        self._write_conf(locations, http)
        self._pos = 0
        self._partial = b""
        self._logged = []

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def _write_conf(self, locations, http):
        blocks = "".join(f"        location {path} {{\n            {directives}\n        }}\n"
                         for path, directives in locations.items())
        log_format = "\\t".join(variable for variable, _ in LOG_FIELDS)
        # Temp paths here rather than Debian's /var/lib/nginx: any user can run it.
        temp = "".join(f"    {kind}_temp_path {self.rundir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(f"""daemon off;
worker_processes 1;
pid {self.rundir}/nginx.pid;
# notice: the master logs each reload ("start worker process"), which reload() waits for.
error_log {self.error_log} notice;
events {{
    worker_connections 1024;
}}
http {{
    log_format pushcore '{log_format}';
    # Unbuffered: a request's line is in the file once it is answered.
    access_log {self.access_log} pushcore;
    # Every request of a test on the connection it came on: pushcore keeps its pool open.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    # Batches stay in memory, never in a temp file.
    client_body_buffer_size 1m;
{temp}{http}
    server {{
        listen 127.0.0.1:{self.port};
{blocks}    }}
}}
""")

    def start(self, timeout=15.0):
        out = open(self.rundir / "stderr.log", "ab")
        # -e: the error log while the configuration is read, before error_log applies
        # (else /var/log/nginx).  A session of its own: a stop that has to kill takes
        # the worker too.
        self.proc = subprocess.Popen([NGINX, "-p", str(self.rundir), "-c", str(self.conf),
                                      "-e", str(self.error_log)],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n"
                                   f"{self.errors()[-4000:]}")
            if self.workers_started():
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return self
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError(f"nginx did not listen within {timeout} s:\n{self.errors()[-4000:]}")

    def errors(self):
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def workers_started(self):
        return self.errors().count("start worker process ")

    def reload(self, locations, http="", timeout=10.0):
        """New locations for new requests; returns once the new worker runs."""
        before = self.workers_started()
        self._write_conf(locations, http)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.workers_started() > before, timeout, "nginx to reload")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM is nginx's fast shutdown: the master stops its worker, then exits.
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def settled(self, quiet=0.2, timeout=5.0):
        """The requests logged once no new one came for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        logged = self.logged()
        while time.monotonic() < deadline:
            time.sleep(quiet)
            if len(self.logged()) == len(logged):
                return logged
            logged = self.logged()
        raise AssertionError(f"nginx still logging requests after {timeout} s")

    def logged(self):
        """Every request logged so far, in the order nginx answered them."""
        with open(self.access_log, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self._logged += [parse_line(line.decode()) for line in lines]
        return list(self._logged)


@pytest.fixture
def start_nginx(tmp_path):
    started = []

    def start(locations, http=""):
        rundir = tmp_path / f"nginx-{len(started)}"
        rundir.mkdir()
        server = Nginx(rundir, locations, http)
        # Listed before it starts: a start that fails half-way is stopped too.
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def start_daemon(tmp_path):
    started = []

    def start(config, **kw):
        daemon = Daemon(tmp_path, config=config, **kw)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.kill()




def webhook(url, **options):
    # A fast retry schedule: nothing here should fail, and what does is seen soon.
    return {"type": "webhook", "url": url,
            "retry": {"base": "100ms", "factor": 2, "cap": "1s", "max_attempts": 10}, **options}








# A location whose requests nginx answers 204 itself.
ANSWER_204 = "return 204;"
# A location paced by the limit_req zone ``zone``: requests past its rate wait their
# turn (no nodelay); burst is far above the sinks' connections, so none is refused.
# `return` would answer in the rewrite phase, before limit_req (preaccess) runs;
# try_files runs after it and hands the request to @ok, which answers 204.
PACED = "limit_req zone={zone} burst=64; try_files /-no-such-file- @ok;"


def paced(zone, rate):
    """The ``http`` lines and locations of a receiver that takes ``rate`` requests/s."""
    http = f"    limit_req_zone $server_port zone={zone}:1m rate={rate}r/s;\n"
    return http, {"/": PACED.format(zone=zone), "@ok": ANSWER_204}


def first_deliveries(logged):
    """Idempotency-Keys in the order of their first 204."""
    return list(dict.fromkeys(r.key for r in logged if r.status == 204))


def assert_key_order(first, order, key_of):
    """Per ordering key, the first deliveries are in publish order."""
    per_key = collections.defaultdict(list)
    for msg_id in first:
        per_key[key_of(msg_id)].append(order[msg_id])
    for key, sequence in per_key.items():
        assert sequence == sorted(sequence), f"key {key} delivered out of order"


# -- a. what nginx receives -----------------------------------------------------------


def batch_line_length(record):
    """Bytes of the NDJSON line a batch carries for a stored record (conf/pushcore.yaml
    `batch`; the payloads here are ASCII, so "payload" holds them as text)."""
    line = {"id": record["id"], "topic": record["topic"], "partition": record["partition"],
            "offset": record["offset"], "time_ms": record["time"], "payload": record["payload"]}
    return len(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode()) + 1


def test_nginx_gets_one_request_per_message_and_batches_that_add_up(start_nginx, start_daemon):
    nginx = start_nginx({"/hook": ANSWER_204, "/batch": ANSWER_204})
    sinks = {"each": webhook(nginx.url("/hook?src=pushcore"), connections=4),
             "bulk": webhook(nginx.url("/batch"), batch=50)}
    daemon = start_daemon(delivery_config(sinks, [("orders/#", "each"), ("bulk/#", "bulk")],
                                          partitions=8))
    singles = [("orders/new", f"order {i}".encode(), f"o-{i}", f"key-{i % 8}")
               for i in range(400)]
    bulk = [("bulk/rows", f"row {i}".encode(), f"b-{i}", f"key-{i % 8}") for i in range(1000)]
    publish(daemon, singles + bulk)

    def arrived():
        logged = nginx.logged()
        each = [r for r in logged if r.uri.startswith("/hook")]
        batches = [r for r in logged if r.uri == "/batch"]
        if len(each) >= len(singles) and sum(r.count for r in batches) >= len(bulk):
            return each, batches
        return None

    each, batches = wait_until(arrived, 20, "every message at nginx", daemon)
    stored = {r["id"]: r for r in daemon.dump()}

    # One request per message, each answered 204 the first time: no retries, no repeats.
    assert sorted(r.key for r in each) == sorted(msg_id for _, _, msg_id, _ in singles)
    for request in each:
        record = stored[request.key]
        assert (request.method, request.uri, request.status) == ("POST", "/hook?src=pushcore",
                                                                 204)
        assert (request.partition, request.offset) == (record["partition"], record["offset"])
        assert request.content_type == "application/octet-stream"
        assert request.content_length == len(record["payload"])
        assert request.count is None
    # Kept alive: the requests came over at most the sink's 4 connections.
    assert len({r.connection for r in each}) <= 4
    assert_key_order(first_deliveries(each), {m: i for i, (_, _, m, _) in enumerate(singles)},
                     lambda msg_id: stored[msg_id]["key"])

    # Batches: consecutive offsets of one partition, at most 50, whose lines add up to
    # the Content-Length nginx read; together, every bulk record exactly once.
    by_offset = {(r["partition"], r["offset"]): r for r in stored.values()}
    covered = collections.Counter()
    for request in batches:
        partition, first, last = map(int, request.key.split("-"))
        assert (request.method, request.status) == ("POST", 204)
        assert request.content_type == "application/x-ndjson"
        assert request.partition == partition
        assert request.count == last - first + 1
        assert 1 <= request.count <= 50
        records = [by_offset[(partition, offset)] for offset in range(first, last + 1)]
        assert request.content_length == sum(map(batch_line_length, records))
        covered.update(record["id"] for record in records)
    assert covered == collections.Counter(msg_id for _, _, msg_id, _ in bulk)
    # 1,000 records committed in groups (the publisher keeps up to 256 in flight) make
    # some batch hold more than one.
    assert max(r.count for r in batches) > 1


# -- b. SIGKILL in the middle of 20,000 deliveries ------------------------------------------

CRASH_TOTAL = 20_000
# 'key-0'..'key-31' hash to every one of the 8 partitions (16 would leave two empty).
CRASH_KEYS = 32
CRASH_PARTITIONS = 8
# nginx answers 2,000 requests/s: the 20,000 take ~10 s, far longer than publishing
# them (~1-2 s here), so the kill lands mid-delivery.
CRASH_RATE = 2000


def test_sigkill_mid_delivery_of_20000_resumes_from_committed_cursors(start_nginx,
                                                                        start_daemon):
    http, locations = paced("crash", CRASH_RATE)
    nginx = start_nginx(locations, http)
    sink = webhook(nginx.url("/hook"), concurrency=CRASH_PARTITIONS,
                   connections=CRASH_PARTITIONS)
    daemon = start_daemon(delivery_config({"hook": sink}, [("crash/#", "hook")],
                                          partitions=CRASH_PARTITIONS), durability="fsync")
    order = {f"c-{i}": i for i in range(CRASH_TOTAL)}
    publish(daemon, [("crash/data", f"{i}".encode(), f"c-{i}", f"key-{i % CRASH_KEYS}")
                     for i in range(CRASH_TOTAL)])
    wait_until(lambda: len(first_deliveries(nginx.logged())) >= CRASH_TOTAL // 4, 30,
               "a quarter delivered", daemon)
    daemon.kill()
    # Requests nginx was still pacing when the daemon died end now (a few ms at most);
    # once the log is still, everything in it came before the restart.
    pre = nginx.settled()
    delivered_pre = first_deliveries(pre)
    assert len(delivered_pre) < CRASH_TOTAL, \
        "every message was delivered before the kill: pace nginx slower (CRASH_RATE)"
    # The store as the crash left it: the cursors the restart resumes from.
    stats, hook = sink_stats(daemon, "hook")
    cursors = {p["partition"]: p["cursor"] for p in hook["per_partition"]}
    parts = {p["partition"]: p for p in stats["per_partition"]}
    assert all(part["next"] > part["first"] for part in parts.values()), parts

    daemon.start()
    wait_until(lambda: len(first_deliveries(nginx.logged())) == CRASH_TOTAL, 30,
               "every message", daemon)
    logged = nginx.logged()
    post = logged[len(pre):]

    first = first_deliveries(logged)
    assert set(first) == set(order)
    assert_key_order(first, order, lambda msg_id: order[msg_id] % CRASH_KEYS)
    ok_pre = collections.defaultdict(set)
    for r in pre:
        if r.status == 204:
            ok_pre[r.partition].add(r.offset)
    for partition, part in parts.items():
        cursor = cursors[partition]
        # At least once: a committed cursor never passes a record nginx has not answered.
        assert set(range(part["first"], cursor)) <= ok_pre[partition], partition
        # The restart resumed there, not at the start: this partition's requests after
        # it are exactly the records from the cursor on, in order, once each.
        assert [r.offset for r in post if r.partition == partition] == \
            list(range(cursor, part["next"])), partition
    assert all(r.status == 204 for r in post)
    # Sent twice: what nginx answered but the daemon had not yet committed as passed.
    repeated = sum(r.status == 204 for r in logged) - CRASH_TOTAL
    assert repeated == sum(len({o for o in ok_pre[p] if o >= c}) for p, c in cursors.items())
    # A quarter of the 5,000+ is more than half a second of deliveries at CRASH_RATE
    # left uncommitted (commits take milliseconds here); from the start would be all.
    assert repeated < len(delivered_pre) // 4, (repeated, len(delivered_pre))


# -- c. a slow receiver ---------------------------------------------------------------------

SLOW_TOTAL = 2000
SLOW_KEYS = 8


def test_slow_receiver_builds_backlog_without_slowing_ingest(start_nginx, start_daemon):
    # 10 requests/s over one connection: 2,000 messages would take 200 s to deliver.
    http, locations = paced("slow", 10)
    nginx = start_nginx(locations, http)
    sink = webhook(nginx.url("/hook"), concurrency=1, connections=1)
    daemon = start_daemon(delivery_config({"slow": sink}, [("slow/#", "slow")], partitions=4))
    order = {f"s-{i}": i for i in range(SLOW_TOTAL)}
    publish(daemon, [("slow/data", f"{i}".encode(), f"s-{i}", f"key-{i % SLOW_KEYS}")
                     for i in range(SLOW_TOTAL)])
    delivered_at_ack = len(nginx.logged())
    # Every message was acked while nginx had answered only a few: ingest did not wait
    # for delivery.  A quarter would be 50 s of publishing at the receiver's 10/s.
    assert delivered_at_ack < SLOW_TOTAL // 4, delivered_at_ack

    stats, slow = sink_stats(daemon, "slow")
    delivered = len(nginx.logged())
    assert stats["records"] == SLOW_TOTAL
    # The backlog is what nginx has not answered, give or take the cursor not yet
    # committed for it.
    assert SLOW_TOTAL - delivered <= slow["backlog"] <= SLOW_TOTAL
    assert (slow["retries"], slow["dead_letters"]) == (0, 0)
    # Still delivering, at the receiver's pace.
    wait_until(lambda: len(nginx.logged()) >= delivered + 5, 10, "five more deliveries",
               daemon)

    # The receiver catches up (its operator lifts the limit): the backlog drains.
    nginx.reload({"/": ANSWER_204})
    wait_until(lambda: len(first_deliveries(nginx.logged())) == SLOW_TOTAL, 30,
               "every message", daemon)
    wait_until(lambda: sink_stats(daemon, "slow")[1]["backlog"] == 0, 10,
               "the cursors to be committed", daemon)
    first = first_deliveries(nginx.logged())
    assert set(first) == set(order)
    assert_key_order(first, order, lambda msg_id: order[msg_id] % SLOW_KEYS)
