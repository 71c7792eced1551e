"""The MQTT broker role, sans-IO: sessions, subscriptions, queues, retained messages.

Every PUBLISH is a record in the log first (pushcore/log.py).  The server
hands each batch to the broker twice:

    route(batch items)          before the commit: which sessions want each
                                message; a persistent session's copy becomes a
                                ``queue`` entry in the same transaction
    committed(routes, results)  after the commit: the copies of the messages
                                that were stored (not duplicates) join their
                                sessions' queues and go out within each
                                session's window

so a message acknowledged to its publisher is never lost for a persistent
subscriber, offline or not, and no subscriber sees a message the log does
not hold.  State changes (sessions, queue entries, retained messages) are
collected in ``self.ops`` (a :class:`pushcore.log.StoreOps`) and written by
the server with the next batch.

One :class:`Session` per client id.  It outlives its connection when it is
persistent: MQTT 3.1.1 CleanSession 0, or MQTT 5.0 Session Expiry Interval
above 0 (§3.1.2.11.2); then its subscriptions and queued QoS 1/2 messages are
in LMDB and survive a restart.

Choices the specifications leave open, made as Mosquitto users expect:

- Overlapping subscriptions of one client give one copy, at the highest
  granted QoS, carrying every matching Subscription Identifier (MQTT 5.0
  §3.3.4 allows one copy or one per subscription; 3.1.1 §3.3.5 asks for one
  copy).  It keeps the retain flag when any of the subscriptions asked for
  Retain As Published.
- A shared subscription's copy is separate: a session in the group and also
  subscribed directly gets both.  Members are taken round-robin, preferring
  connected members with room in their window; when a member disconnects,
  its queued and unacknowledged copies (not yet PUBREC'd) go to another
  connected member of the group.
- A full session queue (``sessions.max_queued_*``) either refuses the new
  message for that session (it is still in the log and reaches the other
  subscribers) or drops the oldest queued message; both are counted and logged.
"""

import base64
import json
import logging
from collections import deque

from ._frame import Will, decode_properties, encode_properties
from .errors import ProtocolError, TopicFilterInvalid
from .log import (
    OP_DELETE,
    OP_DELETE_PREFIX,
    OP_PUT,
    QUEUE_RELEASED,
    QUEUE_RETAIN,
    QUEUE_SENT,
    StoreOps,
    decode_queue_value,
    encode_queue_value,
    queue_key,
    queue_prefix,
)
from ._ingest import STATE_CLOSED, encode_publish, record_fields
from .topics import SubscriptionTrie, matches, parse_shared

log = logging.getLogger("pushcore.broker")

MQTT311 = 4
MQTT5 = 5
# MQTT 5.0 §3.1.2.11.2: 0xFFFFFFFF means the session does not expire.
EXPIRY_NEVER = 0xFFFFFFFF
# MQTT 5.0 §3.9.3 reason codes in SUBACK.
SUBACK_NOT_AUTHORIZED = 0x87
SUBACK_FILTER_INVALID = 0x8F
SUBACK_FAILURE_V3 = 0x80
# MQTT 5.0 §3.11.3: UNSUBACK codes.
UNSUBACK_SUCCESS = 0x00
UNSUBACK_NO_SUBSCRIPTION = 0x11
# A persistent session's client id is an LMDB key (LMDB keys are at most 511
# bytes; the queue key adds 10): longer ids may only have clean sessions.
MAX_STORED_CLIENT_ID = 256
# Subscription Identifiers one stored copy can carry (u16 count in the queue entry).
MAX_SUB_IDS = 0xFFFF
# Distinct topics whose subscription matches are cached for routing.
ROUTE_CACHE_MAX = 10_000
# MQTT 5.0 §3.6.1: PUBREL has fixed header flags 0010.
PUBREL_HEADER = 0x62

# Delivery states.
QUEUED = 0
SENT = 1
RELEASED = 2  # QoS 2: PUBREC received, PUBREL sent
HELD = 3  # has its packet id, waits for that to be committed before it is sent


class Subscription:
    """One subscription of one session (MQTT 5.0 §3.8.3.1 options)."""

    __slots__ = ("filter", "topic_filter", "share", "qos", "no_local", "retain_as_published",
                 "retain_handling", "sub_id")

    def __init__(self, topic_filter, qos, no_local=False, retain_as_published=False,
                 retain_handling=0, sub_id=0):
        self.filter = topic_filter
        self.share, self.topic_filter = parse_shared(topic_filter)
        self.qos = qos
        self.no_local = no_local
        self.retain_as_published = retain_as_published
        self.retain_handling = retain_handling
        self.sub_id = sub_id

    def to_json(self):
        return [self.filter, self.qos, int(self.no_local), int(self.retain_as_published),
                self.retain_handling, self.sub_id]

    @classmethod
    def from_json(cls, row):
        topic_filter, qos, no_local, rap, rh, sub_id = row
        return cls(topic_filter, qos, bool(no_local), bool(rap), rh, sub_id)


class Message:
    """A stored message, decoded once for all the sessions it goes to."""

    __slots__ = ("record", "topic", "topic_bytes", "payload", "qos", "retain", "client_id",
                 "time_ms", "properties", "raw_properties", "expires_ms")

    def __init__(self, record):
        time_ms, flags, topic, client_id, raw_properties, payload = record_fields(record)
        self.record = record
        self.topic = topic
        self.topic_bytes = topic.encode()
        self.payload = payload
        self.qos = flags & 0x03
        self.retain = bool(flags & 0x04)
        self.client_id = client_id
        self.time_ms = time_ms
        self.raw_properties = raw_properties
        self.properties = None
        self.expires_ms = 0
        if raw_properties:
            self.properties = decode_properties(raw_properties)
            interval = self.properties.get("message_expiry_interval")
            if interval is not None:
                # MQTT 5.0 §3.3.2.3.3: the message expires this long after it arrived.
                self.expires_ms = time_ms + interval * 1000


class Delivery:
    """One copy of a message for one session."""

    __slots__ = ("message", "qos", "retain", "sub_ids", "share", "seq", "packet_id", "state",
                 "order")

    def __init__(self, message, qos, retain, sub_ids=(), share=None, seq=None):
        self.message = message
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        # (share name, topic filter) of the shared subscription it came through.
        self.share = share
        # Its key in the session's LMDB queue, or None when it is not stored there.
        self.seq = seq
        self.packet_id = 0
        self.state = QUEUED
        # Session.enqueued when it joined the queue after a commit (see send_retained).
        self.order = 0

    def queue_value(self, sent=False):
        flags = (QUEUE_RETAIN if self.retain else 0) | \
            (QUEUE_SENT if sent or self.state != QUEUED else 0)
        if self.state == RELEASED:
            flags |= QUEUE_RELEASED
        share = f"$share/{self.share[0]}/{self.share[1]}" if self.share else None
        return encode_queue_value(self.qos, flags, self.packet_id, self.sub_ids, share,
                                  self.message.record)


class Session:
    """The broker state of one client id."""

    __slots__ = ("client_id", "version", "expiry", "subs", "queue", "inflight", "conn",
                 "pending", "next_seq", "next_packet_id", "prefix", "disconnected_ms",
                 "expiry_timer", "ended", "full_logged", "queued_bytes", "stored", "will",
                 "enqueued", "holding")

    def __init__(self, client_id, version, expiry, next_seq=0):
        self.client_id = client_id
        self.version = version
        # Seconds after the connection ends; 0 ends it with the connection.
        self.expiry = expiry
        self.subs = {}
        # Most sessions never queue anything (publishers): the deque, some 600
        # bytes, is made by writable_queue() at the first copy.
        self.queue = ()
        # packet id -> Delivery, in the order they were sent.
        self.inflight = {}
        self.conn = None
        # Copies routed to this session in batches not committed yet.
        self.pending = 0
        self.next_seq = next_seq
        self.next_packet_id = 1
        self.prefix = queue_prefix(client_id)
        self.disconnected_ms = 0
        self.expiry_timer = None
        self.ended = False
        self.full_logged = False
        self.queued_bytes = 0
        # True while a session row (and maybe queue entries) may be in the store.
        self.stored = False
        # (Will, due time ms) while a Will waits for its Will Delay Interval.
        self.will = None
        # Copies committed into the queue so far: marks where a SUBSCRIBE happened.
        self.enqueued = 0
        # Copies taken from the queue that wait for a commit before they are sent
        # (see Broker.pump), in order; None when nothing waits.
        self.holding = None

    def writable_queue(self):
        queue = self.queue
        if queue.__class__ is not deque:
            queue = self.queue = deque()
        return queue

    @property
    def persistent(self):
        return self.expiry > 0

    def to_json(self):
        state = {"v": 1, "version": self.version, "expiry": self.expiry,
                 "subs": [s.to_json() for s in self.subs.values()],
                 "disconnected_ms": self.disconnected_ms}
        if self.will is not None:
            will, due_ms = self.will
            state["will"] = {"topic": will.topic, "qos": will.qos, "retain": will.retain,
                             "payload_b64": base64.b64encode(will.payload).decode(),
                             "properties_b64": base64.b64encode(
                                 encode_properties(will.properties or {})).decode(),
                             "due_ms": due_ms}
        return json.dumps(state).encode()

    def size(self):
        return len(self.queue) + len(self.inflight) + self.pending

    def take_packet_id(self):
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id


class SharedGroup:
    """The members of one $share/NAME/FILTER group."""

    __slots__ = ("name", "topic_filter", "members", "turn")

    def __init__(self, name, topic_filter):
        self.name = name
        self.topic_filter = topic_filter
        self.members = {}
        self.turn = 0


class BrokerSettings:
    __slots__ = ("max_qos", "max_inflight_out", "max_queued_messages", "max_queued_bytes",
                 "queue_full", "queue_qos0", "max_expiry", "subscribe_deny")

    def __init__(self, max_qos=2, max_inflight_out=32, max_queued_messages=1000,
                 max_queued_bytes=0, queue_full="refuse", queue_qos0=False, max_expiry=0,
                 subscribe_deny=()):
        self.max_qos = max_qos
        self.max_inflight_out = max_inflight_out
        self.max_queued_messages = max_queued_messages
        self.max_queued_bytes = max_queued_bytes
        self.queue_full = queue_full
        self.queue_qos0 = queue_qos0
        self.max_expiry = max_expiry
        self.subscribe_deny = tuple(subscribe_deny)


class Broker:
    """Sessions, the subscription trie and the retained messages of one server.

    ``schedule(delay_s, fn, *args)`` returns a handle with ``cancel()`` (the
    server's timers); ``publish_will(client_id, will)`` stores a Will Message
    as a publish; ``metrics`` is a Counter.
    """

    def __init__(self, settings, metrics, schedule, publish_will):
        self.settings = settings
        self.metrics = metrics
        self.schedule = schedule
        self.publish_will = publish_will
        self.sessions = {}
        self.trie = SubscriptionTrie()
        self.shares = {}
        self.retained = {}
        self.ops = StoreOps()
        # The server's after_commit(fn, *args): a QoS 2 delivery to a stored session
        # leaves only once the packet id it goes out with is committed.
        self.after_commit = None
        self.pending_wills = {}
        # topic -> trie matches; cleared whenever a subscription changes.
        self._route_cache = {}
        # Sessions with deliveries to send (flushed by the server after each batch).
        self.dirty = set()

    # -- restart --------------------------------------------------------------

    def load(self, store, now_ms):
        """Take the sessions, queues and retained messages a previous run stored."""
        self.retained = store.retained()
        messages = {}
        sessions, orphans = store.load_sessions()
        for prefix in orphans:
            # Entries of a session whose end was not committed before a crash.
            self.ops.writes.append((OP_DELETE_PREFIX, b"queue", prefix, None))
        for client_id, state, entries in sessions:
            session = Session(client_id, state["version"], state["expiry"], now_ms << 20)
            session.stored = True
            # A session that was connected when the server stopped went offline then.
            session.disconnected_ms = state.get("disconnected_ms") or now_ms
            for row in state["subs"]:
                sub = Subscription.from_json(row)
                session.subs[sub.filter] = sub
                self._add_to_trie(session, sub)
            for seq, value in entries:
                qos, flags, packet_id, sub_ids, share, record = decode_queue_value(value)
                message = messages.get(record)
                if message is None:
                    message = messages[record] = Message(record)
                d = Delivery(message, qos, bool(flags & QUEUE_RETAIN), sub_ids,
                             parse_shared(share) if share else None, seq)
                session.next_seq = max(session.next_seq, seq + 1)
                if flags & QUEUE_SENT and packet_id and packet_id not in session.inflight:
                    d.packet_id = packet_id
                    d.state = RELEASED if flags & QUEUE_RELEASED else SENT
                    session.inflight[packet_id] = d
                else:
                    session.writable_queue().append(d)
                session.queued_bytes += len(record)
            self.sessions[client_id] = session
            stored_will = state.get("will")
            if stored_will is not None:
                props = decode_properties(base64.b64decode(stored_will["properties_b64"]))
                will = Will(stored_will["topic"], base64.b64decode(stored_will["payload_b64"]),
                            stored_will["qos"], stored_will["retain"], props or None)
                self._arm_will(session, will, stored_will["due_ms"], now_ms)
            self._arm_expiry(session, now_ms)
        log.info("loaded %d sessions, %d retained messages", len(self.sessions), len(self.retained))

    # -- connect / disconnect -------------------------------------------------

    def connect(self, conn, clean_start, expiry, now_ms):
        """Attach a connection to its session; return Session Present."""
        client_id = conn.client_id
        session = self.sessions.get(client_id)
        present = False
        if session is not None and clean_start:
            # MQTT 5.0 §3.1.2.4: Clean Start discards the session; its end publishes a
            # Will still waiting for its delay (§3.1.3.2.2, as Mosquitto does).
            self._end_session(session, now_ms)
            session = None
        if session is not None:
            present = True
            if session.will is not None:
                # MQTT 5.0 §3.1.3.2.2: the client came back within its Will Delay Interval.
                timer = self.pending_wills.pop(client_id, None)
                if timer is not None:
                    timer.cancel()
                session.will = None
                self.metrics["wills_cancelled"] += 1
            if session.expiry_timer is not None:
                session.expiry_timer.cancel()
                session.expiry_timer = None
        else:
            # Queue keys of a new session start past any an earlier session of this
            # client id used (its deletion may not be committed yet).
            session = self.sessions[client_id] = Session(client_id, conn.version, expiry,
                                                         now_ms << 20)
        session.version = conn.version
        session.expiry = expiry
        session.conn = conn
        session.disconnected_ms = 0
        conn.session = session
        self._save(session)
        return present

    def resume(self, session):
        """After CONNACK: resend what is unacknowledged (DUP set, in order), then the queue.

        MQTT 5.0 §3.3.4 [MQTT-3.3.4-9]: no more than the new connection's Receive
        Maximum is in flight; the rest go back to the head of the queue with
        their packet ids and are re-sent, still with DUP, as acks free the window.
        """
        conn = session.conn
        window = self._window(session)
        inflight = session.inflight
        later = []
        session.holding = None
        kept = 0
        for packet_id, d in list(inflight.items()):
            if kept >= window:
                del inflight[packet_id]
                later.append(d)
                continue
            kept += 1
            if d.state == HELD:
                # Never sent: a first send with the id it was given, no DUP.
                d.state = SENT
                if not self._send(conn, d, packet_id, False):
                    del inflight[packet_id]
                    self._forget(session, d)
                    kept -= 1
                continue
            if d.state == RELEASED:
                # MQTT 5.0 §4.4: a PUBREC was received; only the PUBREL is re-sent.
                conn.out += bytes((PUBREL_HEADER, 2, packet_id >> 8, packet_id & 0xFF))
            elif not self._send(conn, d, packet_id, dup=True):
                # Too large for the Maximum Packet Size this connection stated: dropped
                # as if delivered (§3.1.2.11.4), so it cannot hold the window for ever.
                del inflight[packet_id]
                self._forget(session, d)
                kept -= 1
        if later:
            session.writable_queue().extendleft(reversed(later))
        self.pump(session)

    def disconnected(self, conn, now_ms):
        """The connection of a session ended (any way)."""
        session = getattr(conn, "session", None)
        if session is None or session.conn is not conn:
            return
        session.conn = None
        if not session.persistent:
            self._end_session(session, now_ms)
            return
        session.disconnected_ms = now_ms
        self._save(session)
        self._hand_over_shared(session)
        self._arm_expiry(session, now_ms)

    def set_expiry(self, session, expiry):
        """A v5 DISCONNECT changed the Session Expiry Interval (§3.14.2.2.2)."""
        session.expiry = self._cap_expiry(expiry)

    def _cap_expiry(self, expiry):
        cap = int(self.settings.max_expiry)
        if cap and (expiry == EXPIRY_NEVER or expiry > cap):
            return cap
        return expiry

    def session_expiry_for(self, version, clean_start, requested):
        """The expiry interval a new connection's session gets (seconds)."""
        if version == MQTT311:
            # 3.1.1 §3.1.2.4: CleanSession 0 keeps the session until the next
            # CleanSession 1 connection; sessions.max_expiry may bound it.
            return 0 if clean_start else self._cap_expiry(EXPIRY_NEVER)
        return self._cap_expiry(requested)

    def _arm_expiry(self, session, now_ms):
        if session.expiry == EXPIRY_NEVER:
            return
        remaining = session.disconnected_ms / 1000 + session.expiry - now_ms / 1000
        session.expiry_timer = self.schedule(max(0.0, remaining), self._expire, session)

    def _expire(self, session):
        session.expiry_timer = None
        if session.conn is None and not session.ended:
            self.metrics["sessions_expired"] += 1
            log.info("session %s expired", session.client_id)
            self._end_session(session, None)

    def _end_session(self, session, now_ms):
        """The session ends: its subscriptions, queue and stored state go."""
        session.ended = True
        if session.expiry_timer is not None:
            session.expiry_timer.cancel()
            session.expiry_timer = None
        for sub in list(session.subs.values()):
            self._remove_from_trie(session, sub)
        session.subs.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self._hand_over_shared(session)
        session.queue = ()
        session.inflight.clear()
        self.dirty.discard(session)
        session.expiry = 0
        self._save(session)
        if session.will is not None:
            # MQTT 5.0 §3.1.3.2.2: the Will is published when the session ends,
            # if that comes before the Will Delay Interval has passed.
            timer = self.pending_wills.pop(session.client_id, None)
            if timer is not None:
                timer.cancel()
            will, session.will = session.will[0], None
            self.publish_will(session.client_id, will)

    def delay_will(self, client_id, will, delay_s, now_ms):
        """Publish a Will after its delay unless the client reconnects (§3.1.3.2.2).

        The waiting Will is part of the stored session, so a restart (SIGTERM or
        a crash) publishes it when it falls due rather than losing it.
        """
        session = self.sessions.get(client_id)
        if session is None or not session.persistent:
            self.publish_will(client_id, will)
            return
        if session.expiry != EXPIRY_NEVER:
            delay_s = min(delay_s, session.expiry)
        self._arm_will(session, will, now_ms + int(delay_s * 1000), now_ms)
        self._save(session)

    def _arm_will(self, session, will, due_ms, now_ms):
        session.will = (will, due_ms)
        self.pending_wills[session.client_id] = self.schedule(
            max(0.0, (due_ms - now_ms) / 1000), self._will_due, session)

    def _will_due(self, session):
        self.pending_wills.pop(session.client_id, None)
        if session.will is None:
            return
        will, session.will = session.will[0], None
        if not session.ended:
            self._save(session)
        self.publish_will(session.client_id, will)

    def stop_will_timers(self):
        """Shutting down: waiting Wills stay stored and fall due in the next run."""
        for timer in self.pending_wills.values():
            timer.cancel()
        self.pending_wills.clear()

    def _save(self, session):
        """Write the session's row, or delete row and queue once it is no longer kept."""
        writes = self.ops.writes
        if session.persistent:
            writes.append((OP_PUT, b"session", session.client_id.encode(), session.to_json()))
            session.stored = True
        elif session.stored:
            writes.append((OP_DELETE, b"session", session.client_id.encode(), None))
            writes.append((OP_DELETE_PREFIX, b"queue", session.prefix, None))
            session.stored = False

    # -- subscribe ------------------------------------------------------------

    def subscribe(self, session, subscriptions, sub_id):
        """SUBSCRIBE: returns (reason codes, subscriptions owed their retained messages).

        The retained messages are looked up by ``send_retained`` once what is
        being committed now is committed, so the subscriber gets the latest.
        """
        v5 = session.version == MQTT5
        if v5:
            for topic_filter, options in subscriptions:
                if options & 0x04 and topic_filter.startswith("$share/"):
                    # MQTT 5.0 §3.8.3.1 [MQTT-3.8.3-4]: No Local on a shared subscription;
                    # checked before any filter of the packet takes effect.
                    raise ProtocolError("No Local set on a shared subscription")
        codes = []
        wanted = []
        s = self.settings
        for topic_filter, options in subscriptions:
            qos = options & 0x03
            no_local = bool(options & 0x04)
            rap = bool(options & 0x08)
            rh = (options >> 4) & 0x03
            try:
                share, inner = parse_shared(topic_filter)
            except TopicFilterInvalid:
                codes.append(SUBACK_FILTER_INVALID if v5 else SUBACK_FAILURE_V3)
                self.metrics["subscribe_refused_invalid"] += 1
                continue
            if self._denied(inner):
                codes.append(SUBACK_NOT_AUTHORIZED if v5 else SUBACK_FAILURE_V3)
                self.metrics["subscribe_refused_denied"] += 1
                log.info("subscribe refused for %s: %s is in mqtt.subscribe_deny",
                         session.client_id, topic_filter)
                continue
            granted = min(qos, s.max_qos)
            sub = Subscription(topic_filter, granted, no_local, rap, rh, sub_id)
            existed = topic_filter in session.subs
            if existed:
                self._remove_from_trie(session, session.subs[topic_filter])
            session.subs[topic_filter] = sub
            self._add_to_trie(session, sub)
            codes.append(granted)
            self.metrics["subscriptions"] += 1
            # MQTT 5.0 §3.3.1.3 and §3.8.3.1: retained messages on subscribe, per
            # Retain Handling; none for a shared subscription (§4.8.2).
            if share is None and (rh == 0 or (rh == 1 and not existed)):
                wanted.append(sub)
        self._save(session)
        return codes, wanted

    def _denied(self, topic_filter):
        return any(_covers(deny, topic_filter) for deny in self.settings.subscribe_deny)

    def _retained_for(self, sub, now_ms):
        out = []
        for topic, record in self.retained.items():
            if matches(sub.topic_filter, topic):
                message = Message(record)
                if message.expires_ms and message.expires_ms <= now_ms:
                    continue
                ids = (sub.sub_id,) if sub.sub_id else ()
                out.append(Delivery(message, min(message.qos, sub.qos), True, ids))
        return out

    def send_retained(self, session, subs, now_ms, mark):
        """The retained messages for new subscriptions, in the queue where the SUBSCRIBE was.

        ``mark`` is ``session.enqueued`` when the SUBSCRIBE was handled: the
        retained copies go after what was queued before it (older than the
        retained message) and before what was published after it, as if they
        had been sent with the SUBACK.  They are looked up now, after the
        commit that was in flight, so they are the newest.  A subscription
        removed meanwhile gets none [MQTT-3.10.4-2].  For a stored session a
        QoS 1/2 copy is stored like any queued copy.
        """
        if session.ended:
            return
        fresh = []
        for sub in subs:
            if session.subs.get(sub.filter) is not sub:
                continue
            for d in self._retained_for(sub, now_ms):
                if d.qos and session.stored:
                    d.seq = session.next_seq
                    session.next_seq += 1
                    self.ops.writes.append((OP_PUT, b"queue", queue_key(session.prefix, d.seq),
                                            d.queue_value()))
                session.queued_bytes += len(d.message.record)
                fresh.append(d)
        if fresh:
            queue = session.writable_queue()
            at = len(queue)
            while at and queue[at - 1].order > mark:
                at -= 1
            for d in reversed(fresh):
                queue.insert(at, d)
        self.pump(session)

    def unsubscribe(self, session, filters):
        codes = []
        for topic_filter in filters:
            sub = session.subs.pop(topic_filter, None)
            if sub is None:
                codes.append(UNSUBACK_NO_SUBSCRIPTION)
                continue
            self._remove_from_trie(session, sub)
            codes.append(UNSUBACK_SUCCESS)
        self._save(session)
        return codes

    def _add_to_trie(self, session, sub):
        self._route_cache.clear()
        if sub.share is None:
            self.trie.add(sub.topic_filter, session.client_id)
            return
        key = (sub.share, sub.topic_filter)
        group = self.shares.get(key)
        if group is None:
            group = self.shares[key] = SharedGroup(sub.share, sub.topic_filter)
            self.trie.add(sub.topic_filter, ("$share", sub.share))
        group.members[session.client_id] = sub

    def _remove_from_trie(self, session, sub):
        self._route_cache.clear()
        if sub.share is None:
            self.trie.remove(sub.topic_filter, session.client_id)
            return
        key = (sub.share, sub.topic_filter)
        group = self.shares.get(key)
        if group is None:
            return
        group.members.pop(session.client_id, None)
        if not group.members:
            del self.shares[key]
            self.trie.remove(sub.topic_filter, ("$share", sub.share))

    # -- routing (before the commit) -----------------------------------------

    def route(self, batch, now_ms):
        """For each item of a batch about to commit: the copies it makes.

        Returns {item index: [(session, Delivery), ...]}.  A persistent
        session's QoS 1/2 copy gets a queue entry in ``self.ops`` tied to the
        item, so it is written only if the item is stored (not a duplicate).
        Retained messages are written the same way.
        """
        routes = {}
        trie = self.trie
        if not len(trie) and not batch.nretain:
            return routes
        # What abort_route undoes if this raises half way.
        self._routing = (routes, len(self.ops.queued), len(self.ops.retained))
        items = batch.items
        cache = self._route_cache
        sessions = self.sessions
        for index, item in enumerate(items):
            record = item[2]
            retain = record[1] & 0x04
            if not len(trie) and not retain:
                continue
            topic_len = (record[10] << 8) | record[11]
            topic = record[12:12 + topic_len]
            if retain:
                self._retain(index, topic, record)
            if not len(trie):
                continue
            found = cache.get(topic)
            if found is None:
                if len(cache) >= ROUTE_CACHE_MAX:
                    cache.clear()
                found = cache[topic] = trie.match(topic.decode())
            if not found:
                continue
            message = Message(record)
            if len(found) == 1 and found[0][1].__class__ is str:
                # The common case, one plain subscription: no merging of copies.
                topic_filter, client_id = found[0]
                session = sessions.get(client_id)
                sub = session.subs.get(topic_filter) if session is not None else None
                if sub is None or (sub.no_local and client_id == message.client_id):
                    continue
                d = self._admit(session, message, min(sub.qos, message.qos),
                                sub.retain_as_published, (sub.sub_id,) if sub.sub_id else (),
                                None, index)
                if d is not None:
                    routes[index] = [(session, d)]
                continue
            copies = {}
            for topic_filter, value in found:
                if value.__class__ is str:
                    session = sessions.get(value)
                    if session is None:
                        continue
                    sub = session.subs.get(topic_filter)
                    if sub is None or (sub.no_local and value == message.client_id):
                        continue
                    target = (session, None)
                else:
                    group = self.shares.get((value[1], topic_filter))
                    if group is None:
                        continue
                    session, sub = self._pick_member(group)
                    if session is None:
                        continue
                    target = (session, (group.name, group.topic_filter))
                qos = min(sub.qos, message.qos)
                copy = copies.get(target)
                if copy is None:
                    copies[target] = [qos, sub.retain_as_published,
                                      [sub.sub_id] if sub.sub_id else []]
                else:
                    copy[0] = max(copy[0], qos)
                    copy[1] = copy[1] or sub.retain_as_published
                    if sub.sub_id:
                        copy[2].append(sub.sub_id)
            out = routes[index] = []
            for (session, share), (qos, rap, sub_ids) in copies.items():
                d = self._admit(session, message, qos, rap, tuple(sub_ids), share, index)
                if d is not None:
                    out.append((session, d))
            if not out:
                del routes[index]
        self._routing = None
        return routes

    _routing = None

    def abort_route(self):
        """route() raised: take back the copies and store entries it had made."""
        if self._routing is None:
            return
        routes, queued, retained = self._routing
        self._routing = None
        for copies in routes.values():
            for session, d in copies:
                session.pending -= 1
                session.queued_bytes -= len(d.message.record)
        del self.ops.queued[queued:]
        del self.ops.retained[retained:]

    def _retain(self, index, topic, record):
        payload_empty = record_fields(record)[5] == b""
        # MQTT 5.0 §3.3.1.3: a retained PUBLISH with an empty payload removes the
        # topic's retained message; it is not stored as one.
        self.ops.retained.append((index, topic, None if payload_empty else record))

    def _pick_member(self, group):
        members = list(group.members.items())
        n = len(members)
        fallback = None
        for i in range(n):
            client_id, sub = members[(group.turn + i) % n]
            session = self.sessions.get(client_id)
            if session is None:
                continue
            if session.conn is not None:
                if session.size() < self._window(session):
                    group.turn = (group.turn + i + 1) % n
                    return session, sub
                if fallback is None or fallback[0].conn is None:
                    fallback = (session, sub)
            elif fallback is None and session.persistent:
                fallback = (session, sub)
        if fallback is not None:
            group.turn = (group.turn + 1) % n
            return fallback
        return None, None

    def _window(self, session):
        conn = session.conn
        if conn is not None and session.version == MQTT5:
            return conn.receive_maximum_out
        return self.settings.max_inflight_out

    def _admit(self, session, message, qos, rap, sub_ids, share, index):
        """Make room for one more copy in a session (queue limits) or refuse it."""
        s = self.settings
        if session.conn is None and qos == 0 and not s.queue_qos0:
            # MQTT 5.0 §4.1: QoS 0 for a disconnected session may be dropped
            # (Mosquitto's queue_qos0_messages false).
            self.metrics["deliveries_qos0_offline_dropped"] += 1
            return None
        retain = message.retain and rap
        if s.queue_full == "refuse" and self._full(session):
            self._drop_expired(session, message.time_ms)
            if self._full(session):
                self.metrics["queue_full_refused"] += 1
                self._log_full(session, "refused a new message")
                return None
        # drop_oldest makes room in ``committed``, once the new copy is known to be
        # stored (a duplicate or a refused batch must not cost an older message).
        seq = None
        if session.persistent and qos > 0:
            seq = session.next_seq
            session.next_seq += 1
        d = Delivery(message, qos, retain, sub_ids[:MAX_SUB_IDS], share, seq)
        if seq is not None:
            self.ops.queued.append((index, queue_key(session.prefix, seq), d.queue_value()))
        session.pending += 1
        session.queued_bytes += len(message.record)
        return d

    def _full(self, session):
        s = self.settings
        return (s.max_queued_messages and session.size() >= s.max_queued_messages) or \
            (s.max_queued_bytes and session.queued_bytes >= s.max_queued_bytes)

    def _drop_expired(self, session, now_ms):
        """Expired messages at the head of a full queue go before anything is refused."""
        queue = session.queue
        while queue and queue[0].message.expires_ms and queue[0].message.expires_ms <= now_ms:
            self._forget(session, queue.popleft())
            self.metrics["deliveries_expired"] += 1

    def _trim(self, session, now_ms):
        """drop_oldest: drop queued (never in-flight) copies until the session fits."""
        s = self.settings
        self._drop_expired(session, now_ms)
        while session.queue and (
                (s.max_queued_messages and session.size() > s.max_queued_messages) or
                (s.max_queued_bytes and session.queued_bytes > s.max_queued_bytes)):
            self._forget(session, session.queue.popleft())
            self.metrics["queue_full_dropped"] += 1
            self._log_full(session, "dropped its oldest queued message")

    def _log_full(self, session, what):
        if not session.full_logged:
            session.full_logged = True
            log.warning("session %s queue is full (sessions.max_queued_messages %d, "
                        "max_queued_bytes %d): %s (sessions.queue_full %s); "
                        "counted as queue_full_*; logged again after it drains",
                        session.client_id, self.settings.max_queued_messages,
                        self.settings.max_queued_bytes, what, self.settings.queue_full)

    def _forget(self, session, d):
        """A delivery leaves the session for good (acked, dropped or expired)."""
        session.queued_bytes -= len(d.message.record)
        if d.seq is not None and not session.ended:
            self.ops.writes.append((OP_DELETE, b"queue", queue_key(session.prefix, d.seq), None))
        if session.full_logged and session.size() == 0:
            session.full_logged = False

    # -- after the commit ---------------------------------------------------------

    def committed(self, routes, results, now_ms):
        """The batch is stored: its copies join their sessions' queues."""
        dirty = self.dirty
        trim = self.settings.queue_full == "drop_oldest"
        grown = set()
        for index, copies in routes.items():
            duplicate = results[index][2]
            for session, d in copies:
                session.pending -= 1
                if duplicate:
                    session.queued_bytes -= len(d.message.record)
                    continue
                if d.share is not None and session.conn is None:
                    # The member it was meant for left while it was being committed.
                    session = self._reassign(session, d)
                    if session is None:
                        continue
                elif session.ended:
                    session.queued_bytes -= len(d.message.record)
                    continue
                session.enqueued += 1
                d.order = session.enqueued
                session.writable_queue().append(d)
                if trim:
                    grown.add(session)
                if session.conn is not None:
                    dirty.add(session)
        for session in grown:
            self._trim(session, now_ms)
        for index, topic, record in self._retained_done:
            if results[index][2]:
                continue
            if record is None:
                self.retained.pop(topic.decode(), None)
            else:
                self.retained[topic.decode()] = record
        self._retained_done = ()

    _retained_done = ()

    def take_ops(self):
        """The store writes for the next commit (and the retained changes it carries)."""
        ops, self.ops = self.ops, StoreOps()
        self._retained_done = ops.retained
        return ops

    def refused(self, routes, ops, store_full):
        """The batch was not committed: undo its copies.

        After StoreFull its state writes are kept for the next batch; after any
        other error they are dropped (they may be what failed) and logged.
        """
        for copies in routes.values():
            for session, d in copies:
                session.pending -= 1
                session.queued_bytes -= len(d.message.record)
        self._retained_done = ()
        if ops.writes:
            if store_full:
                self.ops.writes[:0] = ops.writes
            else:
                self.metrics["session_writes_lost"] += len(ops.writes)
                log.error("%d session/queue writes were lost with a failed commit",
                          len(ops.writes))

    # -- sending -------------------------------------------------------------

    def pump(self, session):
        """Send queued copies while the session's window and its output buffer allow.

        Returns True when it stopped at the output buffer's high watermark with
        copies still sendable (the server sends the buffer, then pumps again).
        """
        conn = session.conn
        if conn is None or conn.state == STATE_CLOSED or conn.close_after_flush:
            # MQTT 5.0 §3.14.4 [MQTT-3.14.4-1]: nothing follows a DISCONNECT.
            return False
        window = self._window(session)
        queue = session.queue
        inflight = session.inflight
        out = conn.out
        high = conn.outbuf_high
        now_ms = conn.ingest.now_ms
        while queue and len(out) < high:
            d = queue[0]
            if d.qos and len(inflight) >= window:
                break
            queue.popleft()
            expires = d.message.expires_ms
            if expires and expires <= now_ms:
                # MQTT 5.0 §3.3.2.3.3: an expired message is not sent.
                self.metrics["deliveries_expired"] += 1
                self._forget(session, d)
                continue
            if d.qos == 0:
                self._forget(session, d)
                if session.holding is not None:
                    session.holding.append(d)
                else:
                    self._send(conn, d, 0, False)
                continue
            if d.state != QUEUED and d.packet_id not in inflight:
                # Sent on an earlier connection, moved back by resume(): same id, DUP.
                packet_id = d.packet_id
                inflight[packet_id] = d
                if d.state == HELD:
                    # Its packet id may not be committed yet: it waits like a new one.
                    if session.holding is None:
                        session.holding = []
                        self.after_commit(self._release_holding, session, session.holding)
                    session.holding.append(d)
                    continue
                if d.state == RELEASED:
                    out += bytes((PUBREL_HEADER, 2, packet_id >> 8, packet_id & 0xFF))
                elif not self._send(conn, d, packet_id, True):
                    del inflight[packet_id]
                    self._forget(session, d)
                continue
            packet_id = session.take_packet_id()
            d.packet_id = packet_id
            inflight[packet_id] = d
            d.state = SENT
            if d.seq is not None and session.stored:
                # Which packet id the copy goes out with is written with the next
                # batch, so a restart re-sends it with DUP and the same id.
                self.ops.writes.append((OP_PUT, b"queue", queue_key(session.prefix, d.seq),
                                        d.queue_value(sent=True)))
                if d.qos == 2 and self.after_commit is not None \
                        and session.holding is None:
                    # QoS 2 is exactly once only if that id survives a crash: the
                    # PUBLISH waits for the commit, and so does everything after it
                    # (order is kept; one commit of latency per pump, not per copy).
                    session.holding = []
                    self.after_commit(self._release_holding, session, session.holding)
            if session.holding is not None:
                d.state = HELD
                session.holding.append(d)
            elif not self._send(conn, d, packet_id, False):
                del inflight[packet_id]
                self._forget(session, d)
        return bool(queue) and len(out) >= high

    def _release_holding(self, session, holding):
        """The packet ids of the held copies are committed: send them, in order."""
        if session.holding is not holding:
            # resume() sent them already (the client reconnected meanwhile).
            return
        session.holding = None
        conn = session.conn
        if conn is not None and (conn.state == STATE_CLOSED or conn.close_after_flush):
            conn = None
        for d in holding:
            if d.qos == 0:
                if conn is not None:
                    self._send(conn, d, 0, False)
                continue
            if d.state != HELD or session.inflight.get(d.packet_id) is not d:
                continue
            if conn is None:
                # Sent by resume() on the next connection.
                continue
            d.state = SENT
            if not self._send(conn, d, d.packet_id, False):
                del session.inflight[d.packet_id]
                self._forget(session, d)
        self.dirty.add(session)

    def _send(self, conn, d, packet_id, dup):
        """Append one PUBLISH to the connection's output; False if it was too large."""
        message = d.message
        version = conn.version
        alias_map = conn.aliases_out
        if version == MQTT5 and (message.properties is not None or d.sub_ids or
                                 conn.topic_alias_maximum_out):
            props = dict(message.properties) if message.properties else {}
            if message.expires_ms:
                # MQTT 5.0 §3.3.2.3.3: the interval sent is what is left of it.
                left = max(0, message.expires_ms - conn.ingest.now_ms)
                props["message_expiry_interval"] = (left + 999) // 1000
            if d.sub_ids:
                props["subscription_identifier"] = list(d.sub_ids)
            topic = message.topic
            new_alias = None
            if conn.topic_alias_maximum_out:
                alias = alias_map.get(topic)
                if alias is not None:
                    props["topic_alias"] = alias
                    topic = ""
                elif len(alias_map) < conn.topic_alias_maximum_out:
                    # Taken only once the packet is really sent (see below).
                    new_alias = props["topic_alias"] = len(alias_map) + 1
            try:
                packet = encode_publish(topic.encode(), d.qos, d.retain, dup, packet_id,
                                        encode_properties(props) if props else b"",
                                        message.payload, version)
            except ValueError:
                # Past MQTT's own 268435455-byte limit once the properties are added.
                packet = None
        else:
            new_alias = None
            packet = encode_publish(message.topic_bytes, d.qos, d.retain, dup, packet_id,
                                    message.raw_properties, message.payload, version)
        if packet is None or len(packet) > conn.max_packet_out:
            # MQTT 5.0 §3.1.2.11.4 [MQTT-3.1.2-25]: a packet over the client's Maximum
            # Packet Size is not sent; it is dropped as if it had been delivered.
            self.metrics["deliveries_skipped_too_large"] += 1
            return False
        if new_alias is not None:
            # MQTT 5.0 §3.3.2.3.4: the alias is the client's to know only once this
            # PUBLISH reaches it; a skipped packet must not leave it half-defined.
            alias_map[message.topic] = new_alias
        conn.out += packet
        self.metrics["messages_delivered"] += 1
        return True

    # -- acknowledgements from the subscriber ----------------------------------------

    def puback(self, session, packet_id):
        """PUBACK (QoS 1) or PUBCOMP (QoS 2): the copy is delivered.

        The window it frees is filled by the server's ``pump`` once the whole
        read is handled, not once per ack.
        """
        d = session.inflight.pop(packet_id, None)
        if d is None:
            return False
        self._forget(session, d)
        return True

    def pubrec(self, session, packet_id, send_pubrel):
        """PUBREC for a QoS 2 delivery: ``send_pubrel()`` once its state is safe.

        For a stored session the PUBREL waits until "PUBREC received" is
        committed, so a crash never makes the server re-send a PUBLISH the
        client has already completed.  False for an unknown packet id.
        """
        d = session.inflight.get(packet_id)
        if d is None or d.qos != 2 or d.state == HELD:
            return False
        if d.state == RELEASED:
            send_pubrel()
            return True
        d.state = RELEASED
        if d.seq is not None and session.stored and self.after_commit is not None:
            self.ops.writes.append((OP_PUT, b"queue", queue_key(session.prefix, d.seq),
                                    d.queue_value()))
            self.after_commit(send_pubrel)
        else:
            send_pubrel()
        return True

    def pubrec_refused(self, session, packet_id):
        """A PUBREC with a reason code >= 0x80 ends the flow (MQTT 5.0 §4.3.3)."""
        return self.puback(session, packet_id)

    def flush_dirty(self):
        """The connections of sessions the last commit queued copies for."""
        dirty, self.dirty = self.dirty, set()
        return [session.conn for session in dirty if session.conn is not None]

    # -- shared subscriptions ------------------------------------------------------

    def _hand_over_shared(self, session):
        """A member leaves: its shared copies not yet received go to another member.

        MQTT 5.0 §4.8.2: a QoS 2 copy already sent stays with its member (it
        must be completed with that client when it reconnects, [MQTT-4.8.2-4]
        and [MQTT-4.8.2-5]); a QoS 1 copy sent and unacknowledged, or any copy
        still queued, may go to another member.  Copies nobody can take stay
        where they were, in their order.
        """
        if not self.shares:
            return
        takers = {}

        def taker(share):
            if share not in takers:
                takers[share] = self._other_member(share, session)
            return takers[share]

        moved = []
        # The copies in flight are older than the queued ones: they go first.
        for packet_id, d in list(session.inflight.items()):
            if d.share is not None and d.state == SENT and d.qos == 1 \
                    and taker(d.share) is not None:
                del session.inflight[packet_id]
                moved.append(d)
        kept = deque()
        for d in session.queue:
            if d.share is not None and d.state == QUEUED and taker(d.share) is not None:
                moved.append(d)
            else:
                kept.append(d)
        if not moved:
            return
        session.queue = kept
        for d in moved:
            self._forget(session, d)
            self._give(*takers[d.share], d)

    def _reassign(self, session, d):
        """A shared copy committed for a member that has left: another member, or it stays."""
        taker = self._other_member(d.share, session)
        if taker is None:
            if session.ended:
                session.queued_bytes -= len(d.message.record)
                return None
            return session
        self._forget(session, d)
        self._give(*taker, d)
        return None

    def _other_member(self, share, leaving):
        """A connected member of the group other than ``leaving``: (session, its sub)."""
        group = self.shares.get(share)
        if group is None:
            return None
        members = list(group.members.items())
        for i in range(len(members)):
            client_id, sub = members[(group.turn + i) % len(members)]
            other = self.sessions.get(client_id)
            if other is not None and other is not leaving and other.conn is not None:
                group.turn = (group.turn + i + 1) % len(members)
                return other, sub
        return None

    def _give(self, target, sub, d):
        """A shared copy goes to another member, as that member's subscription grants it."""
        message = d.message
        copy = Delivery(message, min(message.qos, sub.qos),
                        message.retain and sub.retain_as_published,
                        (sub.sub_id,) if sub.sub_id else (), d.share, None)
        if target.persistent and copy.qos:
            copy.seq = target.next_seq
            target.next_seq += 1
            self.ops.writes.append((OP_PUT, b"queue", queue_key(target.prefix, copy.seq),
                                    copy.queue_value()))
        target.writable_queue().append(copy)
        target.queued_bytes += len(copy.message.record)
        self.dirty.add(target)
        self.metrics["shared_handed_over"] += 1


def _covers(deny, requested):
    """True when every topic ``requested`` can match is matched by ``deny``.

    A '+' level of the request is covered by '+' (or a '#' above it), a '#'
    level only by '#'; a literal level by itself, '+' or '#'.  A '$share/..'
    deny entry is judged by its inner filter too.
    """
    deny = parse_shared(deny)[1]
    if deny.startswith(("+", "#")) and requested.startswith("$"):
        # MQTT 5.0 §4.7.2: wildcards at the first level do not reach '$' topics.
        return False
    deny_levels = deny.split("/")
    levels = requested.split("/")
    for i, level in enumerate(levels):
        if i >= len(deny_levels):
            return False
        d = deny_levels[i]
        if d == "#":
            return True
        if level == "#":
            return False
        if d == "+" or d == level:
            continue
        return False
    return len(deny_levels) == len(levels) or deny_levels[len(levels):] == ["#"]


__all__ = ["Broker", "BrokerSettings", "Delivery", "Message", "Session", "Subscription",
           "EXPIRY_NEVER"]
