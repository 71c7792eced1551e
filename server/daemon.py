"""The pushcore daemon: listener, connections, group-commit writer, drain.

The central promise lives in ``before_sleep`` and ``_committed``: the pending
batch is handed to the writer thread, which commits it to LMDB with the
configured durability; only when the commit has returned does ``_committed``
put the acks in the connections' output and flush them.  No ack ever leaves
for a record that is not committed.  (Redis writes its AOF in beforeSleep
before replies go out; this is the same rule.)

With durability ``fsync`` group commit is pipelined: while one batch is
committing in the writer thread (LMDB releases the GIL during the commit and
fdatasync), the reactor goes on reading and parsing into the next batch.  With
``os`` the commit runs on the loop thread (see ``Writer`` for why).
"""

import collections
import itertools
import json
import logging
import queue
import resource
import secrets
import signal
import socket
import threading
import time

from pushcore.errors import QuotaExceeded, RetentionFull, StoreFull
from pushcore._ingest import RESEND_OF_REFUSED, Batch, Ingest, ack_committed, count_duplicates
from pushcore.broker import Broker, BrokerSettings
from pushcore.log import Log, StoreOps
from pushcore.mqtt import MQTT5, STATE_CLOSED, MQTTSettings, publish_will

from . import systemd
from .delivery import Engine
from .connection import PAUSE_DRAIN, PAUSE_GLOBAL, PAUSE_STORE, Connection, set_nodelay
from .loop import EventLoop

log = logging.getLogger("pushcore.server")

# How long a batch refused for a full store waits before it is tried again.
STORE_FULL_RETRY_S = 1.0
# Deletions per expire job on the loop thread (durability os): the store's default
# bound of 10,000 was measured at ~11 ms of stalled reactor.
INLINE_EXPIRE_MAX = 500
# Durability os: the least time between two commits on the loop thread, and the
# batch that commits at once regardless (see Server._inline_wait).
INLINE_COMMIT_GAP_S = 0.001
INLINE_COMMIT_BATCH = 256
# How long the listener is not watched after accept() failed (out of descriptors).
ACCEPT_BACKOFF_S = 0.1


class BufferPool:
    """Receive buffers lent to connections while they hold unparsed bytes."""

    __slots__ = ("size", "free", "max_free")

    def __init__(self, size, max_free=256):
        self.size = size
        self.free = []
        self.max_free = max_free

    def get(self):
        if self.free:
            return self.free.pop()
        buf = bytearray(self.size)
        return buf, memoryview(buf)

    def put(self, buf, view):
        # A buffer grown for one large packet is not kept: the pool holds one size.
        if len(buf) == self.size and len(self.free) < self.max_free:
            self.free.append((buf, view))


class Writer:
    """The group-commit writer thread: one LMDB write transaction per job.

    With ``inline`` (durability ``os``) there is no thread: an append commits on
    the loop thread and ``done`` runs at once, an expire's ``done`` runs in the
    next iteration.  Why: py-lmdb releases and retakes the GIL around every LMDB
    call (each put, each putmulti row, commit), so a writer thread and the loop
    hand the GIL back and forth dozens of times per batch; on 2 cores that turned
    rare slow commits into 5-15 ms stalls of every ack.  Without fdatasync a
    commit is ~40 us (p99 ~0.2 ms), nothing worth overlapping.  Measured with
    mqttload -c 16 -r 5000 -q 1 -w 32 (3 alternating runs, medians): ack p99
    6.2 ms -> 1.8 ms; saturating (-n 300000): 464k -> 565k msg/s.  In fsync mode
    the fdatasync is a long GIL-free wait that the thread overlaps with reading.
    """

    def __init__(self, store, loop, inline=False):
        self.store = store
        self.loop = loop
        self.inline = inline
        self.jobs = queue.SimpleQueue()
        self.thread = None
        if not inline:
            self.thread = threading.Thread(target=self._run, name="pushcore-writer", daemon=True)
            self.thread.start()

    def append(self, batch, ops, now_ms, done):
        if self.inline:
            done(batch, *self._call(self.store.append_batch, (batch.items, ops), now_ms))
            return
        self.jobs.put((self.store.append_batch, (batch.items, ops), now_ms, batch, done))

    def expire(self, now_ms, done):
        if self.inline:
            # Through call_soon: an expire that stopped at its bound queues the next
            # one from ``done``, and each must leave the loop an iteration between.
            self.loop.call_soon(done, None, *self._call(self._expire, None, now_ms))
            return
        self.jobs.put((self._expire, None, now_ms, None, done))

    def _expire(self, _args, now_ms):
        if self.inline:
            # On the loop thread a job is kept small: it runs between two polls.
            return self.store.expire(now_ms, INLINE_EXPIRE_MAX)
        return self.store.expire(now_ms)

    def stop(self):
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args, now_ms, batch, done = job
            self.loop.call_soon_threadsafe(done, batch, *self._call(fn, args, now_ms))

    @staticmethod
    def _call(fn, args, now_ms):
        """Run one job: (result, None), or (None, error) when it failed."""
        try:
            if args is None:
                return fn(None, now_ms), None
            items, ops = args
            return fn(items, now_ms, ops), None
        except StoreFull as err:
            return None, err
        except Exception as err:  # a bug or a disk error: the batch is not acked
            log.exception("writer: commit failed")
            return None, err


class Server:
    def __init__(self, cfg):
        self.cfg = cfg
        self.loop = EventLoop()
        st = cfg.storage
        self.store = Log(
            st.data_dir,
            partitions=st.partitions,
            map_size=st.map_size,
            durability=st.durability,
            dedup_window_ms=int(cfg.dedup.window * 1000),
            retention_max_age_ms=int(st.retention.max_age * 1000),
            retention_max_bytes=st.retention.max_bytes,
            retention_hard_max_bytes=st.retention.hard_max_bytes,
            retention_overflow=st.retention.overflow,
        )
        m = cfg.mqtt
        self.mqtt_settings = MQTTSettings(
            max_packet_size=m.max_packet_size,
            receive_maximum=m.receive_maximum,
            topic_alias_maximum=m.topic_alias_maximum,
            keepalive_max=m.keepalive_max,
            max_qos=m.max_qos,
            allow_zero_length_clientid=m.allow_zero_length_clientid,
            id_property=cfg.dedup.id_property,
            key_property=cfg.ordering.key_property,
            json_field=cfg.dedup.json_field,
        )
        self.ingest = Ingest(self.store.partitions, cfg.dedup.scope == "global")
        self.connect_timeout = m.connect_timeout
        self.outbuf_high = m.outbuf_high
        self.outbuf_low = m.outbuf_low
        self.max_connections = m.max_connections
        self.batch_max_messages = st.batch.max_messages
        self.batch_max_bytes = st.batch.max_bytes
        self.pool = BufferPool(m.buffer_size)
        self.metrics = collections.Counter()
        self.conns = {}
        self.clients = {}
        self.committing = None
        self.global_paused = False
        self.globally_paused = set()
        self.store_held = None
        self.store_full_until = 0.0
        self.last_inline_commit = 0.0
        # Whether publishes are refused at storage.retention.hard_max_bytes (rather
        # than for a full map): which warning says when refusing starts and stops.
        self.refusing_overflow = False
        self.draining = False
        self.expiring = False
        self.listener = None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self.writer = Writer(self.store, self.loop, inline=st.durability == "os")
        self.broker = Broker(
            BrokerSettings(
                max_qos=m.max_qos,
                max_inflight_out=m.max_inflight_out,
                max_queued_messages=cfg.sessions.max_queued_messages,
                max_queued_bytes=cfg.sessions.max_queued_bytes,
                queue_full=cfg.sessions.queue_full,
                queue_qos0=cfg.sessions.queue_qos0,
                max_expiry=cfg.sessions.max_expiry,
                subscribe_deny=m.subscribe_deny,
            ),
            self.metrics, self.loop.call_later, self._publish_will)
        self.broker.after_commit = self.after_commit
        self.broker.load(self.store, int(time.time() * 1000))
        # The delivery engine (routes to webhooks and Python callables), if configured.
        self.engine = Engine(self, cfg.sinks, cfg.routes) if cfg.sinks else None
        if self.engine is None:
            # No sink configured: none holds records back, whatever the store remembers.
            self.store.register_sinks(())
        for name in sorted(set(self.store.sinks()) - set(cfg.sinks)):
            log.warning("sink %s is in the store but not in the configuration: it no longer "
                        "holds records back; its cursors and dead letters stay (pushcore dlq "
                        "list --sink %s)", name, name)
        # What the batch being committed carries besides its records: the broker's
        # routes and store writes, and the callbacks waiting for the commit.
        self.committing_routes = {}
        self.committing_ops = None
        self.committing_callbacks = []
        self.callbacks = []
        self.loop.add_before_sleep(self.before_sleep)

    # -- listener -------------------------------------------------------------

    def listen(self):
        host, port = self.cfg.mqtt.bind
        family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as err:
            sock.close()
            raise OSError(err.errno, f"cannot listen on {_peer((host, port))} (mqtt.bind): "
                                     f"{err.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.loop.add_reader(sock.fileno(), self.on_accept)
        return sock.getsockname()

    def on_accept(self):
        for _ in range(64):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:
                # EMFILE and friends: the listener stays readable (level-triggered),
                # so stop watching it for a moment instead of spinning on accept.
                self.metrics["accept_errors"] += 1
                log.warning("accept failed: %s; not accepting for %.1f s", err, ACCEPT_BACKOFF_S)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(ACCEPT_BACKOFF_S, self._accept_again)
                return
            if len(self.conns) >= self.max_connections:
                self.metrics["connections_refused_limit"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            set_nodelay(sock)
            conn = Connection(self, sock, peer)
            self.conns[conn.fd] = conn
            conn.start()

    def _accept_again(self):
        if not self.draining:
            self.loop.add_reader(self.listener.fileno(), self.on_accept)

    # -- protocol callbacks ------------------------------------------------------

    def assign_client_id(self):
        return f"pushcore-{self._id_prefix}-{next(self._ids)}"

    def connected(self, proto):
        """A CONNECT was accepted: a second connection with the same id takes over."""
        old = self.clients.get(proto.client_id)
        self.clients[proto.client_id] = proto
        if old is not None and old is not proto:
            self.metrics["session_takeovers"] += 1
            old.taken_over()
            old.transport.close("session taken over")

    def connection_closed(self, conn, reason):
        self.conns.pop(conn.fd, None)
        self.globally_paused.discard(conn)
        proto = conn.proto
        if self.clients.get(proto.client_id) is proto:
            del self.clients[proto.client_id]
        self.broker.disconnected(proto, int(time.time() * 1000))
        if isinstance(reason, Exception):
            self.metrics[f"protocol_errors_0x{getattr(reason, 'reason_code', 0x80):02x}"] += 1
            log.info("closed %s (%s): %s [reason 0x%02x]", proto.client_id or "-", _peer(conn.peer),
                     reason, getattr(reason, "reason_code", 0x80))
        else:
            log.debug("closed %s (%s): %s", proto.client_id or "-", _peer(conn.peer), reason)

    def after_commit(self, fn, *args):
        """Call ``fn(*args)`` once everything handled so far is committed."""
        self.callbacks.append((fn, args))

    def _publish_will(self, client_id, will):
        publish_will(self.ingest, self.mqtt_settings, client_id, will)

    # -- group commit ------------------------------------------------------------

    def before_sleep(self):
        """Hand the pending batch to the writer; acks wait for ``_committed``."""
        ingest = self.ingest
        ingest.now_ms = int(time.time() * 1000)
        if self.broker.dirty:
            # Copies queued outside a commit (shared copies handed over when a member
            # left) go out now, not with whatever commit comes next.
            for proto in self.broker.flush_dirty():
                proto.transport.deliver()
        batch = ingest.batch
        if (len(batch) or self.store_held is not None or self._state_pending()) \
                and self.committing is None and self.loop.time() >= self.store_full_until:
            wait = self._inline_wait(batch)
            if wait > 0:
                self.loop.poll_within(wait)
            else:
                self._submit()
        elif (len(batch.items) >= self.batch_max_messages or batch.nbytes >= self.batch_max_bytes) \
                and not self.global_paused:
            # Global backpressure: the writer is behind; connections stop being read
            # (lazily, when each next becomes readable) until this batch is committed.
            self.global_paused = True
            self.metrics["global_pauses"] += 1
        if self.refusing_overflow and self.committing is None and self._state_pending():
            # Refusing records at the hard limit: the cursors and session state owed go on
            # committing at once (the sinks moving on is what makes room), the records
            # wait for the retry.
            self._submit(records=False)

    def _inline_wait(self, batch):
        """How long a commit on the loop thread (durability os) is put off, or 0.

        The loop commits at the end of an iteration; one woken many times a
        millisecond (a webhook response per delivery) would commit a record or
        two each time, and those commits, not the work, would take the loop.
        So a small batch waits until INLINE_COMMIT_GAP_S after the last commit;
        the poll returns by then, and the acks are at most that much later.
        """
        if not self.writer.inline or self.draining or len(batch) >= INLINE_COMMIT_BATCH:
            return 0.0
        return self.last_inline_commit + INLINE_COMMIT_GAP_S - time.monotonic()

    def _state_pending(self):
        """Store writes owed besides records: broker state, cursors, callbacks."""
        return bool(self.broker.ops or self.callbacks or
                    (self.engine is not None and self.engine.pending()))

    def _submit(self, records=True):
        """Hand the writer a batch: the held and pending records (none when not
        ``records``), with the store writes and callbacks owed."""
        if not records:
            batch = Batch()
        elif self.store_held is not None:
            held, self.store_held = self.store_held, None
            batch = Batch()
            for proto, packet_id, qos, index in held.waiters:
                # A held message is unacked: once its publisher is gone, it is the
                # publisher's to resend, not ours to store.
                if proto.state == STATE_CLOSED:
                    self.metrics["held_dropped_publisher_gone"] += 1
                elif index < 0:
                    batch.add_ack_only(proto, packet_id, qos)
                else:
                    batch.add(*held.items[index], proto, packet_id, qos)
            batch.extend(self.ingest.take())
        else:
            batch = self.ingest.take()
        now_ms = self.ingest.now_ms
        # Routing before the commit: a persistent subscriber's copy is written in the
        # same transaction as the message (pushcore/broker.py).
        try:
            routes = self.broker.route(batch, now_ms)
        except Exception:
            # A bug in routing must not stop the commits (and with them every ack):
            # this batch is stored and acked, its deliveries are lost and counted.
            log.exception("routing a batch of %d messages failed", len(batch.items))
            self.metrics["internal_errors"] += 1
            self.metrics["deliveries_lost_routing_error"] += len(batch.items)
            self.broker.abort_route()
            routes = {}
        self.committing = batch
        self.last_inline_commit = time.monotonic()
        self.committing_routes = routes
        ops = self.committing_ops = self.broker.take_ops()
        if self.engine is not None:
            ops.writes.extend(self.engine.take_writes())
        self.committing_callbacks, self.callbacks = self.callbacks, []
        self.writer.append(batch, ops if ops else None, now_ms, self._committed)

    def _committed(self, batch, results, error):
        """The writer finished a batch: ack it (or refuse it), then go on."""
        self.committing = None
        routes, self.committing_routes = self.committing_routes, {}
        ops, self.committing_ops = self.committing_ops, None
        callbacks, self.committing_callbacks = self.committing_callbacks, []
        if error is None:
            self._ack(batch, results)
            try:
                self._after_commit(routes, results, callbacks)
            except Exception:
                # A bug after the acks: logged and counted; the commits go on.
                log.exception("after a commit of %d messages", len(results))
                self.metrics["internal_errors"] += 1
        elif isinstance(error, RetentionFull):
            # Only the records were refused: the batch's other writes (cursors, session
            # state) were committed, so the replies waiting for them go out now rather
            # than after the refusing ends (a PINGRESP among them).
            self.broker.refused(routes, StoreOps(), True)
            self._refuse(batch, error)
            try:
                self._after_commit({}, [], callbacks)
            except Exception:
                log.exception("after a commit of refused records")
                self.metrics["internal_errors"] += 1
        else:
            self.broker.refused(routes, ops or StoreOps(), isinstance(error, StoreFull))
            self.callbacks[:0] = callbacks
            self._refuse(batch, error)
        if self.global_paused:
            self.global_paused = False
            paused, self.globally_paused = self.globally_paused, set()
            for conn in paused:
                conn.resume(PAUSE_GLOBAL)
        if (len(self.ingest.batch) or self._state_pending()) \
                and self.loop.time() >= self.store_full_until:
            self._submit()
        elif self.draining and self.store_held is not None:
            # Draining with a full store: the held 3.1.1 messages were never acked;
            # their publishers resend them after the restart.
            self.store_held = None
            self._finish_drain()
        elif self.draining and not len(self.ingest.batch) and not self._state_pending():
            self._finish_drain()

    def _ack(self, batch, results):
        dups = count_duplicates(results)
        self.metrics["messages_stored"] += len(results) - dups
        self.metrics["messages_duplicate"] += dups
        # Each waiter's proto.committed(packet_id, qos), in order, in one C call: this
        # runs only here, after the writer returned from the commit.
        for proto in ack_committed(batch.waiters):
            proto.transport.acks_ready()
        if self.store_full_until and batch.items:
            self.store_full_until = 0.0
            if self.refusing_overflow:
                self.refusing_overflow = False
                log.warning("storage.retention.hard_max_bytes: the sinks made room; accepting "
                            "publishes again")
            else:
                log.warning("store has room again: accepting publishes")
            for conn in list(self.conns.values()):
                if conn.paused & PAUSE_STORE:
                    conn.resume(PAUSE_STORE)

    def _after_commit(self, routes, results, callbacks):
        """Deliveries, SUBACKs and cursors that waited for this commit."""
        self.broker.committed(routes, results, self.ingest.now_ms)
        for fn, args in callbacks:
            fn(*args)
        for proto in self.broker.flush_dirty():
            proto.transport.deliver()
        if self.engine is not None and results:
            self.engine.committed({r[0] for r in results if not r[2]})

    def _refuse(self, batch, error):
        m = self.metrics
        if not isinstance(error, StoreFull):
            # Not a full store: an unexpected failure.  Nothing is acked; close the
            # publishers so they resend (their messages are not in the log).
            m["commit_errors"] += 1
            for proto, _pid, _qos, _index in batch.waiters:
                proto.transport.close(f"commit failed: {error}")
            return
        overflow = isinstance(error, RetentionFull)
        if overflow and not self.refusing_overflow:
            log.warning("%s: refusing publishes until the sinks catch up (MQTT 5: PUBACK 0x97; "
                        "MQTT 3.1.1: publishers paused)", error)
        elif not overflow and (not self.store_full_until or self.refusing_overflow):
            log.error("store full (storage.map_size %d bytes): refusing publishes until retention "
                      "frees space (MQTT 5: PUBACK 0x97; MQTT 3.1.1: publishers paused)",
                      self.cfg.storage.map_size)
        self.refusing_overflow = overflow
        # While refusing, each retry makes room first (Log.append_batch trims what the
        # sinks have passed since): about once a second.
        self.store_full_until = self.loop.time() + STORE_FULL_RETRY_S
        self.loop.call_later(STORE_FULL_RETRY_S, self._retry_store)
        cause = "overflow" if overflow else "store_full"
        refused_key, holds_key = f"messages_refused_{cause}", f"{cause}_holds"
        held = Batch()
        quota = QuotaExceeded(str(error))
        dirty = set()
        items = batch.items
        waited = 0
        for proto, packet_id, qos, index in batch.waiters:
            if index >= 0:
                waited += 1
            if proto.version == MQTT5:
                if index >= 0:
                    m[refused_key] += 1
                proto.refused(packet_id, qos, quota)
                dirty.add(proto)
            elif index >= 0:
                m[holds_key] += 1
                held.add(*items[index], proto, packet_id, qos)
                proto.transport.pause(PAUSE_STORE)
            else:
                held.add_ack_only(proto, packet_id, qos)
        m[f"messages_dropped_{cause}_qos0"] += len(items) - waited
        self._refuse_resends(batch)
        if len(held):
            self.store_held = held
        for proto in dirty:
            proto.transport.acks_ready()
        self._start_expire()

    def _refuse_resends(self, refused):
        """Mark, in the pending batch, re-sent copies of QoS 2 originals just refused.

        A QoS 2 PUBLISH re-sent before PUBREL waits in the next batch as an ack
        owed (index -1).  Batches commit one at a time, so when a batch is
        refused the only later one is the pending batch; its copies of refused
        v5 originals must be refused too, not acked as stored.
        """
        originals = {(proto, packet_id) for proto, packet_id, qos, index in refused.waiters
                     if qos == 2 and index >= 0 and proto.version == MQTT5}
        if not originals:
            return
        waiters = self.ingest.batch.waiters
        for i, (proto, packet_id, qos, index) in enumerate(waiters):
            if index == -1 and (proto, packet_id) in originals:
                waiters[i] = (proto, packet_id, qos, RESEND_OF_REFUSED)

    def _retry_store(self):
        if self.committing is None and (self.store_held is not None or len(self.ingest.batch)
                                        or self._state_pending()):
            self._submit()

    def _start_expire(self):
        """Start a chain of expire jobs, unless one is running."""
        if not self.expiring and not self.draining:
            self.expiring = True
            self.writer.expire(int(time.time() * 1000), self._expired)

    def _expired(self, _batch, result, error):
        if error is not None:
            self.expiring = False
            log.error("retention/expiry failed: %s", error)
            return
        if result["records_trimmed"] or result["ids_expired"]:
            log.info("expiry: %s", result)
        if result["records_trimmed_undelivered"]:
            self.metrics["records_trimmed_undelivered"] += result["records_trimmed_undelivered"]
            log.warning("retention.hard_max_bytes: %d records removed before every sink had "
                        "delivered them", result["records_trimmed_undelivered"])
        if result["more"] and not self.draining:
            # Each expire job is bounded so it never stalls ingest for long; when it
            # stopped at its bound, the next one is queued behind the batches already
            # waiting rather than a whole check_interval later.
            self.writer.expire(int(time.time() * 1000), self._expired)
        else:
            self.expiring = False

    def _expire_tick(self):
        self._start_expire()
        self.loop.call_later(self.cfg.storage.retention.check_interval, self._expire_tick)

    # -- run and drain --------------------------------------------------------------

    def run(self):
        # Each connection is a file descriptor: take the hard limit, as mosquitto's
        # packaging and most servers do, so max_connections is not capped at 1024.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # Handlers before the socket is bound: a SIGTERM that arrives as soon as
        # clients can connect must drain, not kill.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        addr = self.listen()
        log.info("pushcore listening on mqtt %s, data %s (%d partitions, durability %s)",
                 _peer(addr), self.cfg.storage.data_dir, self.store.partitions,
                 self.cfg.storage.durability)
        self.loop.call_later(self.cfg.storage.retention.check_interval, self._expire_tick)
        if self.engine is not None:
            self.engine.start()
            log.info("delivery: %d sinks, %d routes", len(self.engine.sinks),
                     len(self.cfg.routes))
        systemd.notify(f"READY=1\nSTATUS=listening on {_peer(addr)}")
        try:
            self.loop.run()
        finally:
            if self.engine is not None:
                self.engine.stop()
            self.writer.stop()
            self.store.close()
            self.loop.close()
        log.info("pushcore stopped: metrics %s", self.metrics_json())

    def _on_signal(self, signum, _frame):
        self.loop.call_soon_threadsafe(self.drain, signal.Signals(signum).name)

    def _on_usr1(self, _signum, _frame):
        self.loop.call_soon_threadsafe(self._log_metrics)

    def _log_metrics(self):
        log.info("metrics %s", self.metrics_json())

    def metrics_json(self):
        counters = dict(sorted(self.metrics.items()))
        counters["connections"] = len(self.conns)
        return json.dumps(counters)

    def drain(self, why="drain"):
        """Stop accepting, stop reading, commit what is pending, ack it, close."""
        if self.draining:
            return
        self.draining = True
        log.info("%s: draining %d connections", why, len(self.conns))
        systemd.notify("STOPPING=1")
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
        for conn in list(self.conns.values()):
            conn.pause(PAUSE_DRAIN)
        self.broker.stop_will_timers()
        if self.engine is not None:
            # No new deliveries; the cursors of those done are committed below, those
            # still in flight are delivered again after the restart (at least once).
            self.engine.stop()
        if self.committing is None and not len(self.ingest.batch) and not self._state_pending():
            self._finish_drain()
        elif self.committing is None:
            self._submit()

    def _finish_drain(self):
        for conn in list(self.conns.values()):
            # Nothing is committed after this point, so no Will could be stored; the
            # clients see DISCONNECT 0x8B (3.1.1: a close) and reconnect to the next run.
            conn.proto.discard_will()
            conn.proto.shutdown()
            conn.close("server shutting down")
        self.loop.stop()


def _peer(addr):
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)

