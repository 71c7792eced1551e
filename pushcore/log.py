"""The LMDB log: partitions of records, the dedup index, and their retention.

One LMDB environment holds everything (the storage layout table in
DESIGN.md).  This is the only module that imports ``lmdb``.

Databases and their bytes (all integers big-endian)::

    meta         b"format"      -> u32 store format version (STORE_FORMAT_VERSION)
                 b"partitions"  -> u32 partition count, fixed at creation
                 b"created_ms"  -> u64 creation time
                 b"part.pNNN"   -> u64 record bytes kept + u64 trim mark (one past
                                   the last trimmed offset, so an emptied partition
                                   still knows its next offset)
    log.pNNN     u64 offset     -> record (pushcore.record), appended in key order
    ids          16-byte id hash -> u16 partition + u64 offset + u64 time_ms
    ids.time     u64 time_ms + id hash -> b""   (walks ids oldest first for expiry)
    session      client id      -> JSON session state (pushcore.broker.Session)
    queue        u16 client id length + client id + u64 seq
                                -> a queued delivery (pushcore.broker): u8 format,
                                   u8 qos, u8 flags, u16 packet id, u16 n, n x u32
                                   subscription ids, u16 S, S bytes of the
                                   "$share/NAME/FILTER" it came through (S = 0:
                                   none), then the record bytes
    retained     topic          -> record (the topic's retained message); a topic
                                   longer than RETAINED_KEY_MAX is keyed by NUL + its hash
    cursor       u16 sink id + u16 partition -> u64 next offset the sink reads
    retry        u64 due ms + u16 sink id + u16 partition + u64 offset
                                -> a failure (below), the record it retries
    dlq          u16 sink id + u64 time ms + u16 partition + u64 offset
                                -> a failure (below), the record given up on
    meta         b"sinks"       -> JSON {sink name: sink id}, ids never reused

A failure value: u32 attempts + u16 last HTTP status (0: none, e.g. a
connection error) + u16 E + E bytes of the last error (UTF-8), then the
record.  Retry and dead-letter entries carry a copy of the record, so
retention may trim the log behind the cursors without losing them.

Retention by age and by bytes never trims a record some registered sink's
cursor has not passed.  ``retention_hard_max_bytes`` (0 = off) bounds the
record bytes kept all the same; when the records past it are some sink's
backlog, ``retention_overflow`` decides: ``drop_oldest`` trims them anyway
(counted), ``refuse`` makes append_batch refuse the records that do not fit
(RetentionFull) until the sinks move on.

Offsets are contiguous per partition from 0 and never reused: trimming
moves the head, never the tail.  The next offset of a partition is read
from the database (last key, else the trim mark) inside each write
transaction, so another process appending to the same environment is
noticed rather than overwritten.

Durability: ``fsync`` opens with sync=True (each commit is fdatasync'd
before append_batch returns; survives power loss), ``os`` with sync=False
(the commit reaches the OS page cache; survives a process crash, not power
loss).  ``map_size`` is the disk budget: when it is exhausted append_batch
raises StoreFull and writes nothing; expire() frees pages for reuse.

Thread use: one writer thread calls append_batch/expire; any thread may call
the read methods, each of which uses its own read transaction.
"""

import contextlib
import heapq
import itertools
import json
import os
from struct import Struct

import lmdb

from pushcore._ingest import batch_partitions, batch_rows, id_entries, id_hash, record_fields
from pushcore.errors import PartitionMismatch, RetentionFull, StoreError, StoreFull
from pushcore.record import record_time_ms

STORE_FORMAT_VERSION = 1
# The log.pNNN names hold three digits.
MAX_PARTITIONS = 1000
# Bounded work per expire() call keeps the writer thread's stall short.
EXPIRE_MAX_DELETIONS = 10_000
# Named DBs besides the partitions: meta, ids, ids.time, retry, dlq, cursor,
# session, retained, plus headroom for later features.
_EXTRA_DBS = 16
DURABILITY_MODES = ("fsync", "os")
# What happens at retention_hard_max_bytes to records some sink has not passed.
OVERFLOW_POLICIES = ("refuse", "drop_oldest")

_U32 = Struct(">I")
_U64 = Struct(">Q")
_ID_ENTRY = Struct(">HQQ")
_ID_TIME = slice(10, 18)
_PART_META = Struct(">QQ")


# StoreOps.writes kinds.
OP_PUT = 0
OP_DELETE = 1
# Delete every queue key under a prefix (value None) or the first ``value`` of them.
OP_DELETE_PREFIX = 2
# Queue value flags.
QUEUE_RETAIN = 0x01
QUEUE_SENT = 0x02
QUEUE_RELEASED = 0x04
QUEUE_FORMAT = 2
_QUEUE_HEAD = Struct(">BBBHH")


class StoreOps:
    """Broker state to write in the next batch's transaction.

    ``writes``: (OP_PUT | OP_DELETE | OP_DELETE_PREFIX, db name, key, value),
    applied in order.  ``queued``: (item index, queue key, value), written
    unless that item is a duplicate.  ``retained``: (item index, topic bytes,
    record or None to clear), likewise.
    """

    __slots__ = ("writes", "queued", "retained")

    def __init__(self):
        self.writes = []
        self.queued = []
        self.retained = []

    def __bool__(self):
        return bool(self.writes or self.queued or self.retained)


# LMDB keys are at most 511 bytes; a topic name may be 65535.  A longer topic is
# keyed by its hash behind a NUL, which no topic name contains (MQTT 5.0 §1.5.4).
RETAINED_KEY_MAX = 480


def retained_key(topic):
    """The ``retained`` DB key of a topic (UTF-8 bytes)."""
    if len(topic) <= RETAINED_KEY_MAX:
        return topic
    return b"\0" + id_hash(b"retained", topic)


_U16 = Struct(">H")
_CURSOR_KEY = Struct(">HH")
_RETRY_KEY = Struct(">QHHQ")
_DLQ_KEY = Struct(">HQHQ")
_FAILURE_HEAD = Struct(">IHH")


def cursor_key(sink_id, partition):
    return _CURSOR_KEY.pack(sink_id, partition)


def cursor_value(next_offset):
    return _U64.pack(next_offset)


def retry_key(due_ms, sink_id, partition, offset):
    """Retry entries sort by due time: the engine reads the queue's head."""
    return _RETRY_KEY.pack(due_ms, sink_id, partition, offset)


def dlq_key(sink_id, time_ms, partition, offset):
    return _DLQ_KEY.pack(sink_id, time_ms, partition, offset)


def encode_failure(attempts, status, error, record):
    """A retry or dead-letter value (format in the module docstring)."""
    text = error.encode()[:0xFFFF]
    return _FAILURE_HEAD.pack(attempts, status, len(text)) + text + record


def decode_failure(value):
    """(attempts, status, error, record) of a retry or dead-letter value."""
    attempts, status, n = _FAILURE_HEAD.unpack_from(value, 0)
    pos = _FAILURE_HEAD.size
    return (attempts, status, bytes(value[pos:pos + n]).decode(errors="replace"),
            bytes(value[pos + n:]))


def queue_prefix(client_id):
    """The queue DB key prefix of one session: u16 length + client id."""
    raw = client_id.encode()
    return len(raw).to_bytes(2, "big") + raw


def queue_key(prefix, seq):
    return prefix + _U64.pack(seq)


def encode_queue_value(qos, flags, packet_id, sub_ids, share, record):
    """A queue entry; ``share`` is the "$share/NAME/FILTER" it came through, or None."""
    head = _QUEUE_HEAD.pack(QUEUE_FORMAT, qos, flags, packet_id, len(sub_ids))
    if sub_ids:
        head += b"".join(_U32.pack(s) for s in sub_ids)
    shared = share.encode() if share else b""
    return head + len(shared).to_bytes(2, "big") + shared + record


def decode_queue_value(value):
    """(qos, flags, packet id, sub ids tuple, share or None, record bytes) of a queue value."""
    version, qos, flags, packet_id, n = _QUEUE_HEAD.unpack_from(value, 0)
    if version != QUEUE_FORMAT:
        raise StoreError(f"unknown queue entry format {version}")
    pos = _QUEUE_HEAD.size
    sub_ids = tuple(_U32.unpack_from(value, pos + 4 * i)[0] for i in range(n))
    pos += 4 * n
    share_len = int.from_bytes(value[pos:pos + 2], "big")
    share = bytes(value[pos + 2:pos + 2 + share_len]).decode() if share_len else None
    return qos, flags, packet_id, sub_ids, share, bytes(value[pos + 2 + share_len:])


def _part_meta_key(partition):
    return b"part.p%03d" % partition


class _NoRoom(Exception):
    """Inside an append transaction: the batch does not fit under the hard limit."""


class Log:
    """The store of one pushcore node.

    ``map_size`` is the disk budget in bytes (LMDB's map).  ``dedup_window_ms``:
    an id seen at most this long ago is a duplicate (the bound is inclusive).
    ``retention_max_age_ms`` / ``retention_max_bytes`` (0 = off) bound the
    records kept, by record time_ms and by the sum of record sizes (values,
    without LMDB's page overhead).  ``retention_hard_max_bytes`` (0 = off) and
    ``retention_overflow`` (one of OVERFLOW_POLICIES) are the hard limit on
    those bytes and what happens at it (module docstring).  ``now_ms`` is
    stored as the creation time of a new store.

    ``kept_bytes`` is the sum of the record bytes kept, followed in memory so
    that checking a batch against the hard limit reads nothing; what another
    process sharing the environment appends is taken in at the next expire().
    """

    def __init__(self, path, partitions=8, map_size=1 << 30, durability="fsync",
                 dedup_window_ms=86_400_000, retention_max_age_ms=0, retention_max_bytes=0,
                 readonly=False, now_ms=0, retention_hard_max_bytes=0,
                 retention_overflow="refuse"):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        if retention_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"retention_overflow must be one of {OVERFLOW_POLICIES},"
                             f" not {retention_overflow!r}")
        if partitions is None:
            # Readers (``pushcore log``) take the count the store was created with.
            if not readonly:
                raise ValueError("partitions=None is for read-only opens")
        elif not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1..{MAX_PARTITIONS}, not {partitions}")
        self.path = os.fspath(path)
        self.partitions = partitions
        self.durability = durability
        self.readonly = readonly
        self.dedup_window_ms = dedup_window_ms
        self.retention_max_age_ms = retention_max_age_ms
        self.retention_max_bytes = retention_max_bytes
        self.retention_hard_max_bytes = retention_hard_max_bytes
        # The sink names that hold records back (register_sinks); None: every sink
        # ever registered (a process that configures none, such as the CLI).
        self.holding_sinks = None
        self.retention_overflow = retention_overflow
        self._refuse_overflow = retention_hard_max_bytes > 0 and retention_overflow == "refuse"
        if readonly and not os.path.exists(os.path.join(self.path, "data.mdb")):
            raise StoreError(f"no store at {self.path}")
        try:
            self._env = lmdb.open(
                self.path, map_size=map_size, subdir=True, readonly=readonly, create=not readonly,
                lock=True, max_dbs=(partitions or MAX_PARTITIONS) + _EXTRA_DBS, sync=durability == "fsync",
                metasync=True, writemap=False)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        try:
            if readonly:
                self._open_readonly()
            else:
                self._part_keys = [_part_meta_key(p) for p in range(partitions)]
                with self._begin_write() as txn:
                    self._meta = self._env.open_db(b"meta", txn=txn)
                    self._check_meta(txn, now_ms)
                    self._open_data_dbs(txn, create=True)
                    self.next_offsets = [self._next_offset(txn, p) for p in range(partitions)]
                    self.kept_bytes = self._kept_bytes(txn)
        except lmdb.Error as exc:
            self._env.close()
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        except BaseException:
            self._env.close()
            raise

    def _open_readonly(self):
        # Handles opened inside a py-lmdb read transaction do not outlive it,
        # so each open_db here uses its own temporary read transaction.
        try:
            self._meta = self._env.open_db(b"meta", create=False)
        except lmdb.NotFoundError:
            raise StoreError(f"no store at {self.path}") from None
        with self._env.begin() as txn:
            if self.partitions is None:
                stored = txn.get(b"partitions", db=self._meta)
                if stored is None:
                    raise StoreError(f"no store at {self.path}")
                (self.partitions,) = _U32.unpack(stored)
            self._check_meta(txn, None)
        self._part_keys = [_part_meta_key(p) for p in range(self.partitions)]
        self._open_data_dbs(None, create=False)
        with self._env.begin() as txn:
            self.next_offsets = [self._next_offset(txn, p) for p in range(self.partitions)]
            self.kept_bytes = self._kept_bytes(txn)

    def _check_meta(self, txn, now_ms):
        """Check the stored format and partition count; write them into a new store.

        ``now_ms`` None means read-only: a store without them is no store.
        """
        stored_format = txn.get(b"format", db=self._meta)
        if stored_format is None:
            if now_ms is None:
                raise StoreError(f"no store at {self.path}")
            txn.put(b"format", _U32.pack(STORE_FORMAT_VERSION), db=self._meta)
            txn.put(b"partitions", _U32.pack(self.partitions), db=self._meta)
            txn.put(b"created_ms", _U64.pack(now_ms), db=self._meta)
            return
        (version,) = _U32.unpack(stored_format)
        if version != STORE_FORMAT_VERSION:
            raise StoreError(f"store at {self.path} has format version {version};"
                             f" this build reads version {STORE_FORMAT_VERSION}")
        (stored_partitions,) = _U32.unpack(txn.get(b"partitions", db=self._meta))
        if stored_partitions != self.partitions:
            raise PartitionMismatch(
                f"store at {self.path} has {stored_partitions} partitions but"
                f" {self.partitions} were configured; the partition count is fixed"
                f" when the store is created")

    def _open_data_dbs(self, txn, create):
        env = self._env
        try:
            self._logs = [env.open_db(b"log.p%03d" % p, txn=txn, create=create)
                          for p in range(self.partitions)]
            self._ids = env.open_db(b"ids", txn=txn, create=create)
            self._ids_time = env.open_db(b"ids.time", txn=txn, create=create)
            self._session = env.open_db(b"session", txn=txn, create=create)
            self._queue = env.open_db(b"queue", txn=txn, create=create)
            self._retained = env.open_db(b"retained", txn=txn, create=create)
            self._cursor = env.open_db(b"cursor", txn=txn, create=create)
            self._retry = env.open_db(b"retry", txn=txn, create=create)
            self._dlq = env.open_db(b"dlq", txn=txn, create=create)
        except lmdb.NotFoundError as exc:
            raise StoreError(f"store at {self.path} is incomplete: {exc}") from None

    def _begin_write(self):
        if self.readonly:
            raise StoreError(f"store at {self.path} is open read-only")
        try:
            return self._env.begin(write=True)
        except lmdb.MapResizedError:
            # Another process sharing the environment grew the map: adopt its
            # size (set_mapsize(0)) outside any transaction, then begin again.
            self._env.set_mapsize(0)
            return self._env.begin(write=True)

    def _part_meta(self, txn, partition):
        value = txn.get(self._part_keys[partition], db=self._meta)
        return _PART_META.unpack(value) if value is not None else (0, 0)

    def _kept_bytes(self, txn):
        return sum(self._part_meta(txn, p)[0] for p in range(self.partitions))

    def _next_offset(self, txn, partition):
        cursor = txn.cursor(self._logs[partition])
        if cursor.last():
            return _U64.unpack(cursor.key())[0] + 1
        return self._part_meta(txn, partition)[1]

    def _check_partition(self, partition):
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range 0..{self.partitions - 1}")

    def append_batch(self, items, now_ms, ops=None):
        """Append (partition, id_hash | None, record) items in ONE write transaction.

        Returns one (partition, offset, duplicate) per item, in order, only
        after the commit returned (fdatasync'd in fsync mode).  A duplicate
        points at the stored original and writes nothing.  Raises StoreFull
        (nothing written, next_offsets unchanged) when the map is exhausted.

        ``ops`` (a :class:`StoreOps`) is the broker's state written in the same
        transaction: session records, queued deliveries and retained messages.
        A message queued for a subscriber is therefore committed exactly when
        the publish that fills the queue is, and a duplicate fills no queue.

        With the hard byte limit and overflow policy ``refuse``, records every
        sink has passed are trimmed in the same transaction to make room for
        the batch's.  When that is not enough because some sink has not
        delivered the records in the way, RetentionFull is raised: none of the
        batch's records is stored (nor its queued deliveries and retained
        messages, which go with them), but ``ops.writes`` (delivery cursors,
        session state) and the trimming are committed, so that the sinks can
        go on and make room.  A batch larger than the whole limit is stored
        once nothing else is kept: no sink's backlog is in its way.
        """
        try:
            return self._append_once(items, now_ms, ops)
        except RetentionFull:
            raise
        except StoreFull:
            pass
        # Seen with py-lmdb 3.0 / LMDB 0.9: after retention freed pages in one large
        # transaction, a batch needing multi-page (overflow) records fails with
        # MDB_MAP_FULL again and again, because each failed transaction is aborted
        # and loses the free pages it had loaded from the free list.  A small
        # committed write makes LMDB take those pages up; then the batch fits.
        self._reclaim(now_ms)
        return self._append_once(items, now_ms, ops)

    def _reclaim(self, now_ms):
        try:
            with self._begin_write() as txn:
                txn.put(b"reclaimed_ms", _U64.pack(now_ms), db=self._meta)
        except lmdb.MapFullError:
            pass

    def _append_once(self, items, now_ms, ops):
        if not items:
            if ops:
                self._write_ops(ops, ())
            return []
        if type(items) is not list:
            items = list(items)
        # The per-item work is in C (pushcore/_ingest.pyx); what is left here
        # is per partition, plus one LMDB call per item that has an id.
        touched, with_ids = batch_partitions(items, self.partitions)
        horizon = now_ms - self.dedup_window_ms
        new_bytes = 0
        try:
            with self._writing("append to") as txn:
                if ops:
                    # Ahead of the records: making room for them (below) reads the
                    # cursors these may have moved.
                    self._apply_writes(txn, ops.writes)
                first_offsets = [self._next_offset(txn, partition) for partition in touched]
                duplicates = {}
                # partition -> duplicates so far: a duplicate takes no offset, so the
                # later items of its partition move down.
                behind = {}
                new_hashes = []
                stale_time_keys = []
                id_items = id_entries(items, self.partitions, touched, first_offsets,
                                      now_ms) if with_ids else ()
                put = txn.put
                ids_db = self._ids
                for index, partition, offset, ihash, entry in id_items:
                    if behind and partition in behind:
                        entry = _ID_ENTRY.pack(partition, offset - behind[partition], now_ms)
                    # Insert-if-absent is the dedup lookup: one B-tree descent, and
                    # an earlier item of this batch is found like an earlier commit.
                    # Positional (key, value, dupdata, overwrite=False, append, db): py-lmdb
                    # parses keywords noticeably slower, and this runs once per id.
                    if not put(ihash, entry, True, False, False, ids_db):
                        stored = txn.get(ihash, db=ids_db)
                        stored_partition, stored_offset, stored_ms = _ID_ENTRY.unpack(stored)
                        if stored_ms >= horizon:
                            duplicates[index] = (stored_partition, stored_offset, True)
                            behind[partition] = behind.get(partition, 0) + 1
                            continue
                        # Outside the window: store again; its old expiry entry goes.
                        stale_time_keys.append(stored[_ID_TIME] + ihash)
                        put(ihash, entry, db=ids_db)
                    new_hashes.append(ihash)
                results, rows_by_slot, sizes = batch_rows(items, self.partitions, touched,
                                                          first_offsets, duplicates)
                new_bytes = sum(sizes)
                kept = self.kept_bytes
                if self._refuse_overflow and new_bytes and \
                        kept + new_bytes > self.retention_hard_max_bytes:
                    kept = self._make_room(txn, now_ms, new_bytes)
                for partition, rows, size in zip(touched, rows_by_slot, sizes):
                    if not rows:
                        continue
                    consumed, added = txn.cursor(self._logs[partition]).putmulti(rows, append=True)
                    if added != consumed:
                        raise StoreError(f"log.p{partition:03d}: append out of key order")
                    kept_bytes, trim_mark = self._part_meta(txn, partition)
                    txn.put(self._part_keys[partition],
                            _PART_META.pack(kept_bytes + size, trim_mark), db=self._meta)
                if new_hashes:
                    self._index_times(txn, now_ms, new_hashes, stale_time_keys)
                if ops:
                    self._apply_item_ops(txn, ops, duplicates)
        except _NoRoom:
            raise self._refuse_records(ops, now_ms, new_bytes) from None
        self.kept_bytes = kept + new_bytes
        for partition, first, rows in zip(touched, first_offsets, rows_by_slot):
            self.next_offsets[partition] = first + len(rows)
        return results

    def _make_room(self, txn, now_ms, new_bytes):
        """Trim what every sink has passed until ``new_bytes`` more bytes fit under
        the hard limit; return the bytes kept then.  _NoRoom when they do not."""
        _, _, _, per_partition = self._trim(txn, now_ms, EXPIRE_MAX_DELETIONS, room=new_bytes)
        kept = sum(per_partition)
        if kept and kept + new_bytes > self.retention_hard_max_bytes:
            raise _NoRoom
        return kept

    def _refuse_records(self, ops, now_ms, new_bytes):
        """Commit a refused batch's writes and the room made so far; return the
        RetentionFull to raise, naming the sinks in the way."""
        with self._writing("write to") as txn:
            if ops:
                self._apply_writes(txn, ops.writes)
            _, _, _, per_partition = self._trim(txn, now_ms, EXPIRE_MAX_DELETIONS, room=new_bytes)
            behind = self._sinks_behind(txn)
        self.kept_bytes = sum(per_partition)
        if behind:
            why = f"sinks behind: {', '.join(behind)}"
        else:
            # Only when more than one transaction's worth of delivered records is
            # over the limit (it was lowered): expire() goes on trimming them.
            why = "trimming the delivered records over it is not finished"
        return RetentionFull(
            f"storage.retention.hard_max_bytes ({self.retention_hard_max_bytes} bytes) reached"
            f" with {self.kept_bytes} bytes of records kept and {new_bytes} more to store;"
            f" {why} (storage.retention.overflow: refuse)")

    def _sinks_behind(self, txn):
        """Names of the sinks whose cursor has not passed some partition's oldest record."""
        heads = []
        for partition, db in enumerate(self._logs):
            cursor = txn.cursor(db)
            if cursor.first():
                heads.append((partition, _U64.unpack(cursor.key())[0]))
        behind = []
        for name, sink_id in sorted(self._holding_sink_ids(txn).items(),
                                    key=lambda item: item[1]):
            for partition, head in heads:
                value = txn.get(cursor_key(sink_id, partition), db=self._cursor)
                if (_U64.unpack(value)[0] if value is not None else 0) <= head:
                    behind.append(name)
                    break
        return behind

    def _write_ops(self, ops, duplicates):
        with self._writing("write to") as txn:
            self._apply_writes(txn, ops.writes)
            self._apply_item_ops(txn, ops, duplicates)

    @contextlib.contextmanager
    def _writing(self, what):
        """A write transaction, committed when the block ends and aborted when it
        raises; LMDB's errors come out as StoreFull (the map is full) or as
        StoreError saying ``what`` failed ("append to", "replay in")."""
        txn = self._begin_write()
        try:
            yield txn
            txn.commit()
        except lmdb.MapFullError as exc:
            txn.abort()
            raise StoreFull(f"store at {self.path} is full (map_size"
                            f" {self._env.info()['map_size']} bytes)") from exc
        except lmdb.Error as exc:
            txn.abort()
            raise StoreError(f"{what} {self.path} failed: {exc}") from exc
        except BaseException:
            txn.abort()
            raise

    def _apply_writes(self, txn, writes):
        """Write StoreOps.writes, in order."""
        dbs = {b"session": self._session, b"queue": self._queue, b"cursor": self._cursor,
               b"retry": self._retry, b"dlq": self._dlq}
        for kind, name, key, value in writes:
            if kind == OP_PUT:
                txn.put(key, value, db=dbs[name])
            elif kind == OP_DELETE:
                txn.delete(key, db=dbs[name])
            else:
                self._delete_prefix(txn, self._queue, key, value)

    def _apply_item_ops(self, txn, ops, duplicates):
        """Write the StoreOps tied to the batch's items; those of a duplicate are skipped."""
        queue_db = self._queue
        for index, key, value in ops.queued:
            if index not in duplicates:
                txn.put(key, value, db=queue_db)
        retained_db = self._retained
        for index, topic, record in ops.retained:
            if index in duplicates:
                continue
            key = retained_key(topic)
            if record is None:
                txn.delete(key, db=retained_db)
            else:
                txn.put(key, record, db=retained_db)

    @staticmethod
    def _delete_prefix(txn, db, prefix, limit):
        """Delete the keys starting with ``prefix``: all of them, or the first ``limit``."""
        cursor = txn.cursor(db)
        deleted = 0
        if not cursor.set_range(prefix):
            return
        while cursor.key()[:len(prefix)] == prefix and (limit is None or deleted < limit):
            if not cursor.delete():
                break
            deleted += 1
            if not cursor.key():
                break

    def _index_times(self, txn, now_ms, new_hashes, stale_time_keys):
        """Write the ids.time entries of ids stored at ``now_ms``."""
        ids_time = self._ids_time
        for key in stale_time_keys:
            txn.delete(key, db=ids_time)
        prefix = _U64.pack(now_ms)
        new_hashes.sort()
        rows = [(prefix + ihash, b"") for ihash in new_hashes]
        cursor = txn.cursor(ids_time)
        # With a clock that moves forward every batch lands past the last key,
        # where append=True fills pages without splitting them.
        at_end = not cursor.last() or cursor.key() < rows[0][0]
        cursor.putmulti(rows, append=at_end)

    def expire(self, now_ms, max_deletions=EXPIRE_MAX_DELETIONS):
        """Trim partitions past retention and drop dedup ids past the window.

        One write transaction doing at most ``max_deletions`` deletions;
        ``more`` in the result is True when that bound stopped the work and
        the caller should call again.  Offsets are never reused.

        Deleting needs free pages too (LMDB copies each page it changes and
        frees the old copy only at commit), so in a full map a large
        transaction can fail where a small one succeeds: on MapFullError the
        work is retried in a transaction an eighth the size, down to one
        deletion, before StoreFull is raised.
        """
        if max_deletions < 1:
            raise ValueError(f"max_deletions must be at least 1, not {max_deletions}")
        budget = max_deletions
        while True:
            try:
                return self._expire_once(now_ms, budget)
            except lmdb.MapFullError as exc:
                if budget <= 1:
                    raise StoreFull(f"store at {self.path} is full and even one deletion"
                                    f" does not fit; reopen it with a larger map_size") from exc
                budget = max(1, budget // 8)

    def _expire_once(self, now_ms, budget):
        txn = self._begin_write()
        try:
            # Trimming first: it frees whole pages from the head of each
            # partition, where expiring ids touches pages all over `ids`.
            records, trimmed_bytes, undelivered, per_partition = self._trim(txn, now_ms, budget)
            ids_expired, id_work = self._expire_ids(txn, now_ms - self.dedup_window_ms,
                                                    budget - records)
            txn.commit()
        except lmdb.MapFullError:
            txn.abort()
            raise
        except lmdb.Error as exc:
            txn.abort()
            raise StoreError(f"expire in {self.path} failed: {exc}") from exc
        except BaseException:
            txn.abort()
            raise
        if per_partition is not None:
            # Read from every partition's meta: this also takes in what another
            # process sharing the environment appended.
            self.kept_bytes = sum(per_partition)
        return {"ids_expired": ids_expired, "records_trimmed": records,
                "bytes_trimmed": trimmed_bytes, "records_trimmed_undelivered": undelivered,
                "more": records + id_work >= budget}

    def _expire_ids(self, txn, horizon, budget):
        """Delete ids stored before ``horizon``; return (ids deleted, work done)."""
        if horizon <= 0 or budget <= 0:
            return 0, 0
        horizon_prefix = _U64.pack(horizon)
        cursor = txn.cursor(self._ids_time)
        ids_db = self._ids
        expired = work = 0
        if not cursor.first():
            return 0, 0
        while work < budget:
            key = cursor.key()
            if not key or key[:8] >= horizon_prefix:
                break
            # One ids.time entry per id: append_batch deletes the old one when
            # it stores an id again.
            if txn.delete(key[8:], db=ids_db):
                expired += 1
            cursor.delete()
            work += 1
        return expired, work

    def _trim(self, txn, now_ms, budget, room=None):
        """Trim partition heads by age, then by total bytes, oldest first.

        ``room`` (policy refuse, for append_batch): only trim what every sink
        has passed, until ``room`` more bytes fit under the hard limit.

        Returns (records trimmed, bytes trimmed, records trimmed that some sink
        had not passed, record bytes kept per partition after it, or None when
        no retention limit is set).
        """
        max_age = self.retention_max_age_ms
        max_bytes = self.retention_max_bytes
        hard_max = self.retention_hard_max_bytes
        if budget <= 0 or (max_age <= 0 and max_bytes <= 0 and hard_max <= 0):
            return 0, 0, 0, None
        metas = [list(self._part_meta(txn, p)) for p in range(self.partitions)]
        cursors = [txn.cursor(db) for db in self._logs]
        # The first offset some sink has not passed, per partition (None: no sink).
        floors = self._floors(txn)
        changed = set()
        records = trimmed_bytes = undelivered = 0

        def trimmable(partition, floor=True):
            cursor = cursors[partition]
            if not cursor.key():
                return False
            return not floor or floors is None or \
                _U64.unpack(cursor.key())[0] < floors[partition]

        def trim_head(partition):
            cursor = cursors[partition]
            size = len(cursor.value())
            metas[partition][0] -= size
            metas[partition][1] = _U64.unpack(cursor.key())[0] + 1
            changed.add(partition)
            cursor.delete()
            return size

        def trim_by_bytes(limit, floor):
            nonlocal records, trimmed_bytes, undelivered
            total = sum(meta[0] for meta in metas)
            # (head record time, tie-break sequence, partition): equal times are
            # taken round-robin rather than draining the lowest partition first.
            heads = [(record_time_ms(cursors[p].value()), p, p)
                     for p in range(self.partitions) if trimmable(p, floor)]
            heapq.heapify(heads)
            sequence = self.partitions
            while total > limit and records < budget and heads:
                _, _, partition = heapq.heappop(heads)
                if floors is not None and \
                        _U64.unpack(cursors[partition].key())[0] >= floors[partition]:
                    undelivered += 1
                size = trim_head(partition)
                total -= size
                trimmed_bytes += size
                records += 1
                if trimmable(partition, floor):
                    heapq.heappush(heads, (record_time_ms(cursors[partition].value()),
                                           sequence, partition))
                    sequence += 1

        for cursor in cursors:
            cursor.first()
        if room is not None:
            trim_by_bytes(hard_max - room, True)
        else:
            if max_age > 0:
                cutoff = now_ms - max_age
                for partition in range(self.partitions):
                    while records < budget and trimmable(partition):
                        if record_time_ms(cursors[partition].value()) >= cutoff:
                            break
                        trimmed_bytes += trim_head(partition)
                        records += 1
            if max_bytes > 0:
                trim_by_bytes(max_bytes, True)
            if hard_max > 0:
                # drop_oldest: past the hard limit the sinks' cursors do not protect
                # records.  refuse: they do; append_batch refuses what does not fit.
                trim_by_bytes(hard_max, self._refuse_overflow)
        for partition in changed:
            txn.put(self._part_keys[partition], _PART_META.pack(*metas[partition]),
                    db=self._meta)
        return records, trimmed_bytes, undelivered, [meta[0] for meta in metas]

    def _floors(self, txn):
        """Per partition, the lowest cursor of the sinks that hold records back; None
        when none does."""
        sinks = self._holding_sink_ids(txn)
        if not sinks:
            return None
        floors = [None] * self.partitions
        for sink_id in sinks.values():
            for partition in range(self.partitions):
                value = txn.get(cursor_key(sink_id, partition), db=self._cursor)
                offset = _U64.unpack(value)[0] if value is not None else 0
                if floors[partition] is None or offset < floors[partition]:
                    floors[partition] = offset
        return floors

    def _sink_ids(self, txn):
        value = txn.get(b"sinks", db=self._meta)
        return json.loads(value) if value is not None else {}

    def _holding_sink_ids(self, txn):
        # Only the sinks configured now (register_sinks) hold records back: a sink
        # taken out of the configuration keeps its id, cursors and dead letters, but
        # would otherwise keep every record after its cursor for good.
        sinks = self._sink_ids(txn)
        if self.holding_sinks is None:
            return sinks
        return {name: sink_id for name, sink_id in sinks.items() if name in self.holding_sinks}

    # -- delivery state (cursors, retry queue, dead letters) ---------------------------

    def register_sinks(self, names):
        """Give each sink name a u16 id, kept in meta for good; returns {name: id} of
        every sink ever registered.

        From now on only these sinks hold records back (retention, the hard
        limit); those registered before and not named here no longer do.
        """
        self.holding_sinks = frozenset(names)
        txn = self._begin_write()
        try:
            sinks = self._sink_ids(txn)
            for name in names:
                if name not in sinks:
                    if len(sinks) >= 0xFFFF:
                        raise StoreError("no sink id left (65535 sinks registered)")
                    sinks[name] = max(sinks.values(), default=0) + 1
            txn.put(b"sinks", json.dumps(sinks).encode(), db=self._meta)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return dict(sinks)

    def sinks(self):
        """{sink name: sink id} of every sink ever registered."""
        with self._env.begin() as txn:
            return self._sink_ids(txn)

    def cursors(self):
        """{(sink id, partition): next offset} for every stored cursor."""
        with self._env.begin() as txn:
            return {_CURSOR_KEY.unpack(key): _U64.unpack(value)[0]
                    for key, value in txn.cursor(self._cursor)}

    def retry_due(self, now_ms, limit=None):
        """Retry entries due at ``now_ms`` or before, earliest first.

        Each is (key, due ms, sink id, partition, offset, attempts, status, error, record).
        """
        out = []
        bound = _U64.pack(now_ms + 1)
        with self._env.begin() as txn:
            for key, value in txn.cursor(self._retry):
                if key[:8] >= bound or (limit is not None and len(out) >= limit):
                    break
                due, sink_id, partition, offset = _RETRY_KEY.unpack(key)
                out.append((bytes(key), due, sink_id, partition, offset,
                            *decode_failure(value)))
        return out

    def dead_letters(self, sink_id=None, since_ms=None, until_ms=None, limit=None):
        """Dead-letter entries, oldest first per sink, optionally of one sink and a time range.

        Each is (key, sink id, time ms, partition, offset, attempts, status, error, record).
        """
        out = []
        start = _U16.pack(sink_id) if sink_id is not None else b""
        with self._env.begin() as txn:
            cursor = txn.cursor(self._dlq)
            if not cursor.set_range(start):
                return out
            for key, value in cursor:
                if limit is not None and len(out) >= limit:
                    break
                sid, time_ms, partition, offset = _DLQ_KEY.unpack(key)
                if sink_id is not None and sid != sink_id:
                    break
                if (since_ms is not None and time_ms < since_ms) or \
                        (until_ms is not None and time_ms > until_ms):
                    continue
                out.append((bytes(key), sid, time_ms, partition, offset,
                            *decode_failure(value)))
        return out

    def delivery_counts(self):
        """{sink id: (retries pending, dead letters)}."""
        counts = {}
        with self._env.begin() as txn:
            for key in txn.cursor(self._retry).iternext(keys=True, values=False):
                sink_id = _RETRY_KEY.unpack(key)[1]
                pending, dead = counts.get(sink_id, (0, 0))
                counts[sink_id] = (pending + 1, dead)
            for key in txn.cursor(self._dlq).iternext(keys=True, values=False):
                sink_id = _DLQ_KEY.unpack(key)[0]
                pending, dead = counts.get(sink_id, (0, 0))
                counts[sink_id] = (pending, dead + 1)
        return counts

    def replay_dead_letters(self, keys, now_ms):
        """Move dead letters back into the retry queue, due at ``now_ms``; returns how many.

        In ONE write transaction, each of ``keys`` still in ``dlq`` is deleted
        there and put in ``retry`` for the same sink, partition and offset with
        attempts 0 (a full retry budget) and its last status, error and record.
        A key already gone (replayed or purged by someone else) is skipped.  The
        same record dead-lettered twice becomes one retry entry but counts twice.
        Safe beside a running daemon: LMDB serialises writers across processes.
        """
        replayed = 0
        with self._writing("replay in") as txn:
            for key in keys:
                value = txn.pop(key, db=self._dlq)
                if value is None:
                    continue
                sink_id, _dead_ms, partition, offset = _DLQ_KEY.unpack(key)
                # The failure value starts with its u32 attempts; the rest
                # (status, error, record) is kept byte for byte.
                txn.put(retry_key(now_ms, sink_id, partition, offset),
                        _U32.pack(0) + value[_U32.size:], db=self._retry)
                replayed += 1
        return replayed

    def purge_dead_letters(self, keys):
        """Delete dead letters in one write transaction; returns how many were there."""
        purged = 0
        with self._writing("purge in") as txn:
            for key in keys:
                if txn.delete(key, db=self._dlq):
                    purged += 1
        return purged

    def read(self, partition, start_offset=0, limit=None):
        """Return up to ``limit`` (offset, record) pairs from ``start_offset`` on."""
        self._check_partition(partition)
        with self._env.begin() as txn:
            cursor = txn.cursor(self._logs[partition])
            if not cursor.set_range(_U64.pack(start_offset)):
                return []
            unpack = _U64.unpack
            return [(unpack(key)[0], value)
                    for key, value in itertools.islice(cursor.iternext(), limit)]

    def read_raw(self, partition, start_offset, limit):
        """Up to ``limit`` (key, record) pairs from ``start_offset`` on, the keys as
        stored (the offset as a big-endian u64): what a sink reads, one call per
        chunk, for ``pushcore._ingest.select_records`` to walk in C."""
        self._check_partition(partition)
        with self._env.begin() as txn:
            cursor = txn.cursor(self._logs[partition])
            if not cursor.set_range(_U64.pack(start_offset)):
                return []
            return list(itertools.islice(cursor.iternext(), limit))

    def first_offset(self, partition):
        """Offset of the oldest kept record; the next offset when the partition is empty."""
        self._check_partition(partition)
        with self._env.begin() as txn:
            cursor = txn.cursor(self._logs[partition])
            if cursor.first():
                return _U64.unpack(cursor.key())[0]
            return self._part_meta(txn, partition)[1]

    def lookup_id(self, id_hash):
        """(partition, offset, time_ms) stored for an id hash, or None."""
        with self._env.begin() as txn:
            entry = txn.get(id_hash, db=self._ids)
        return _ID_ENTRY.unpack(entry) if entry is not None else None

    def sessions(self):
        """Every stored MQTT session with its queue's size, sorted by client id."""
        out = []
        with self._env.begin() as txn:
            queue = txn.cursor(self._queue)
            for key, value in txn.cursor(self._session):
                session = json.loads(value)
                client = key.decode()
                prefix = queue_prefix(client)
                queued = queued_bytes = inflight = 0
                if queue.set_range(prefix):
                    for qkey, qvalue in queue:
                        if qkey[:len(prefix)] != prefix:
                            break
                        queued += 1
                        entry = decode_queue_value(qvalue)
                        queued_bytes += len(entry[5])
                        if entry[1] & QUEUE_SENT:
                            inflight += 1
                out.append({"client_id": client, "version": session["version"],
                            "expiry": session["expiry"], "subs": session["subs"],
                            "disconnected_ms": session.get("disconnected_ms", 0),
                            "queued": queued, "queued_bytes": queued_bytes,
                            "inflight": inflight})
        return out

    def queue(self, client_id, limit=None):
        """A session's queued deliveries: (seq, qos, flags, packet id, sub ids, share, record)."""
        prefix = queue_prefix(client_id)
        out = []
        with self._env.begin() as txn:
            cursor = txn.cursor(self._queue)
            if not cursor.set_range(prefix):
                return out
            for key, value in cursor:
                if key[:len(prefix)] != prefix or (limit is not None and len(out) >= limit):
                    break
                qos, flags, packet_id, sub_ids, share, record = decode_queue_value(value)
                out.append((_U64.unpack(key[len(prefix):])[0], qos, flags, packet_id,
                            sub_ids, share, record))
        return out

    def load_sessions(self):
        """Every stored session, and the queue prefixes no session owns.

        Returns ([(client id, session JSON dict, [(seq, queue value), ...])],
        [orphan prefix, ...]).  An orphan is left by a session whose end was
        not committed before a crash; the broker deletes it.
        """
        out = []
        owned = set()
        with self._env.begin() as txn:
            queue = txn.cursor(self._queue)
            for key, value in txn.cursor(self._session):
                client = key.decode()
                prefix = queue_prefix(client)
                owned.add(prefix)
                entries = []
                if queue.set_range(prefix):
                    for qkey, qvalue in queue:
                        if qkey[:len(prefix)] != prefix:
                            break
                        entries.append((_U64.unpack(qkey[len(prefix):])[0], bytes(qvalue)))
                out.append((client, json.loads(value), entries))
            orphans = []
            seen = None
            for qkey in txn.cursor(self._queue).iternext(keys=True, values=False):
                prefix = qkey[:2 + int.from_bytes(qkey[:2], "big")]
                if prefix != seen:
                    seen = prefix
                    if prefix not in owned:
                        orphans.append(prefix)
        return out, orphans

    def retained(self):
        """Every retained message: {topic: record bytes} (the topic read from the record)."""
        with self._env.begin() as txn:
            return {record_fields(bytes(value))[2]: bytes(value)
                    for _key, value in txn.cursor(self._retained)}

    def stats(self):
        per_partition = []
        with self._env.begin() as txn:
            for partition, db in enumerate(self._logs):
                cursor = txn.cursor(db)
                kept_bytes, trim_mark = self._part_meta(txn, partition)
                if cursor.first():
                    first = _U64.unpack(cursor.key())[0]
                    cursor.last()
                    next_offset = _U64.unpack(cursor.key())[0] + 1
                else:
                    first = next_offset = trim_mark
                per_partition.append({"partition": partition, "first": first,
                                      "next": next_offset, "count": txn.stat(db)["entries"],
                                      "bytes": kept_bytes})
            ids = txn.stat(self._ids)["entries"]
        info = self._env.info()
        page_size = self._env.stat()["psize"]
        return {
            "path": self.path,
            "partitions": self.partitions,
            "durability": self.durability,
            "map_size": info["map_size"],
            # High-water mark of the data file; pages freed by expire are reused
            # from inside it.
            "used_bytes": (info["last_pgno"] + 1) * page_size,
            "ids": ids,
            "records": sum(p["count"] for p in per_partition),
            "bytes": sum(p["bytes"] for p in per_partition),
            "per_partition": per_partition,
        }

    def close(self):
        if self._env is None:
            return
        if not self.readonly and self.durability == "os":
            # A clean shutdown puts everything on disk even in "os" mode.
            self._env.sync(True)
        self._env.close()
        self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
