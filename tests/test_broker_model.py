"""Model-based test of the sans-IO broker (pushcore/broker.py).

A hypothesis state machine drives ``Broker`` the way server/daemon.py and
pushcore/mqtt.py do, without sockets or the daemon: fake connections carrying
the attributes the broker reads, a fake timer queue the test fires, and a real
``Log`` in a temporary directory that commits the broker's store writes with
each batch, so a restart is a new Broker loading the same store (after a
SIGTERM-like drain, or after a crash that loses what was not committed).

A small reference model of sessions and subscriptions (its own topic matcher)
says which client is owed which message; the checks are:

- every session's byte count equals the records it holds, and no copy is
  routed-but-uncommitted between steps;
- no packet id is in flight twice, in the broker or as the client sees it, and
  a connected session has at most its window in flight (MQTT 5.0 §3.3.4
  [MQTT-3.3.4-9]; the configured window for 3.1.1);
- the store, plus the writes the broker has not committed yet, holds exactly
  the persistent sessions, their subscriptions and their queued copies;
- a committed QoS 1/2 message whose topic matched a non-shared subscription
  reaches that client unless its session ended (the end of each example
  reconnects everyone and drains);
- per client, one publisher's messages on one topic first arrive in publish
  order; a message with a duplicate id reaches no one;
- a re-delivery carries DUP (unless a crash lost the record of the first
  send); a QoS 2 message keeps its packet id and never comes again after its
  PUBREL (MQTT 5.0 §4.3.3, §4.4); Session Present is what the model expects.

The tests after the machine replay counterexamples it found.
"""

import copy
import json
import shutil
import tempfile
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pushcore import _frame
from pushcore._frame import Connack, Parser, Suback, Unsuback, encode, encode_ack
from pushcore._ingest import STATE_CLOSED, STATE_CONNECTED, Ingest
from pushcore.broker import EXPIRY_NEVER, HELD, RELEASED, SENT, Broker, BrokerSettings
from pushcore.log import (
    OP_DELETE,
    OP_DELETE_PREFIX,
    OP_PUT,
    Log,
    decode_queue_value,
    queue_key,
    queue_prefix,
)
from pushcore.record import decode_record

MiB = 1 << 20
START_MS = 1_700_000_000_000
CLIENTS = ("c0", "c1")
PUBLISHERS = ("p0", "p1")
TOPICS = ("a/b", "a/c", "b/b", "$sys/x")
# The shared group takes one topic, so the checks that a shared copy would blur
# (order, DUP, QoS 2 packet ids: a copy handed on is a new delivery) skip only it.
SHARED_TOPIC = "a/c"
SHARED = "$share/g/" + SHARED_TOPIC
FILTERS = ("a/b", "a/+", "+/b", "#", "+/+", "$sys/#", SHARED)
# Most publishes carry no message id; a few share one of two (duplicates).
MSG_IDS = (None, None, None, None, None, "m1", "m2")
# The 3.1.1 window (mqtt.max_inflight_out); MQTT 5 clients state theirs.
WINDOW_V3 = 3
RECEIVE_MAXIMUMS = (1, 2, 5)
SESSION_EXPIRY = 300
# A clock step: within one loop iteration, a few ms, or past the session expiry.
STEPS_MS = (0, 1, 37, (SESSION_EXPIRY + 1) * 1000)
DRAIN_ROUNDS = 200


def ref_matches(topic_filter, topic):
    """MQTT 5.0 §4.7, written plainly: the reference the broker's trie is held to."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        # §4.7.2: a first-level wildcard does not match a topic starting with '$'.
        return False
    levels = topic.split("/")
    for i, level in enumerate(topic_filter.split("/")):
        if level == "#":
            return True
        if i >= len(levels) or (level != "+" and level != levels[i]):
            return False
    return len(topic_filter.split("/")) == len(levels)


class FakeTimer:
    __slots__ = ("due_ms", "order", "fn", "args", "cancelled")

    def __init__(self, due_ms, order, fn, args):
        self.due_ms = due_ms
        self.order = order
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeTimers:
    """The server's ``call_later``, fired by the test when its clock moves."""

    def __init__(self, clock):
        self.clock = clock
        self.timers = []
        self.order = 0

    def schedule(self, delay_s, fn, *args):
        self.order += 1
        timer = FakeTimer(self.clock.now_ms + delay_s * 1000, self.order, fn, args)
        self.timers.append(timer)
        return timer

    def fire_due(self):
        while True:
            due = [t for t in self.timers if not t.cancelled and t.due_ms <= self.clock.now_ms]
            if not due:
                return
            timer = min(due, key=lambda t: (t.due_ms, t.order))
            self.timers.remove(timer)
            timer.fn(*timer.args)


class FakeConn:
    """What the broker reads of a pushcore.mqtt connection, plus the client's side."""

    def __init__(self, client_id, version, receive_maximum, alias_maximum, ingest,
                 expect_present):
        self.client_id = client_id
        self.version = version
        self.out = bytearray()
        self.state = STATE_CONNECTED
        self.close_after_flush = False
        self.receive_maximum_out = receive_maximum
        self.topic_alias_maximum_out = alias_maximum
        self.aliases_out = {}
        self.max_packet_out = 268435460
        self.outbuf_high = MiB
        self.ingest = ingest
        self.session = None
        # The client: its parser, the acks it owes in order, the packet ids it
        # holds (received, not yet PUBACK/PUBCOMP'd), its topic aliases.
        self.parser = Parser(version=version)
        self.acks_owed = []
        self.holding = set()
        self.aliases_in = {}
        self.expect_present = expect_present


class ModelSession:
    """The reference model's view of one session."""

    def __init__(self, version, expiry, epoch):
        # Which session of this client id it is (a new one after each end).
        self.epoch = epoch
        self.version = version
        self.expiry = expiry
        self.subs = {}
        self.connected = True
        self.disconnected_ms = 0
        # The stored row says "connected" (disconnected_ms 0) although it is not:
        # it was connected when the server stopped, and has not been saved since.
        self.stored_connected = False
        # Payloads of committed QoS 1/2 messages it must still deliver.
        self.owed = set()


class BrokerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pushcore-broker-model-")
        self.now_ms = START_MS
        self.ingest = Ingest(2, True)
        self.ingest.now_ms = self.now_ms
        self.metrics = Counter()
        self.wills = []
        self.log = self._open_log()
        self.broker = self._new_broker()
        self.conns = {}
        self.model = {}
        # The model as of the last commit: what a crash goes back to.
        self.snapshot = {}
        self.callbacks = []
        # (publisher, seq, topic, qos, msg_id, payload) waiting for the next commit.
        self.pending = []
        self.next_seq = Counter()
        self.seen_ids = set()
        # payload -> (publisher, seq, topic, qos) of every stored message.
        self.stored = {}
        self.duplicate_payloads = set()
        self.received = {c: set() for c in CLIENTS}
        # client -> payload -> crash count when it was last sent to that client
        # (received, or lost with the connection's unread output).
        self.sent = {c: {} for c in CLIENTS}
        self.crashes = 0
        # client -> payload -> packet id of its QoS 2 PUBLISH, and the reverse (what the
        # client keeps of a QoS 2 flow across connections); payloads whose PUBREL came.
        self.qos2_ids = {c: {} for c in CLIENTS}
        self.qos2_by_id = {c: {} for c in CLIENTS}
        self.released = {c: set() for c in CLIENTS}
        # client -> (publisher, topic) -> seq of the last first arrival.
        self.last_first = {c: {} for c in CLIENTS}
        self.ever_shared = set()
        self.epochs = 0
        # payload -> clients whose non-shared subscriptions it matched when committed.
        self.targets = {}
        # payload of a committed QoS 1/2 shared copy -> (client, session epoch) holding it.
        self.shared_held = {}

    # -- plumbing --------------------------------------------------------------

    def _open_log(self):
        return Log(self.dir, partitions=2, map_size=16 * MiB, durability="os",
                   now_ms=self.now_ms)

    def _new_broker(self):
        self.timers = FakeTimers(self)
        settings_ = BrokerSettings(max_qos=2, max_inflight_out=WINDOW_V3, max_queued_messages=0,
                                   max_queued_bytes=0, queue_full="refuse", queue_qos0=False,
                                   max_expiry=0, subscribe_deny=())
        broker = Broker(settings_, self.metrics, self.timers.schedule,
                        lambda client_id, will: self.wills.append((client_id, will)))
        broker.after_commit = self._after_commit
        return broker

    def _after_commit(self, fn, *args):
        """Server.after_commit: ``fn(*args)`` once what is handled so far is committed."""
        self.callbacks.append((fn, args))

    def _commit(self):
        """server/daemon.py _submit + _committed, with the commit done at once."""
        broker = self.broker
        batch = self.ingest.take()
        pending, self.pending = self.pending, []
        callbacks, self.callbacks = self.callbacks, []
        routes = broker.route(batch, self.now_ms)
        ops = broker.take_ops()
        results = self.log.append_batch(batch.items, self.now_ms, ops if ops else None)
        assert len(results) == len(pending)
        members = [c for c, m in self.model.items() if SHARED in m.subs]
        for index, ((publisher, seq, topic, qos, msg_id, payload), result) in \
                enumerate(zip(pending, results)):
            shared = [(session, d) for session, d in routes.get(index, ()) if d.share is not None]
            if topic == SHARED_TOPIC:
                # MQTT 5.0 §4.8.2: one member gets it; a connected one if there is one.
                connected = any(self.model[c].connected for c in members)
                assert len(shared) == 1 if connected else len(shared) <= 1, payload
            else:
                assert not shared
            duplicate = msg_id is not None and msg_id in self.seen_ids
            assert result[2] == duplicate, (payload, msg_id, result)
            if duplicate:
                self.duplicate_payloads.add(payload)
                continue
            if msg_id is not None:
                self.seen_ids.add(msg_id)
            self.stored[payload] = (publisher, seq, topic, qos)
            self.targets[payload] = set()
            for session, d in shared:
                assert session.client_id in members and d.qos <= qos
                if d.qos:
                    self.shared_held[payload] = (session.client_id,
                                                 self.model[session.client_id].epoch, d.qos)
            for client, m in self.model.items():
                matched = [sub_qos for topic_filter, sub_qos in m.subs.items()
                           if topic_filter != SHARED and ref_matches(topic_filter, topic)]
                if matched:
                    self.targets[payload].add(client)
                if qos and max(matched, default=0):
                    m.owed.add(payload)
        broker.committed(routes, results, self.now_ms)
        for fn, args in callbacks:
            fn(*args)
        for conn in broker.flush_dirty():
            self._deliver(conn)
        self.snapshot = copy.deepcopy(self.model)

    def _deliver(self, conn):
        """Connection.deliver; the output buffer (1 MiB) never fills here."""
        assert not self.broker.pump(conn.session)

    def _subscribe_done(self, conn, reply, wanted, mark):
        """MQTTServerConnection._after_commit: SUBACK/UNSUBACK, retained messages."""
        if conn.state != STATE_CLOSED:
            conn.out += reply
        if wanted and (conn.state != STATE_CLOSED or conn.session.persistent):
            self.broker.send_retained(conn.session, wanted, self.now_ms, mark)

    def _close(self, client, conn):
        """The socket closes; what the client had not read is lost."""
        packets, _, _ = conn.parser.parse(conn.out, 0, len(conn.out))
        for p in packets:
            if p.type == _frame.PUBLISH:
                # Still an attempt to send it (the DUP flag is about attempts).
                self.sent[client][p.payload] = self.crashes
        conn.out.clear()
        conn.state = STATE_CLOSED

    def _drop(self, client):
        """The connection ends: Connection.close -> server.connection_closed."""
        conn = self.conns.pop(client)
        self._close(client, conn)
        self.broker.disconnected(conn, self.now_ms)
        m = self.model[client]
        if m.expiry == 0:
            del self.model[client]
        else:
            m.connected = False
            m.disconnected_ms = self.now_ms

    def _connect(self, client, clean_start, expiry, version, receive_maximum, alias_maximum):
        if client in self.conns:
            # server.connected: the new connection takes the session over.
            self._drop(client)
        m = self.model.get(client)
        present = m is not None and not clean_start
        conn = FakeConn(client, version, receive_maximum if version == 5 else 65535,
                        alias_maximum if version == 5 else 0, self.ingest, present)
        granted = self.broker.session_expiry_for(version, clean_start,
                                                 expiry if version == 5 else 0)
        if version == 4:
            # MQTT 3.1.1 §3.1.2.4: CleanSession 0 keeps the session until the next 1.
            assert granted == (0 if clean_start else EXPIRY_NEVER)
        else:
            assert granted == expiry
        assert self.broker.connect(conn, clean_start, granted, self.now_ms) == present
        if present:
            m.version = version
            m.expiry = granted
            m.connected = True
            m.disconnected_ms = 0
            m.stored_connected = False
        else:
            self.epochs += 1
            self.model[client] = ModelSession(version, granted, self.epochs)
        self.conns[client] = conn
        conn.out += encode(Connack(present, 0, None), version)
        self.broker.resume(conn.session)

    def _client_reads(self, client, limit=None):
        """The client reads what the server sent, then sends up to ``limit`` acks."""
        conn = self.conns[client]
        packets, consumed, error = conn.parser.parse(conn.out, 0, len(conn.out))
        assert error is None and consumed == len(conn.out)
        conn.out.clear()
        for p in packets:
            if isinstance(p, Connack):
                # MQTT 5.0 §3.2.2.1.1: Session Present.
                assert p.session_present == conn.expect_present, client
            elif p.type == _frame.PUBLISH:
                self._arrived(client, conn, p)
            elif p.type == _frame.PUBREL:
                if p.packet_id in conn.holding:
                    # MQTT 5.0 §3.6.2.1: 0x92 is "Packet Identifier not found"; the server
                    # sent this PUBLISH and got its PUBREC, so it knows the id.
                    assert p.reason_code == 0, \
                        f"{client}: PUBREL {p.packet_id} with reason 0x{p.reason_code:02x}"
                payload = self.qos2_by_id[client].get(p.packet_id)
                if payload is not None:
                    # MQTT 5.0 §4.3.3: the PUBREL ends the server's part; the message
                    # must never come again as a PUBLISH (it is delivered, exactly once).
                    self.released[client].add(payload)
                conn.acks_owed.append((_frame.PUBCOMP, p.packet_id))
        owed = conn.acks_owed
        n = len(owed) if limit is None else min(limit, len(owed))
        sending, conn.acks_owed = owed[:n], owed[n:]
        session = conn.session
        for kind, packet_id in sending:
            if kind == _frame.PUBREC:
                # MQTTServerConnection.handle_pubrec and _send_pubrel.
                def send_pubrel(conn=conn, packet_id=packet_id):
                    if conn.state != STATE_CLOSED:
                        conn.out += encode_ack(_frame.PUBREL, packet_id, 0, conn.version)

                if not self.broker.pubrec(session, packet_id, send_pubrel):
                    conn.out += encode_ack(_frame.PUBREL, packet_id,
                                           0x92 if conn.version == 5 else 0, conn.version)
            else:
                self.broker.puback(session, packet_id)
                conn.holding.discard(packet_id)
        if session.queue:
            self._deliver(conn)

    def _arrived(self, client, conn, p):
        topic = p.topic
        if p.properties and "topic_alias" in p.properties:
            alias = p.properties["topic_alias"]
            assert 1 <= alias <= conn.topic_alias_maximum_out
            if topic:
                conn.aliases_in[alias] = topic
            else:
                topic = conn.aliases_in[alias]
        payload = p.payload
        assert payload not in self.duplicate_payloads, \
            f"{client} got {payload!r}, a publish whose message id was a duplicate"
        assert payload in self.stored, f"{client} got {payload!r}, which was never stored"
        publisher, seq, published_topic, qos = self.stored[payload]
        assert topic == published_topic
        # Only to a client whose subscription matched it when it was committed, or to a
        # member of the shared group (a copy handed over goes to whoever is a member then).
        assert client in self.targets[payload] or (
            client in self.ever_shared and topic == SHARED_TOPIC), \
            f"{client} got {payload!r} on {topic}, which none of its subscriptions matched"
        assert p.qos <= qos and not p.retain
        before = self.sent[client].get(payload)
        # MQTT 3.1.1 §3.3.1.1 [MQTT-3.3.1-1, -2]: DUP is set on every re-delivery, and
        # never on QoS 0.  (DUP on a first delivery is allowed: "might be" a re-delivery.)
        assert p.qos or not p.dup
        via_share = topic == SHARED_TOPIC and client in self.ever_shared
        if not p.dup and not via_share:
            # A crash may lose the record that a copy went out (it is written lazily);
            # a shared copy handed back to a member is a new delivery.
            assert before is None or before < self.crashes, \
                f"{client}: {payload!r} sent again without DUP"
        self.sent[client][payload] = self.crashes
        if p.qos == 2 and not via_share:
            # MQTT 5.0 §4.3.3, §4.4: a QoS 2 message goes out under one packet id, through
            # reconnects and restarts, and never again once PUBREL was sent.
            assert payload not in self.released[client], \
                f"{client}: {payload!r} sent again after its PUBREL"
            first_id = self.qos2_ids[client].setdefault(payload, p.packet_id)
            assert p.packet_id == first_id, \
                f"{client}: {payload!r} sent with packet id {p.packet_id}, earlier {first_id}"
        if p.qos == 2:
            self.qos2_by_id[client][p.packet_id] = payload
        if p.qos:
            assert p.packet_id not in conn.holding, \
                f"{client} got packet id {p.packet_id} while it still held it"
            conn.holding.add(p.packet_id)
            conn.acks_owed.append((_frame.PUBACK if p.qos == 1 else _frame.PUBREC, p.packet_id))
        if payload in self.received[client]:
            return
        self.received[client].add(payload)
        m = self.model.get(client)
        if m is not None:
            m.owed.discard(payload)
        if via_share:
            return
        last = self.last_first[client].get((publisher, topic), -1)
        assert seq > last, \
            f"{client}: {payload!r} (#{seq} of {publisher} on {topic}) arrived after #{last}"
        self.last_first[client][(publisher, topic)] = seq

    def _store_view(self):
        """The stored sessions and queue entries, with the broker's pending writes applied."""
        sessions, orphans = self.log.load_sessions()
        rows = {client.encode(): state for client, state, _ in sessions}
        entries = {queue_key(queue_prefix(client), seq): value
                   for client, _, items in sessions for seq, value in items}
        writes = self.broker.ops.writes
        for prefix in orphans:
            # Left by a session whose end was not committed: the loaded broker deletes them.
            assert (OP_DELETE_PREFIX, b"queue", prefix, None) in writes, prefix
        for kind, db, key, value in writes:
            if db == b"session":
                if kind == OP_PUT:
                    rows[key] = json.loads(value)
                else:
                    rows.pop(key, None)
            elif kind == OP_PUT:
                entries[key] = value
            elif kind == OP_DELETE:
                entries.pop(key, None)
            else:
                doomed = sorted(k for k in entries if k.startswith(key))
                for k in doomed[:value]:
                    del entries[k]
        return rows, entries

    def _restart(self, crash):
        if not crash:
            # SIGTERM: the drain commits until nothing is pending, then closes.
            for _ in range(DRAIN_ROUNDS):
                self._commit()
                if not (self.broker.ops or self.callbacks):
                    break
        for client, conn in self.conns.items():
            self._close(client, conn)
        self.conns = {}
        if crash:
            # SIGKILL: the pending batch (never acked) and uncommitted writes are lost.
            self.crashes += 1
            self.ingest.take()
            self.pending = []
            self.callbacks = []
            self.model = copy.deepcopy(self.snapshot)
        self.log.close()
        self.log = self._open_log()
        self.broker = self._new_broker()
        self.broker.load(self.log, self.now_ms)
        model = {}
        for client, m in self.model.items():
            if m.expiry == 0:
                continue
            if m.connected or m.stored_connected:
                # Stored as connected: it went offline when the server stopped.
                m.connected = False
                m.stored_connected = True
                m.disconnected_ms = self.now_ms
            m.owed -= self.received[client]
            model[client] = m
        self.model = model

    # -- rules -----------------------------------------------------------------

    @initialize(starts=st.lists(st.tuples(st.sampled_from([0, SESSION_EXPIRY]),
                                          st.sampled_from([4, 5]), st.sampled_from(FILTERS),
                                          st.integers(0, 2)),
                                min_size=len(CLIENTS), max_size=len(CLIENTS)))
    def subscribers(self, starts):
        """Every client starts connected with one subscription (the rules vary it all)."""
        for client, (expiry, version, topic_filter, qos) in zip(CLIENTS, starts):
            self._connect(client, expiry == 0, expiry, version, 2, 0)
            self._subscribe(client, topic_filter, qos)
        self._commit()

    @rule(client=st.sampled_from(CLIENTS), clean_start=st.booleans(),
          expiry=st.sampled_from([0, SESSION_EXPIRY]), version=st.sampled_from([4, 5]),
          receive_maximum=st.sampled_from(RECEIVE_MAXIMUMS), alias_maximum=st.sampled_from([0, 2]))
    def connect(self, client, clean_start, expiry, version, receive_maximum, alias_maximum):
        self._connect(client, clean_start, expiry, version, receive_maximum, alias_maximum)

    def _connected(self, data):
        return data.draw(st.sampled_from(sorted(self.conns)), label="client")

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def disconnect(self, data):
        self._drop(self._connected(data))

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), topic_filter=st.sampled_from(FILTERS), qos=st.integers(0, 2))
    def subscribe(self, data, topic_filter, qos):
        self._subscribe(self._connected(data), topic_filter, qos)

    def _subscribe(self, client, topic_filter, qos):
        conn = self.conns[client]
        session = conn.session
        mark = session.enqueued
        codes, wanted = self.broker.subscribe(session, [(topic_filter, qos)], 0)
        assert codes == [qos]
        self.model[client].subs[topic_filter] = qos
        if topic_filter == SHARED:
            self.ever_shared.add(client)
        suback = encode(Suback(1, codes, None), conn.version)
        # MQTTServerConnection.handle_subscribe: a stored subscription is acked once
        # committed; retained messages follow the commit either way.
        if session.persistent:
            self._after_commit(self._subscribe_done, conn, suback, wanted, mark)
        else:
            conn.out += suback
            if wanted:
                self._after_commit(self._subscribe_done, conn, b"", wanted, mark)

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), topic_filter=st.sampled_from(FILTERS))
    def unsubscribe(self, data, topic_filter):
        client = self._connected(data)
        conn = self.conns[client]
        subs = self.model[client].subs
        expected = 0x00 if topic_filter in subs else 0x11
        assert self.broker.unsubscribe(conn.session, [topic_filter]) == [expected]
        subs.pop(topic_filter, None)
        unsuback = encode(Unsuback(1, [expected] if conn.version == 5 else [], None),
                          conn.version)
        if conn.session.persistent:
            self._after_commit(self._subscribe_done, conn, unsuback, None, 0)
        else:
            conn.out += unsuback

    @rule(messages=st.lists(st.tuples(st.sampled_from(PUBLISHERS), st.sampled_from(TOPICS),
                                      st.integers(0, 2), st.sampled_from(MSG_IDS)),
                            min_size=1, max_size=4),
          commit=st.booleans())
    def publish(self, messages, commit):
        """Publishes into the pending batch; with ``commit``, the batch is stored."""
        for publisher, topic, qos, msg_id in messages:
            seq = self.next_seq[publisher]
            self.next_seq[publisher] += 1
            payload = f"{publisher}#{seq}".encode()
            self.ingest.add(topic, payload, qos, False, msg_id.encode() if msg_id else None,
                            None, publisher, b"", None, 0)
            self.pending.append((publisher, seq, topic, qos, msg_id, payload))
        if commit:
            self._commit()

    @rule()
    def commit(self):
        self._commit()

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), limit=st.sampled_from([None, 0, 1]))
    def client_acks(self, data, limit):
        """The client reads what it was sent and sends ``limit`` of the acks it owes."""
        self._client_reads(self._connected(data), limit)

    @rule(step_ms=st.sampled_from(STEPS_MS))
    def advance(self, step_ms):
        self.now_ms += step_ms
        self.ingest.now_ms = self.now_ms
        self.timers.fire_due()
        for client, m in list(self.model.items()):
            if not m.connected and m.expiry not in (0, EXPIRY_NEVER) \
                    and m.disconnected_ms + m.expiry * 1000 <= self.now_ms:
                # MQTT 5.0 §3.1.2.11.2: the session ends when its interval has passed.
                del self.model[client]

    @rule(crash=st.booleans(), reconnect=st.booleans(),
          receive_maximum=st.sampled_from(RECEIVE_MAXIMUMS))
    def restart(self, crash, reconnect, receive_maximum):
        """SIGTERM or SIGKILL; with ``reconnect`` the clients come back at once."""
        versions = {client: conn.version for client, conn in self.conns.items()}
        self._restart(crash)
        if reconnect:
            for client, version in sorted(versions.items()):
                self._connect(client, False, SESSION_EXPIRY, version, receive_maximum, 0)

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def sessions_match_model(self):
        broker = self.broker
        assert set(broker.sessions) == set(self.model)
        for client, session in broker.sessions.items():
            m = self.model[client]
            assert session.expiry == m.expiry, client
            assert session.persistent == (m.expiry > 0)
            assert session.stored == session.persistent, client
            assert {f: s.qos for f, s in session.subs.items()} == m.subs, client
            assert session.conn is self.conns.get(client), client
            if session.conn is None:
                assert session.disconnected_ms == m.disconnected_ms, client

    @invariant()
    def accounting(self):
        for client, session in self.broker.sessions.items():
            held = list(session.queue) + list(session.inflight.values())
            assert session.pending == 0, client
            assert session.size() >= 0
            assert session.queued_bytes == sum(len(d.message.record) for d in held), client
            assert len({id(d) for d in held}) == len(held), f"{client}: a copy held twice"

    @invariant()
    def shared_copies(self):
        """MQTT 5.0 §4.8.2: one member of the group has a message, never two."""
        holders = Counter()
        for session in self.broker.sessions.values():
            for d in list(session.queue) + list(session.inflight.values()):
                if d.share is not None:
                    holders[d.message.record] += 1
        assert all(n == 1 for n in holders.values())

    @invariant()
    def shared_copies_kept(self):
        """A shared QoS 1/2 copy leaves its holder only delivered or handed on, or with
        the holder's session (MQTT 5.0 §4.8.2: nobody else connected to take it).

        Handed on, it takes the new member's subscription QoS; at QoS 0 it may be lost.
        """
        held = {}
        for client, session in self.broker.sessions.items():
            for d in list(session.queue) + list(session.inflight.values()):
                if d.share is not None:
                    held[d.message.payload] = (client, d.qos)
        for payload, (client, epoch, qos) in list(self.shared_held.items()):
            if payload in held:
                holder, qos = held[payload]
                self.shared_held[payload] = (holder, self.model[holder].epoch, qos)
            elif any(payload in self.received[c] for c in self.ever_shared):
                del self.shared_held[payload]
            else:
                m = self.model.get(client)
                assert qos == 0 or m is None or m.epoch != epoch, \
                    f"shared copy {payload!r} vanished from {client}'s live session"
                del self.shared_held[payload]

    @invariant()
    def in_flight(self):
        for client, session in self.broker.sessions.items():
            for packet_id, d in session.inflight.items():
                assert 1 <= packet_id <= 65535
                assert d.packet_id == packet_id and d.qos >= 1
                # HELD: it waits for its packet id to be committed before it is sent.
                assert d.state in (SENT, HELD) or (d.state == RELEASED and d.qos == 2)
            conn = session.conn
            if conn is not None:
                window = conn.receive_maximum_out if conn.version == 5 else WINDOW_V3
                assert len(session.inflight) <= window, (
                    f"{client} (MQTT {conn.version}) has {len(session.inflight)} in flight, "
                    f"window {window}")

    @invariant()
    def store_matches_broker(self):
        rows, entries = self._store_view()
        persistent = {c: s for c, s in self.broker.sessions.items() if s.persistent}
        assert set(rows) == {c.encode() for c in persistent}
        expected_entries = {}
        for client, session in persistent.items():
            m = self.model[client]
            row = rows[client.encode()]
            assert row["expiry"] == session.expiry
            assert sorted((f, q) for f, q, *_ in row["subs"]) == sorted(m.subs.items())
            stored_ms = 0 if m.connected or m.stored_connected else m.disconnected_ms
            assert row["disconnected_ms"] == stored_ms, client
            for d in list(session.queue) + list(session.inflight.values()):
                if d.seq is not None:
                    expected_entries[queue_key(session.prefix, d.seq)] = d
        assert set(entries) == set(expected_entries)
        for key, d in expected_entries.items():
            qos, flags, packet_id, _, _, record = decode_queue_value(entries[key])
            assert qos == d.qos and record == d.message.record
            assert entries[key] == d.queue_value(), (
                f"stored entry {decode_record(record).payload!r}: flags {flags} packet id "
                f"{packet_id}; in memory state {d.state} packet id {d.packet_id}")

    # -- the end: everyone back, everything delivered -----------------------------------

    def _drain(self, client):
        for _ in range(DRAIN_ROUNDS):
            self._client_reads(client)
            self._commit()
            conn = self.conns[client]
            session = conn.session
            if not (conn.out or conn.acks_owed or session.queue or session.inflight
                    or self.callbacks):
                return
        raise AssertionError(f"{client} did not drain in {DRAIN_ROUNDS} rounds")

    def end_checks(self):
        """Everyone drains, then every session left comes back and drains: nothing owed."""
        self._commit()
        for client in sorted(self.conns):
            self._drain(client)
        for client, m in sorted(self.model.items()):
            if m.connected:
                assert not m.owed, f"{client} (connected) never got {sorted(m.owed)}"
        for client in sorted(self.model):
            m = self.model[client]
            if not m.connected:
                self._connect(client, False, SESSION_EXPIRY, m.version, 65535, 0)
                self._drain(client)
                assert not m.owed, f"{client} never got {sorted(m.owed)}"
        assert not self.wills

    def close(self):
        self.log.close()
        shutil.rmtree(self.dir)

    def teardown(self):
        try:
            self.end_checks()
        finally:
            self.close()


BrokerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                           deadline=None)
test_broker_model = BrokerMachine.TestCase


# Counterexamples the machine found, replayed step by step: each invariant after
# every step, then the end checks.

INVARIANTS = (BrokerMachine.sessions_match_model, BrokerMachine.accounting,
              BrokerMachine.shared_copies, BrokerMachine.shared_copies_kept,
              BrokerMachine.in_flight, BrokerMachine.store_matches_broker)


def replay(*steps):
    machine = BrokerMachine()
    try:
        for name, kwargs in steps:
            getattr(machine, name)(**kwargs)
            for check in INVARIANTS:
                check(machine)
        machine.end_checks()
    finally:
        machine.close()


def test_resume_keeps_the_window_and_the_order():
    """A session with 3 unacked copies (3.1.1 window 3) comes back as MQTT 5 with
    Receive Maximum 1: one may be in flight (§3.3.4 [MQTT-3.3.4-9]), re-sent
    first; the other two follow in their order, still with DUP."""
    replay(
        ("subscribers", dict(starts=[(0, 4, "a/b", 0), (SESSION_EXPIRY, 4, "a/b", 1)])),
        ("publish", dict(commit=True, messages=[("p0", "a/b", 1, None)] * 3)),
        ("connect", dict(client="c1", clean_start=False, expiry=0, version=5,
                         receive_maximum=1, alias_maximum=0)),
    )


def test_takeover_while_a_qos2_copy_waits_for_its_commit():
    """A QoS 2 copy to a stored session waits for its packet id's commit; the client
    reconnects before that commit, and the commit then releases what resume() sent."""
    replay(
        ("subscribers", dict(starts=[(SESSION_EXPIRY, 4, "a/b", 2), (0, 4, "a/b", 0)])),
        ("publish", dict(commit=True, messages=[("p0", "a/b", 2, None)])),
        ("connect", dict(client="c0", clean_start=False, expiry=0, version=4,
                         receive_maximum=1, alias_maximum=0)),
        ("commit", {}),
    )


def test_held_copy_moved_back_by_resume():
    """Two QoS 2 copies wait for their packet ids' commit (HELD) when the client comes
    back with Receive Maximum 1: the second goes back to the queue and, re-sent from
    there, is still HELD, so its PUBREC is refused (PUBREL 0x92) and never recorded;
    after a crash the server sends it again although its PUBREL went out
    (MQTT 5.0 §4.3.3: exactly once)."""
    replay(
        ("subscribers", dict(starts=[(SESSION_EXPIRY, 4, "a/b", 2), (0, 4, "a/b", 0)])),
        ("publish", dict(commit=True, messages=[("p0", "a/b", 2, None)] * 2)),
        ("connect", dict(client="c0", clean_start=False, expiry=SESSION_EXPIRY, version=5,
                         receive_maximum=1, alias_maximum=0)),
        ("_client_reads", dict(client="c0", limit=1)),
        ("commit", {}),
        ("_client_reads", dict(client="c0", limit=1)),
        ("_client_reads", dict(client="c0", limit=1)),
        ("_client_reads", dict(client="c0", limit=1)),
        ("restart", dict(crash=True, reconnect=True, receive_maximum=1)),
    )
