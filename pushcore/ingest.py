"""The pending group-commit batch, shared by every protocol.

A protocol turns each inbound message into a record and appends it here with
the ack it waits for; the server's writer commits the whole batch in one LMDB
transaction and only then hands each waiter its result.  Nothing in this
module sends anything: it only keeps records and waiters side by side.
"""

from .record import encode_record, id_hash, partition_for


class Batch:
    """Records waiting for one group commit, and who waits for each.

    ``items`` is exactly what ``Log.append_batch`` takes: (partition, id hash
    or None, record bytes).  ``waiters`` is (connection, packet id, qos,
    index into ``items``) in the order the publishes arrived, so acks leave in
    that order (MQTT 5.0 §4.6).  QoS 0 records wait for nobody.  An index of
    -1 is an ack owed for a message an earlier batch stored (a QoS 2 PUBLISH
    re-sent before PUBREL): batches commit in order, so it goes out with this
    one.
    """

    __slots__ = ("items", "waiters", "nbytes")

    def __init__(self):
        self.items = []
        self.waiters = []
        self.nbytes = 0

    def __len__(self):
        return len(self.items) + len(self.waiters)

    def add(self, partition, idh, record, conn, packet_id, qos):
        items = self.items
        if conn is not None:
            self.waiters.append((conn, packet_id, qos, len(items)))
        items.append((partition, idh, record))
        self.nbytes += len(record)

    def add_ack_only(self, conn, packet_id, qos):
        self.waiters.append((conn, packet_id, qos, -1))

    def extend(self, other):
        """Append another batch's records and waiters after this one's."""
        base = len(self.items)
        self.items.extend(other.items)
        self.waiters.extend((c, p, q, i + base if i >= 0 else -1) for c, p, q, i in other.waiters)
        self.nbytes += other.nbytes


class Ingest:
    """Builds records for a batch from what a publisher sent.

    Holds the store-wide choices every protocol shares: partition count, the
    dedup scope and the current time (set by the server once per loop
    iteration, so the hot path never reads the clock).
    """

    __slots__ = ("partitions", "scope_global", "batch", "now_ms")

    def __init__(self, partitions, scope_global=True):
        self.partitions = partitions
        self.scope_global = scope_global
        self.batch = Batch()
        self.now_ms = 0

    def add(self, topic, payload, qos, retain, msg_id, key, client_id, properties,
            conn, packet_id):
        """Append one message; ``msg_id``/``key`` are bytes or None."""
        record = encode_record(self.now_ms, topic, payload, qos, retain, msg_id, key,
                               client_id, properties)
        pkey = key if key is not None else client_id.encode()
        part = partition_for(pkey, self.partitions) if self.partitions > 1 else 0
        idh = None
        if msg_id is not None:
            idh = id_hash(b"" if self.scope_global else client_id.encode(), msg_id)
        self.batch.add(part, idh, record, conn, packet_id, qos)

    def add_ack_only(self, conn, packet_id, qos):
        self.batch.add_ack_only(conn, packet_id, qos)

    def take(self):
        """Hand the filled batch to the writer and start a new one."""
        batch = self.batch
        self.batch = Batch()
        return batch
