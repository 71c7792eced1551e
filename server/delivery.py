"""The delivery engine: stored messages to webhooks and Python callables.

Each configured sink reads every partition of the log in order, from its
cursor, and hands the records whose topic matches one of its routes to its
transport: an HTTP/1.1 webhook (non-blocking sockets in the reactor, a
keep-alive pool, responses parsed by ``pushcore._http``) or a Python
callable run in worker threads.  What happens next is one of three outcomes
(``pushcore.webhook.classify``):

- success: the cursor moves past the records.  Cursors are written with the
  next group commit (the same write path as ingest), so after a crash
  delivery resumes from the last committed cursor: at least once, nothing
  lost; a receiver drops duplicates by ``Idempotency-Key``.
- retry: exponential backoff with full jitter.  ``ordering: strict`` holds
  the partition behind its failing head (its due time is in the LMDB retry
  queue, so a restart keeps waiting); ``ordering: none`` puts the record in
  the retry queue and lets the partition go on.
- dead: the record goes to the dead-letter queue (LMDB), with its attempts
  and last error, and the partition goes on.  ``pushcore dlq replay`` puts
  entries back into the retry queue, where the retry poller finds them.

Callback order for one partition of one sink::

    read -> send -> (success | retry -> [held] -> send ... | dead) -> read ...
"""

import collections
import concurrent.futures
import errno
import importlib
import ipaddress
import logging
import socket
import time

from pushcore import _http
from pushcore._ingest import select_records
from pushcore.errors import ConfigError
from pushcore.log import (
    OP_DELETE,
    OP_PUT,
    cursor_key,
    cursor_value,
    dlq_key,
    encode_failure,
    retry_key,
)
from pushcore.record import decode_record
from pushcore.topics import matches
from pushcore.webhook import (
    RETRY,
    SUCCESS,
    Delivery,
    Outcome,
    RetryPolicy,
    classify,
    classify_error,
    request_writer,
    retry_delay,
)
from server import _io

log = logging.getLogger("pushcore.delivery")

# Records read from one partition per read transaction.
READ_CHUNK = 512
# How often the retry queue is looked at for due entries (ordering none, replays).
RETRY_POLL_S = 0.25
# Retry entries taken per poll and sink.
RETRY_BATCH = 256
# A resolved name is used this long before it is resolved again.
RESOLVE_TTL_S = 30.0
# Distinct topics whose routing result a sink keeps.
ROUTE_CACHE_MAX = 10_000
# Bytes read from a webhook connection per recv.
RECV_SIZE = 65536
# Delivery state (cursors, retry and dead-letter entries) goes with the next commit
# of records; when no records come, it is committed on its own at most this often.
# At least once allows a cursor that lags; a commit (and a sync) per delivery would
# cost more than the deliveries.
STATE_COMMIT_S = 0.05


class Engine:
    """All sinks of one server, and the store writes they owe the next commit."""

    def __init__(self, server, sinks_cfg, routes_cfg):
        self.loop = server.loop
        self.store = server.store
        self.metrics = server.metrics
        self.writes = []
        # (sink id, partition) -> next offset, written once per commit however many
        # deliveries moved it.
        self.cursors = {}
        # When the state was last taken for a commit, and the timer that wakes the
        # loop when it may be committed on its own again.
        self.taken_at = 0.0
        self.state_timer = None
        self.stopped = False
        self.resolver = concurrent.futures.ThreadPoolExecutor(1, "pushcore-resolve")
        names = list(sinks_cfg)
        ids = self.store.register_sinks(names)
        cursors = self.store.cursors()
        self.sinks = []
        for name in names:
            filters = [topic_filter for topic_filter, sink in routes_cfg if sink == name]
            self.sinks.append(Sink(self, name, ids[name], sinks_cfg[name], filters, cursors))

    def start(self):
        for sink in self.sinks:
            sink.start()

    def take_writes(self):
        self.taken_at = self.loop.time()
        writes, self.writes = self.writes, []
        for (sink_id, partition), offset in self.cursors.items():
            writes.append((OP_PUT, b"cursor", cursor_key(sink_id, partition),
                           cursor_value(offset)))
        self.cursors.clear()
        return writes

    def pending(self):
        """Whether the state owed is due for a commit of its own (see STATE_COMMIT_S)."""
        if not (self.writes or self.cursors):
            return False
        wait = self.taken_at + STATE_COMMIT_S - self.loop.time()
        if wait <= 0 or self.stopped:
            return True
        if self.state_timer is None:
            self.state_timer = self.loop.call_later(wait, self._state_due)
        return False

    def _state_due(self):
        # Nothing to do here: the loop iteration this timer ends asks pending() again.
        self.state_timer = None

    def committed(self, partitions):
        """New records were committed in these partitions."""
        for sink in self.sinks:
            sink.wake(partitions)

    def stop(self):
        # From now on what is owed is committed at once (the drain waits for it).
        self.stopped = True
        if self.state_timer is not None:
            self.state_timer.cancel()
        for sink in self.sinks:
            sink.stop()
        self.resolver.shutdown(wait=False, cancel_futures=True)


class PartitionState:
    __slots__ = ("partition", "next", "busy", "attempts", "held", "retry_key", "rows", "pos")

    def __init__(self, partition, next_offset):
        self.partition = partition
        # The next offset to read; everything before it is delivered, dead or retrying.
        self.next = next_offset
        self.busy = False
        # Failed attempts of the head (ordering strict).
        self.attempts = 0
        # The timer holding a strict partition behind its failing head.
        self.held = None
        # Its entry in the retry queue, deleted once the head is delivered.
        self.retry_key = None
        # Records read ahead (Log.read_raw): (key, record) pairs, the next one to look
        # at is rows[pos].
        self.rows = []
        self.pos = 0


class Sink:
    """One sink: its routes, cursors, transport and retry policy."""

    def __init__(self, engine, name, sink_id, cfg, filters, cursors):
        self.engine = engine
        self.loop = engine.loop
        self.store = engine.store
        self.metrics = engine.metrics
        self.name = name
        self.sink_id = sink_id
        self.filters = tuple(filters)
        # topic (UTF-8 bytes, as stored) -> whether a route sends it here; bounded like
        # the broker's.
        self.route_cache = {}
        self.m_delivered = f"sink_{name}_delivered"
        self.m_failed = f"sink_{name}_failed_attempts"
        self.m_dead = f"sink_{name}_dead"
        self.strict = cfg.ordering == "strict"
        self.concurrency = cfg.concurrency
        retry = cfg.retry
        webhook = cfg.type == "webhook"
        # on_4xx and Retry-After are HTTP matters: a Python sink only ever retries.
        http_policy = {"retry_4xx": cfg.on_4xx == "retry",
                       "max_retry_after_s": retry.max_retry_after} if webhook else {}
        self.policy = RetryPolicy(base_s=retry.base, factor=retry.factor, cap_s=retry.cap,
                                  max_attempts=retry.max_attempts, **http_policy)
        if cfg.type == "webhook":
            self.transport = WebhookTransport(self, cfg)
            self.batch = cfg.batch
        else:
            self.transport = PythonTransport(self, cfg)
            self.batch = 1
        self.partitions = []
        for partition in range(self.store.partitions):
            start = cursors.get((sink_id, partition))
            if start is None:
                # A new sink starts at the oldest record kept (retention waits for it
                # from now on).
                start = self.store.first_offset(partition)
            self.partitions.append(PartitionState(partition, start))
        self.active = 0
        self.waiting = collections.deque()
        # Retry-queue keys being sent or done but maybe not yet deleted in the store.
        self.retrying = set()
        self.retry_in_flight = set()
        self.retry_timer = None
        self.stopped = False

    # -- start and stop ------------------------------------------------------

    def start(self):
        if self.strict:
            # A head that was failing when the server stopped goes on waiting for its
            # due time; other retry entries of this sink are replays (or ordering none).
            now_ms = _now_ms()
            for key, due, sink_id, partition, offset, attempts, *_ in \
                    self.store.retry_due(2 ** 63):
                if sink_id != self.sink_id:
                    continue
                ps = self.partitions[partition]
                if offset == ps.next and ps.retry_key is None:
                    ps.attempts = attempts
                    ps.retry_key = key
                    # Its partition sends it when the hold ends; the poller must not.
                    self.retrying.add(key)
                    self._hold(ps, max(0.0, (due - now_ms) / 1000))
        for ps in self.partitions:
            self._schedule(ps)
        self.retry_timer = self.loop.call_later(RETRY_POLL_S, self._poll_retries)

    def stop(self):
        self.stopped = True
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        for ps in self.partitions:
            if ps.held is not None:
                ps.held.cancel()
        self.transport.close()

    def wake(self, partitions):
        for partition in partitions:
            self._schedule(self.partitions[partition])

    # -- reading the log -------------------------------------------------------

    def _schedule(self, ps):
        """Send the partition's next records, or queue it for a free slot."""
        if ps.busy or ps.held is not None or self.stopped:
            return
        if self.active >= self.concurrency:
            if ps not in self.waiting:
                self.waiting.append(ps)
            return
        self._send_next(ps)

    def _send_next(self, ps):
        # The records are picked in C (select_records), a chunk of rows per call.
        records = []
        first = 0
        before = ps.next
        while True:
            if ps.pos >= len(ps.rows):
                start = first + len(records) if records else ps.next
                if start >= self.store.next_offsets[ps.partition]:
                    # Caught up: no read transaction for nothing; the next commit in
                    # this partition wakes it (Engine.committed).
                    break
                ps.rows = self.store.read_raw(ps.partition, start, READ_CHUNK)
                ps.pos = 0
                if not ps.rows:
                    break
            ps.pos, ps.next, first, done = select_records(
                ps.rows, ps.pos, ps.next, self.batch, self.route_cache, self._route_miss,
                records, first)
            if done:
                break
        if not records:
            # Nobody here wanted what was read: the cursor simply moved past it.
            if ps.next != before:
                self._write_cursor(ps)
            return
        # Until the outcome, the batch is not read again; a retry puts it back.
        ps.busy = True
        self.active += 1
        self.transport.send(ps.partition, first, records,
                            lambda outcome, status=0: self._done(ps, first, records, outcome,
                                                                 status))

    def _route_miss(self, topic):
        if len(self.route_cache) >= ROUTE_CACHE_MAX:
            self.route_cache.clear()
        text = topic.decode()
        routed = self.route_cache[topic] = any(matches(topic_filter, text)
                                               for topic_filter in self.filters)
        return routed

    def _write_cursor(self, ps):
        self.engine.cursors[(self.sink_id, ps.partition)] = ps.next

    def _free_slot(self):
        self.active -= 1
        while self.waiting and self.active < self.concurrency:
            self._schedule(self.waiting.popleft())

    # -- outcomes --------------------------------------------------------------

    def _done(self, ps, first, records, outcome, status):
        ps.busy = False
        self._free_slot()
        if self.stopped:
            return
        m = self.metrics
        last = first + len(records) - 1
        if outcome.kind == SUCCESS:
            m[self.m_delivered] += len(records)
            self._passed(ps, last)
        elif outcome.kind == RETRY and ps.attempts + 1 < self.policy.max_attempts:
            m[self.m_failed] += 1
            attempt = ps.attempts
            ps.attempts += 1
            delay = retry_delay(outcome, attempt, self.policy)
            due_ms = _now_ms() + int(delay * 1000)
            log.info("sink %s: partition %d offset %d: %s; retry %d in %.2f s",
                     self.name, ps.partition, first, outcome.reason, ps.attempts, delay)
            if self.strict:
                self._retry_head(ps, first, records[0], outcome, status, due_ms)
                # The held records are read again when the hold ends.
                ps.rows = []
                ps.pos = 0
                self._hold(ps, delay)
                return
            for i, record in enumerate(records):
                self._put_retry(ps.partition, first + i, record, ps.attempts, outcome, status,
                                due_ms)
            ps.attempts = 0
            ps.next = last + 1
        else:
            m[self.m_dead] += len(records)
            log.warning("sink %s: partition %d offsets %d..%d to the dead-letter queue "
                        "after %d attempts: %s", self.name, ps.partition, first, last,
                        ps.attempts + 1, outcome.reason)
            for i, record in enumerate(records):
                self._put_dead(ps.partition, first + i, record, ps.attempts + 1, outcome, status)
            self._passed(ps, last)
        self._write_cursor(ps)
        self._schedule(ps)

    def _passed(self, ps, last):
        ps.next = last + 1
        ps.attempts = 0
        if ps.retry_key is not None:
            # The key stays in ``retrying`` until the poller no longer sees it (its delete
            # is committed), so the poller never sends the head again meanwhile.
            self.engine.writes.append((OP_DELETE, b"retry", ps.retry_key, None))
            ps.retry_key = None

    def _hold(self, ps, delay):
        ps.held = self.loop.call_later(delay, self._release, ps)

    def _release(self, ps):
        ps.held = None
        self._schedule(ps)

    def _retry_head(self, ps, offset, raw, outcome, status, due_ms):
        """ordering strict: the head's due time goes to the retry queue too (restarts)."""
        if ps.retry_key is not None:
            # Left in ``retrying`` until its delete is committed, as in _passed.
            self.engine.writes.append((OP_DELETE, b"retry", ps.retry_key, None))
        ps.retry_key = retry_key(due_ms, self.sink_id, ps.partition, offset)
        # The poller must leave a held head to its partition.
        self.retrying.add(ps.retry_key)
        self.engine.writes.append((OP_PUT, b"retry", ps.retry_key,
                                   encode_failure(ps.attempts, status, outcome.reason, raw)))

    def _put_retry(self, partition, offset, raw, attempts, outcome, status, due_ms):
        key = retry_key(due_ms, self.sink_id, partition, offset)
        self.engine.writes.append((OP_PUT, b"retry", key,
                                   encode_failure(attempts, status, outcome.reason, raw)))

    def _put_dead(self, partition, offset, raw, attempts, outcome, status):
        key = dlq_key(self.sink_id, _now_ms(), partition, offset)
        self.engine.writes.append((OP_PUT, b"dlq", key,
                                   encode_failure(attempts, status, outcome.reason, raw)))

    # -- the retry queue: ordering none, and replays -----------------------------

    def _poll_retries(self):
        self.retry_timer = None
        if self.stopped:
            return
        try:
            due = self.store.retry_due(_now_ms(), RETRY_BATCH * 4)
        except Exception:
            log.exception("sink %s: reading the retry queue failed", self.name)
            due = []
        seen = set()
        taken = 0
        for key, _due, sink_id, partition, offset, attempts, _status, _error, record in due:
            if sink_id != self.sink_id:
                continue
            seen.add(key)
            if key in self.retrying or taken >= RETRY_BATCH:
                continue
            self.retrying.add(key)
            self.retry_in_flight.add(key)
            taken += 1
            self.transport.send(partition, offset, [record],
                                lambda outcome, status=0, key=key, partition=partition,
                                offset=offset, raw=record, attempts=attempts:
                                self._retried(key, partition, offset, raw, attempts, outcome,
                                              status))
        # A key handled and deleted stays in ``retrying`` until the poll no longer
        # sees it (its delete is committed), so it is not sent twice meanwhile.
        held = {ps.retry_key for ps in self.partitions if ps.retry_key is not None}
        self.retrying = {key for key in self.retrying
                         if key in seen or key in held or key in self.retry_in_flight}
        self.retry_timer = self.loop.call_later(RETRY_POLL_S, self._poll_retries)

    def _retried(self, key, partition, offset, raw, attempts, outcome, status):
        self.retry_in_flight.discard(key)
        if self.stopped:
            return
        self.engine.writes.append((OP_DELETE, b"retry", key, None))
        if outcome.kind == SUCCESS:
            self.metrics[self.m_delivered] += 1
        elif outcome.kind == RETRY and attempts + 1 < self.policy.max_attempts:
            self.metrics[self.m_failed] += 1
            delay = retry_delay(outcome, attempts, self.policy)
            self._put_retry(partition, offset, raw, attempts + 1, outcome, status,
                            _now_ms() + int(delay * 1000))
        else:
            self.metrics[self.m_dead] += 1
            self._put_dead(partition, offset, raw, attempts + 1, outcome, status)


def _now_ms():
    return int(time.time() * 1000)


# -- transports ---------------------------------------------------------------------


class PythonTransport:
    """``module:function`` called with each Delivery in worker threads; raising is failing."""

    def __init__(self, sink, cfg):
        self.sink = sink
        self.loop = sink.loop
        module_name, _, function_name = cfg.function.partition(":")
        try:
            module = importlib.import_module(module_name)
            self.function = getattr(module, function_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"sinks.{sink.name}.function", f"cannot load {cfg.function!r}: "
                              f"{exc}") from None
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.threads,
                                                          f"pushcore-sink-{sink.name}")

    def send(self, partition, first, records, done):
        future = self.pool.submit(self._call, partition, first, records)
        future.add_done_callback(
            lambda f: self.loop.call_soon_threadsafe(done, f.result()))

    def _call(self, partition, first, records):
        try:
            for i, record in enumerate(records):
                self.function(Delivery.from_record(decode_record(record), partition, first + i))
        except Exception as exc:
            return Outcome(RETRY, None, f"{type(exc).__name__}: {exc}")
        return Outcome(SUCCESS, None, "ok")

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class WebhookTransport:
    """A keep-alive pool of HTTP/1.1 connections to one webhook target."""

    def __init__(self, sink, cfg):
        self.sink = sink
        self.loop = sink.loop
        # The configuration parsed and checked the URL (pushcore.webhook.Target).
        self.target = cfg.url
        self.batching = cfg.batch > 1
        self.writer = request_writer(self.target, cfg.secret, cfg.headers)
        self.connect_timeout = cfg.connect_timeout
        self.response_timeout = cfg.response_timeout
        self.max_connections = cfg.connections
        self.idle = []
        self.connections = set()
        self.queue = collections.deque()
        self.address = None
        self.resolved_at = 0.0
        self.resolving = False
        self.closed = False
        host = self.target.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            # A literal address needs no name resolution.
            self.address = (host, self.target.port)
            self.resolved_at = float("inf")

    def send(self, partition, first, records, done):
        # A batching sink always sends NDJSON, even one record: the receiver sees
        # one format whatever was ready at the time.
        if self.batching or len(records) > 1:
            request = self.writer.batch(records, partition, first, time.time())
        else:
            request = self.writer.single(records[0], partition, first, time.time())
        self.queue.append((request, done))
        self._dispatch()

    def _dispatch(self):
        if self.closed:
            return
        if self.loop.time() - self.resolved_at > RESOLVE_TTL_S:
            self._resolve()
            if self.address is None:
                return
        while self.queue and self.idle:
            conn = self.idle.pop()
            conn.request(*self.queue.popleft())
        while self.queue and len(self.connections) < self.max_connections:
            conn = HTTPConnection(self)
            self.connections.add(conn)
            conn.request(*self.queue.popleft())

    def _resolve(self):
        # getaddrinfo blocks: it runs in a thread, never in the reactor.
        if self.resolving:
            return
        self.resolving = True
        future = self.sink.engine.resolver.submit(
            socket.getaddrinfo, self.target.host, self.target.port, type=socket.SOCK_STREAM)
        future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(self._resolved, f))

    def _resolved(self, future):
        self.resolving = False
        try:
            infos = future.result()
        except (OSError, concurrent.futures.CancelledError) as exc:
            if self.address is None:
                # Nobody can be sent anything: every queued request fails (and is retried).
                queue, self.queue = self.queue, collections.deque()
                for _request, done in queue:
                    done(classify_error("resolve", str(exc)))
                return
            log.warning("sink %s: resolving %s failed (%s); using %s", self.sink.name,
                        self.target.host, exc, self.address[0])
            self.resolved_at = self.loop.time()
            self._dispatch()
            return
        self.address = infos[0][4][:2]
        self.resolved_at = self.loop.time()
        self._dispatch()

    def released(self, conn):
        """A connection finished its request and may be reused."""
        if self.closed:
            conn.close()
            return
        if self.queue:
            conn.request(*self.queue.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn):
        self.connections.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        self._dispatch()

    def close(self):
        self.closed = True
        for conn in list(self.connections):
            conn.close()


class HTTPConnection:
    """One non-blocking HTTP/1.1 client connection, one request at a time."""

    def __init__(self, transport):
        self.transport = transport
        self.loop = transport.loop
        self.sock = None
        self.fd = -1
        self.connected = False
        self.out = bytearray()
        self.done = None
        self.request_bytes = None
        self.parser = None
        self.response = None
        # The connect timeout, then one response timer for the connection's life,
        # re-armed by each request (cheaper than a timer per request).
        self.timer = None
        self.response_timer = None
        self.buf = bytearray()
        self.reading = False
        self.writing = False
        self.reused = False
        self.received = False

    def request(self, request, done):
        self.done = done
        self.request_bytes = request
        self.out += request
        self.response = None
        self.received = False
        if self.sock is None:
            self._connect()
            return
        self.reused = True
        self._arm_response_timer()
        self._flush()

    def _connect(self):
        address = self.transport.address
        # One parser for the connection's life: a response is taken only once it
        # ended with nothing after it (_complete), so the next starts clean.
        self.parser = _http.ResponseParser()
        try:
            self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
                                      socket.SOCK_STREAM)
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = self.sock.fileno()
            err = self.sock.connect_ex(address)
        except OSError as exc:
            self._fail("connect_refused", str(exc))
            return
        if err not in (0, errno.EINPROGRESS):
            self._fail("connect_refused", errno.errorcode.get(err, str(err)))
            return
        self.timer = self.loop.call_later(self.transport.connect_timeout, self._timeout,
                                          "connect_timeout")
        self.writing = True
        self.loop.add_writer(self.fd, self._on_connected)

    def _on_connected(self):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.loop.remove_writer(self.fd)
        self.writing = False
        if err:
            self._fail("connect_refused", errno.errorcode.get(err, str(err)))
            return
        self.connected = True
        self.timer.cancel()
        self._arm_response_timer()
        self.reading = True
        self.loop.add_reader(self.fd, self._on_readable)
        self._flush()

    def _arm_response_timer(self):
        if self.response_timer is None:
            self.response_timer = self.loop.call_later(self.transport.response_timeout,
                                                       self._timeout, "response_timeout")
        else:
            self.response_timer.reset(self.transport.response_timeout)

    def _flush(self):
        try:
            # server/_io keeps the GIL: a non-blocking send never waits.
            n = _io.send(self.fd, self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._fail("connection_reset", str(exc))
            return
        del self.out[:n]
        if self.out and not self.writing:
            self.writing = True
            self.loop.add_writer(self.fd, self._flush)
        elif not self.out and self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        if not self.reading:
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self):
        try:
            data = _io.recv(self.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail("connection_reset", str(exc))
            return
        if not data:
            self._eof()
            return
        if self.done is None:
            # Bytes nobody asked for on an idle connection: it cannot be trusted.
            self.close()
            return
        self.received = True
        # A response usually arrives whole: then it is parsed where recv put it.
        if self.buf:
            self.buf += data
            data = self.buf
        try:
            events, consumed = self.parser.feed(data, 0, len(data))
        except Exception as exc:
            self._fail("bad_response", str(exc))
            return
        if data is self.buf:
            del self.buf[:consumed]
        elif consumed < len(data):
            self.buf += data[consumed:]
        for event in events:
            if isinstance(event, _http.Response):
                if event.status >= 200:
                    self.response = event
            elif isinstance(event, _http.EndOfMessage) and self.response is not None:
                self._complete()
                return

    def _eof(self):
        if self.done is None:
            self.close()
            return
        if self.parser is not None and self.response is not None:
            try:
                end = self.parser.eof()
            except Exception as exc:
                self._fail("bad_response", str(exc))
                return
            if end is not None:
                self._complete(keep=False)
                return
        if self.reused and not self.received:
            # The server closed a kept-alive connection just as it was reused: send the
            # request again on a fresh one; this is not an attempt that failed.
            done, request = self.done, self.request_bytes
            self.done = None
            self.close()
            self.transport.queue.appendleft((request, done))
            self.transport._dispatch()
            return
        self._fail("connection_reset", "connection closed before the response ended")

    def _complete(self, keep=True):
        response = self.response
        done, self.done = self.done, None
        # The response timer is left armed: the next request re-arms it, and on an
        # idle connection it does nothing (_timeout).
        outcome = classify(response.status, response.headers, time.time(),
                           self.transport.sink.policy)
        if keep and response.keep_alive and not self.buf:
            self.transport.released(self)
        else:
            self.close()
        done(outcome, response.status)

    def _timeout(self, kind):
        if self.done is None:
            return
        seconds = self.transport.connect_timeout if kind == "connect_timeout" \
            else self.transport.response_timeout
        self._fail(kind, f"no answer within {seconds:g} s")

    def _fail(self, kind, detail):
        done, self.done = self.done, None
        self.close()
        if done is not None:
            done(classify_error(kind, detail))

    def close(self):
        if self.timer is not None:
            self.timer.cancel()
        if self.response_timer is not None:
            self.response_timer.cancel()
        if self.sock is not None:
            if self.reading:
                self.loop.remove_reader(self.fd)
            if self.writing:
                self.loop.remove_writer(self.fd)
            self.reading = self.writing = False
            self.sock.close()
            self.sock = None
        self.transport.lost(self)

