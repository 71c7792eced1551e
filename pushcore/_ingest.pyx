"""The ingest hot path in C: PUBLISH -> record -> batch, and commit -> acks.

The project rule is that Python is entered once per ``recv``, not once per
message.  ``_frame.Parser`` splits every packet of a ``recv`` in one call;
``ConnState.ingest_publishes`` then turns the run of ordinary PUBLISH packets
that follows into records in one call, and ``ack_committed`` writes the acks of
a whole committed batch in one call.

What is here is the common case only.  ``pushcore/mqtt.py`` stays the
description of the protocol: anything unusual (topic aliases, a Payload Format
Indicator, other properties, JSON ids, errors, a Receive Maximum overrun) stops
the C loop, and ``MQTTServerConnection.handle_publish`` handles that packet as
it always did.  The record format is written down in ``pushcore/record.py``,
which re-exports ``encode_record``, ``partition_for`` and ``id_hash`` from here
so that there is one encoder.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from pushcore._frame cimport Publish

import mmh3

from pushcore.errors import QuotaExceeded

# Waiter index of an ack owed for a copy whose original was refused (see Batch).
RESEND_OF_REFUSED = -2

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL


STATE_CONNECTING = CS_CONNECTING
STATE_CONNECTED = CS_CONNECTED
STATE_CLOSED = CS_CLOSED

# MQTT 3.1.1 §3.1.2.2: protocol level 4; MQTT 5.0 §3.1.2.2: protocol version 5.
cdef enum:
    MQTT311 = 4
    MQTT5 = 5

# MQTT 5.0 §2.1.2: PUBACK and PUBREC packet types.
cdef enum:
    PT_PUBACK = 4
    PT_PUBREC = 5

# MQTT 5.0 §3.3.2.3.7: User Property identifier.
cdef enum:
    PROP_USER_PROPERTY = 0x26

# Record format version 1 (pushcore/record.py has the byte-by-byte layout).
cdef enum:
    FORMAT_VERSION = 1
    FLAG_RETAIN = 0x04
    FLAG_HAS_ID = 0x08
    FLAG_HAS_KEY = 0x10
    FLAG_HAS_PROPERTIES = 0x20
    # version, flags, time_ms, topic length
    HEAD_SIZE = 12

cdef Py_ssize_t U16_MAX = 0xFFFF
cdef Py_ssize_t U32_MAX = 0xFFFFFFFF

cdef object _hash_bytes = mmh3.hash_bytes
cdef bytes _NUL = b"\0"
cdef bytes _EMPTY = b""


# ---------------------------------------------------------------------------
# Hashes that place a record

cdef inline uint32_t _rotl32(uint32_t x, int r) noexcept nogil:
    return (x << r) | (x >> (32 - r))


cdef uint32_t murmur3_32(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """MurmurHash3 x86_32 with seed 0 (Appleby's reference), as mmh3.hash(signed=False)."""
    cdef uint32_t c1 = 0xCC9E2D51
    cdef uint32_t c2 = 0x1B873593
    cdef uint32_t c3 = 0xE6546B64
    cdef uint32_t m1 = 0x85EBCA6B
    cdef uint32_t m2 = 0xC2B2AE35
    cdef uint32_t h = 0
    cdef uint32_t k
    cdef Py_ssize_t nblocks = n // 4
    cdef Py_ssize_t i
    cdef const unsigned char* b
    for i in range(nblocks):
        b = data + 4 * i
        k = (<uint32_t>b[0] | (<uint32_t>b[1] << 8) | (<uint32_t>b[2] << 16)
             | (<uint32_t>b[3] << 24))
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
        h = _rotl32(h, 13)
        h = h * 5 + c3
    b = data + 4 * nblocks
    k = 0
    if n & 3 == 3:
        k ^= <uint32_t>b[2] << 16
    if n & 3 >= 2:
        k ^= <uint32_t>b[1] << 8
    if n & 3 >= 1:
        k ^= b[0]
        k *= c1
        k = _rotl32(k, 15)
        k *= c2
        h ^= k
    h ^= <uint32_t>n
    h ^= h >> 16
    h *= m1
    h ^= h >> 13
    h *= m2
    h ^= h >> 16
    return h


def partition_for(key, partitions):
    """The partition of an ordering key: murmur3 x86_32, unsigned, mod N."""
    cdef const unsigned char[:] view
    cdef const char* text
    cdef Py_ssize_t n
    if isinstance(key, str):
        # As mmh3 does: a str key is hashed as its UTF-8.
        text = PyUnicode_AsUTF8AndSize(key, &n)
        return murmur3_32(<const unsigned char*>text, n) % partitions
    view = key
    if view.shape[0] == 0:
        return murmur3_32(NULL, 0) % partitions
    return murmur3_32(&view[0], view.shape[0]) % partitions


cdef inline bytes _id_hash(bytes scope, bytes msg_id):
    return _hash_bytes(scope + _NUL + msg_id)


def id_hash(scope, msg_id):
    """The 16-byte dedup key of a message id within a scope (murmur3 x64_128).

    The NUL separator keeps (b"ab", b"c") and (b"a", b"bc") apart.
    """
    return _hash_bytes(scope + _NUL + msg_id)


# ---------------------------------------------------------------------------
# The record encoder (format: pushcore/record.py)

cdef inline unsigned char* _put_u16(unsigned char* w, Py_ssize_t n) noexcept nogil:
    w[0] = (n >> 8) & 0xFF
    w[1] = n & 0xFF
    return w + 2


cdef inline unsigned char* _put_field16(unsigned char* w, const char* s, Py_ssize_t n) noexcept nogil:
    w = _put_u16(w, n)
    memcpy(w, s, n)
    return w + n


cdef bytes _encode_record(uint64_t time_ms, const char* topic, Py_ssize_t topic_len,
                          const char* client, Py_ssize_t client_len, bytes payload, int qos,
                          bint retain, bytes msg_id, bytes key, bytes properties):
    cdef Py_ssize_t size, props_len, payload_len = PyBytes_GET_SIZE(payload)
    cdef int flags = qos
    cdef bytes out
    cdef unsigned char* w
    cdef int shift
    if topic_len > U16_MAX or client_len > U16_MAX:
        raise ValueError("topic and client id are limited to 65535 bytes")
    if retain:
        flags |= FLAG_RETAIN
    size = HEAD_SIZE + topic_len + 2 + client_len + payload_len
    if msg_id is not None:
        if PyBytes_GET_SIZE(msg_id) > U16_MAX:
            raise ValueError("message id is limited to 65535 bytes")
        flags |= FLAG_HAS_ID
        size += 2 + PyBytes_GET_SIZE(msg_id)
    if key is not None:
        if PyBytes_GET_SIZE(key) > U16_MAX:
            raise ValueError("ordering key is limited to 65535 bytes")
        flags |= FLAG_HAS_KEY
        size += 2 + PyBytes_GET_SIZE(key)
    # Properties are present exactly when non-empty.
    props_len = PyBytes_GET_SIZE(properties) if properties is not None else 0
    if props_len:
        if props_len > U32_MAX:
            raise ValueError("properties are limited to 4 GiB")
        flags |= FLAG_HAS_PROPERTIES
        size += 4 + props_len
    out = PyBytes_FromStringAndSize(NULL, size)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    w[0] = FORMAT_VERSION
    w[1] = flags
    for shift in range(8):
        w[2 + shift] = (time_ms >> (56 - 8 * shift)) & 0xFF
    w = _put_field16(w + 10, topic, topic_len)
    w = _put_field16(w, client, client_len)
    if msg_id is not None:
        w = _put_field16(w, PyBytes_AS_STRING(msg_id), PyBytes_GET_SIZE(msg_id))
    if key is not None:
        w = _put_field16(w, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
    if props_len:
        w[0] = (props_len >> 24) & 0xFF
        w[1] = (props_len >> 16) & 0xFF
        w[2] = (props_len >> 8) & 0xFF
        w[3] = props_len & 0xFF
        memcpy(w + 4, PyBytes_AS_STRING(properties), props_len)
        w += 4 + props_len
    memcpy(w, PyBytes_AS_STRING(payload), payload_len)
    return out


cdef inline bytes _as_bytes(object value):
    return value if type(value) is bytes else bytes(memoryview(value))


def encode_record(time_ms, topic, payload, qos=0, retain=False, msg_id=None, key=None,
                  client_id="", properties=b""):
    """Return the stored bytes of one record (format: pushcore/record.py)."""
    cdef const char* t
    cdef const char* c
    cdef Py_ssize_t tn, cn
    if type(qos) is not int or not 0 <= qos <= 2:
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    t = PyUnicode_AsUTF8AndSize(topic, &tn)
    c = PyUnicode_AsUTF8AndSize(client_id, &cn)
    return _encode_record(time_ms, t, tn, c, cn, _as_bytes(payload), qos, retain,
                          None if msg_id is None else _as_bytes(msg_id),
                          None if key is None else _as_bytes(key),
                          _as_bytes(properties) if properties else _EMPTY)


cdef bytes _user_properties(list pairs):
    """The wire property section (no length prefix) holding only these User Properties.

    Byte-for-byte what ``_frame.encode_properties({"user_property": pairs})``
    gives (MQTT 5.0 §3.3.2.3.7: identifier 0x26, then two UTF-8 strings).
    """
    cdef Py_ssize_t size = 0, n, m
    cdef const char* s
    cdef const char* v
    cdef bytes out
    cdef unsigned char* w
    for name, value in pairs:
        PyUnicode_AsUTF8AndSize(name, &n)
        PyUnicode_AsUTF8AndSize(value, &m)
        size += 5 + n + m
    out = PyBytes_FromStringAndSize(NULL, size)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    for name, value in pairs:
        s = PyUnicode_AsUTF8AndSize(name, &n)
        v = PyUnicode_AsUTF8AndSize(value, &m)
        w[0] = PROP_USER_PROPERTY
        w = _put_field16(w + 1, s, n)
        w = _put_field16(w, v, m)
    return out


# ---------------------------------------------------------------------------
# The pending batch

cdef class Batch:
    """Records waiting for one group commit, and who waits for each.

    ``items`` is exactly what ``Log.append_batch`` takes: (partition, id hash
    or None, record bytes).  ``waiters`` is (connection, packet id, qos,
    index into ``items``) in the order the publishes arrived, so acks leave in
    that order (MQTT 5.0 §4.6).  QoS 0 records wait for nobody.  An index of
    -1 is an ack owed for a message an earlier batch stored (a QoS 2 PUBLISH
    re-sent before PUBREL): batches commit in order, so it goes out with this
    one.  ``RESEND_OF_REFUSED`` (-2) is such an ack whose original the store
    refused: it is answered 0x97 like the original.
    """

    def __cinit__(self):
        self.items = []
        self.waiters = []
        self.nbytes = 0
        self.nretain = 0

    def __len__(self):
        return len(self.items) + len(self.waiters)

    cdef int _add(self, object partition, object idh, bytes record, object conn,
                  object packet_id, object qos) except -1:
        cdef list items = self.items
        if conn is not None:
            self.waiters.append((conn, packet_id, qos, len(items)))
        items.append((partition, idh, record))
        self.nbytes += PyBytes_GET_SIZE(record)
        # Record flags bit 2 is retain (pushcore/record.py): the broker skips routing
        # a batch with no retained message while nobody subscribes.
        if (<const unsigned char*>PyBytes_AS_STRING(record))[1] & 0x04:
            self.nretain += 1
        return 0

    def add(self, partition, idh, bytes record not None, conn, packet_id, qos):
        self._add(partition, idh, record, conn, packet_id, qos)

    def add_ack_only(self, conn, packet_id, qos):
        self.waiters.append((conn, packet_id, qos, -1))

    def extend(self, Batch other not None):
        """Append another batch's records and waiters after this one's."""
        cdef Py_ssize_t base = len(self.items)
        cdef Py_ssize_t index
        self.items.extend(other.items)
        for conn, packet_id, qos, index in other.waiters:
            self.waiters.append((conn, packet_id, qos, index + base if index >= 0 else index))
        self.nbytes += other.nbytes
        self.nretain += other.nretain


cdef class Ingest:
    """Builds records for a batch from what a publisher sent.

    Holds the store-wide choices every protocol shares: partition count, the
    dedup scope and the current time (set by the server once per loop
    iteration, so the hot path never reads the clock).
    """

    def __init__(self, Py_ssize_t partitions, bint scope_global=True):
        self.partitions = partitions
        self.scope_global = scope_global
        self.batch = Batch()
        self.now_ms = 0

    cdef int _add(self, str topic, bytes payload, int qos, bint retain, bytes msg_id,
                  bytes key, str client_id, bytes properties, object conn,
                  int packet_id) except -1:
        cdef const char* t
        cdef const char* c
        cdef Py_ssize_t tn, cn
        cdef object part = 0
        cdef object idh = None
        t = PyUnicode_AsUTF8AndSize(topic, &tn)
        c = PyUnicode_AsUTF8AndSize(client_id, &cn)
        record = _encode_record(self.now_ms, t, tn, c, cn, payload, qos, retain, msg_id, key,
                                properties)
        if self.partitions > 1:
            # The ordering key defaults to the client id: each publisher's order is kept.
            if key is not None:
                part = murmur3_32(<const unsigned char*>PyBytes_AS_STRING(key),
                                  PyBytes_GET_SIZE(key)) % <uint32_t>self.partitions
            else:
                part = murmur3_32(<const unsigned char*>c, cn) % <uint32_t>self.partitions
        if msg_id is not None:
            idh = _id_hash(_EMPTY if self.scope_global else PyBytes_FromStringAndSize(c, cn),
                           msg_id)
        self.batch._add(part, idh, record, conn, packet_id, qos)
        return 0

    def add(self, str topic not None, bytes payload not None, int qos, retain, bytes msg_id,
            bytes key, str client_id not None, bytes properties, conn, int packet_id):
        """Append one message; ``msg_id``/``key`` are bytes or None."""
        if not 0 <= qos <= 2:
            raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
        self._add(topic, payload, qos, bool(retain), msg_id, key, client_id, properties, conn,
                  packet_id)

    def add_ack_only(self, conn, packet_id, qos):
        self.batch.add_ack_only(conn, packet_id, qos)

    def take(self):
        """Hand the filled batch to the writer and start a new one."""
        cdef Batch batch = self.batch
        self.batch = Batch()
        return batch


# ---------------------------------------------------------------------------
# The connection's hot fields and loops

cdef class ConnState:
    """What the C loops read and write of one MQTT server connection.

    ``MQTTServerConnection`` (pushcore/mqtt.py) inherits it; the fields are
    ordinary attributes there.  ``ingest_publishes`` is the common case of
    ``handle_publish`` for a run of packets; ``ack_committed`` is ``committed``
    for a whole batch.  Both must stay exactly in step with those methods
    (tests/test_ingest_fast.py compares them byte for byte).
    """

    def ingest_publishes(self, list packets, Py_ssize_t i):
        """Handle the ordinary PUBLISH packets from packets[i]; return the index reached.

        Stops at the first packet that is not one (or when the connection is
        not CONNECTED); the caller dispatches that one through the
        ``handle_<verb>`` table.  Ordinary: QoS within Maximum QoS, and no
        properties but User Properties (which pick the message id and the
        ordering key), and no JSON id to look for in a 3.1.1 payload.
        """
        cdef Py_ssize_t n = len(packets)
        cdef object settings = self.settings
        cdef int max_qos = settings.max_qos
        cdef Py_ssize_t receive_maximum = settings.receive_maximum
        cdef object id_name = settings.id_property
        cdef object key_name = settings.key_property
        cdef bint json_ids = settings.json_field is not None
        cdef Ingest ingest = self.ingest
        cdef Publish p
        cdef dict props
        cdef list user
        cdef bytes msg_id, key, raw_props
        cdef int qos, packet_id
        while i < n and self.state == CS_CONNECTED:
            packet = packets[i]
            if type(packet) is not Publish:
                break
            p = <Publish>packet
            qos = p.qos
            if qos > max_qos:
                break
            props = p.properties
            msg_id = key = None
            raw_props = _EMPTY
            if props is not None:
                if len(props) != 1:
                    break
                user = props.get("user_property")
                if user is None:
                    break
                for name, value in user:
                    if name == id_name:
                        msg_id = (<str>value).encode()
                    elif name == key_name:
                        key = (<str>value).encode()
                raw_props = _user_properties(user)
            elif json_ids and self.version == MQTT311:
                break
            if qos == 0:
                ingest._add(p.topic, p.payload, 0, p.retain, msg_id, key, self.client_id,
                            raw_props, None, 0)
                i += 1
                continue
            packet_id = p.packet_id
            if qos == 2 and packet_id in self.qos2_received:
                # MQTT 5.0 §4.3.3: a re-sent QoS 2 PUBLISH before PUBREL is stored once.
                self.inflight += 1
                ingest.batch.waiters.append((self, packet_id, 2, -1))
                i += 1
                continue
            if self.version == MQTT5 and self.inflight >= receive_maximum:
                # handle_publish disconnects with 0x93 Receive Maximum exceeded.
                break
            self.inflight += 1
            if qos == 2:
                self.qos2_received.add(packet_id)
            ingest._add(p.topic, p.payload, qos, p.retain, msg_id, key, self.client_id,
                        raw_props, self, packet_id)
            i += 1
        return i


def ack_committed(list waiters):
    """Ack every waiter of a committed batch, in order; return the connections acked.

    For each one this is exactly ``proto.committed(packet_id, qos)``: one
    fewer in flight and, unless the connection is closed, the 4-byte
    PUBACK/PUBREC (MQTT 5.0 §3.4.2.1: Success with no properties omits the
    reason code, in both versions).  A connection holding refusals for after
    some of these acks goes through ``committed`` itself, which releases them.
    Called only after the commit returned: no ack before commit.
    """
    cdef set acked = set()
    cdef ConnState conn
    cdef Py_ssize_t size
    cdef int packet_id, qos
    cdef unsigned char* w
    for proto, packet_id_obj, qos_obj, index in waiters:
        if index == RESEND_OF_REFUSED:
            # A QoS 2 PUBLISH re-sent before PUBREL whose original was refused for a
            # full store (Server._refuse marks it): that flow ended with 0x97, so
            # does this copy; a success would ack something never stored.
            proto.refused(packet_id_obj, qos_obj, QuotaExceeded("store full"))
            acked.add(proto)
            continue
        if isinstance(proto, ConnState):
            conn = <ConnState>proto
            if not conn.held_refusals:
                conn.inflight -= 1
                if conn.state != CS_CLOSED:
                    packet_id = packet_id_obj
                    qos = qos_obj
                    size = PyByteArray_GET_SIZE(conn.out)
                    PyByteArray_Resize(conn.out, size + 4)
                    w = <unsigned char*>PyByteArray_AS_STRING(conn.out) + size
                    w[0] = (PT_PUBACK if qos == 1 else PT_PUBREC) << 4
                    w[1] = 2
                    w[2] = packet_id >> 8
                    w[3] = packet_id & 0xFF
                    conn.acks_written += 1
                acked.add(proto)
                continue
        proto.committed(packet_id_obj, qos_obj)
        acked.add(proto)
    return acked


def count_duplicates(list results):
    """How many of ``Log.append_batch``'s (partition, offset, duplicate) results are duplicates."""
    cdef Py_ssize_t dups = 0
    for result in results:
        if (<tuple>result)[2]:
            dups += 1
    return dups


# ---------------------------------------------------------------------------
# The writer's side of a batch: Log.append_batch's per-item work.  Only
# pushcore/log.py touches LMDB; these build the lists it hands to LMDB.

cdef inline tuple _item(object item):
    if type(item) is tuple and PyTuple_GET_SIZE(item) == 3:
        return <tuple>item
    item = tuple(item)
    if PyTuple_GET_SIZE(item) != 3:
        raise ValueError(f"a batch item is (partition, id hash or None, record), not {item!r}")
    return <tuple>item


cdef inline bytes _u64_be(uint64_t value):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    cdef int shift
    for shift in range(8):
        w[shift] = (value >> (56 - 8 * shift)) & 0xFF
    return out


def batch_partitions(list items, Py_ssize_t partitions):
    """Return (the partitions ``items`` append to in order of first appearance,
    how many items have an id hash).

    Raises ValueError for a partition outside 0..partitions-1.
    """
    cdef list touched = []
    cdef Py_ssize_t p, with_ids = 0
    cdef tuple t
    cdef bytearray seen = bytearray(partitions)
    cdef unsigned char* mark = <unsigned char*>PyByteArray_AS_STRING(seen)
    for item in items:
        t = _item(item)
        if t[1] is not None:
            with_ids += 1
        part = t[0]
        try:
            p = part
        except OverflowError:
            p = -1
        if not 0 <= p < partitions:
            raise ValueError(f"partition {part} out of range 0..{partitions - 1}")
        if not mark[p]:
            mark[p] = 1
            touched.append(p)
    return touched, with_ids


cdef Py_ssize_t* _slots(list touched, Py_ssize_t partitions, bytearray store) except NULL:
    """Map partition -> index in ``touched`` (in ``store``'s memory)."""
    cdef Py_ssize_t* slot = <Py_ssize_t*>PyByteArray_AS_STRING(store)
    cdef Py_ssize_t i
    for i in range(len(touched)):
        slot[<Py_ssize_t>touched[i]] = i
    return slot


def id_entries(list items, Py_ssize_t partitions, list touched, list first_offsets,
               uint64_t now_ms):
    """(index, partition, offset, id hash, ``ids`` value) of each item that has an id.

    ``first_offsets[k]`` is the next offset of partition ``touched[k]``; the
    offsets (and the u16 partition + u64 offset + u64 time_ms values) are
    the ones the items get when none of them is a duplicate.
    """
    cdef Py_ssize_t n = len(touched)
    cdef bytearray slot_store = bytearray(partitions * sizeof(Py_ssize_t))
    cdef Py_ssize_t* slot = _slots(touched, partitions, slot_store)
    cdef bytearray count_store = bytearray(n * sizeof(uint64_t))
    cdef uint64_t* count = <uint64_t*>PyByteArray_AS_STRING(count_store)
    cdef list out = []
    cdef Py_ssize_t index = 0, k, p
    cdef uint64_t offset
    cdef tuple t
    cdef bytes entry
    cdef unsigned char* w
    cdef int shift
    for item in items:
        t = _item(item)
        p = t[0]
        k = slot[p]
        offset = <uint64_t>first_offsets[k] + count[k]
        count[k] += 1
        ihash = t[1]
        if ihash is not None:
            entry = PyBytes_FromStringAndSize(NULL, 18)
            w = <unsigned char*>PyBytes_AS_STRING(entry)
            w[0] = (p >> 8) & 0xFF
            w[1] = p & 0xFF
            for shift in range(8):
                w[2 + shift] = (offset >> (56 - 8 * shift)) & 0xFF
                w[10 + shift] = (now_ms >> (56 - 8 * shift)) & 0xFF
            out.append((index, t[0], offset, ihash, entry))
        index += 1
    return out


def batch_rows(list items, Py_ssize_t partitions, list touched, list first_offsets,
               dict duplicates):
    """Return (results, rows, sizes) of an append, all but results aligned with ``touched``.

    ``duplicates`` maps an item's index to its (partition, offset, True)
    result; it writes nothing and takes no offset.  Every other item gets the
    next offset of its partition (from ``first_offsets[k]`` for
    ``touched[k]``) and a (u64 big-endian offset, record) row; ``sizes[k]``
    is the record bytes of ``rows[k]``.  ``results`` is one
    (partition, offset, duplicate) per item, in order.
    """
    cdef Py_ssize_t n = len(touched)
    cdef bytearray slot_store = bytearray(partitions * sizeof(Py_ssize_t))
    cdef Py_ssize_t* slot = _slots(touched, partitions, slot_store)
    cdef bytearray next_store = bytearray(n * sizeof(uint64_t))
    cdef uint64_t* next_offset = <uint64_t*>PyByteArray_AS_STRING(next_store)
    cdef bytearray size_store = bytearray(n * sizeof(Py_ssize_t))
    cdef Py_ssize_t* size = <Py_ssize_t*>PyByteArray_AS_STRING(size_store)
    cdef list results = []
    cdef list rows = [[] for _ in range(n)]
    cdef Py_ssize_t index = 0, k
    cdef bint any_duplicates = bool(duplicates)
    cdef tuple t
    for k in range(n):
        next_offset[k] = first_offsets[k]
    for item in items:
        t = _item(item)
        if any_duplicates and index in duplicates:
            results.append(duplicates[index])
            index += 1
            continue
        index += 1
        part = t[0]
        k = slot[<Py_ssize_t>part]
        record = t[2]
        (<list>rows[k]).append((_u64_be(next_offset[k]), record))
        size[k] += PyBytes_GET_SIZE(record) if type(record) is bytes else len(record)
        results.append((part, next_offset[k], False))
        next_offset[k] += 1
    return results, rows, [size[k] for k in range(n)]


cdef inline Py_ssize_t _u16_at(const unsigned char* p) noexcept nogil:
    return (p[0] << 8) | p[1]


cdef int parse_record(const unsigned char* p, Py_ssize_t n, RecordView* out) except -1:
    """Point ``out`` at the fields of a stored record (pushcore/record.py has the
    layout); ValueError for a record that is truncated or of another format."""
    cdef Py_ssize_t pos
    cdef int i
    if n < 14 or p[0] != FORMAT_VERSION:
        raise ValueError("not a version 1 record")
    out.flags = p[1]
    out.time_ms = 0
    for i in range(8):
        out.time_ms = (out.time_ms << 8) | p[2 + i]
    out.topic = p + 12
    out.topic_len = _u16_at(p + 10)
    pos = 12 + out.topic_len
    if pos + 2 > n:
        raise ValueError("truncated record")
    out.client_id_len = _u16_at(p + pos)
    out.client_id = p + pos + 2
    pos += 2 + out.client_id_len
    out.msg_id = NULL
    out.msg_id_len = 0
    if out.flags & FLAG_HAS_ID:
        if pos + 2 > n:
            raise ValueError("truncated record")
        out.msg_id_len = _u16_at(p + pos)
        out.msg_id = p + pos + 2
        pos += 2 + out.msg_id_len
    if out.flags & FLAG_HAS_KEY:
        if pos + 2 > n:
            raise ValueError("truncated record")
        pos += 2 + _u16_at(p + pos)
    out.properties = NULL
    out.properties_len = 0
    if out.flags & FLAG_HAS_PROPERTIES:
        if pos + 4 > n:
            raise ValueError("truncated record")
        out.properties_len = ((<Py_ssize_t>p[pos] << 24) | (p[pos + 1] << 16)
                              | (p[pos + 2] << 8) | p[pos + 3])
        out.properties = p + pos + 4
        pos += 4 + out.properties_len
    if pos > n:
        raise ValueError("truncated record")
    out.payload = p + pos
    out.payload_len = n - pos
    return 0


def record_fields(bytes record not None):
    """The parts of a stored record a delivery needs, without building a Record.

    Returns (time_ms, flags, topic, client_id, properties, payload) (the
    layout is in pushcore/record.py); ValueError for a record that is
    truncated or of another format version.  The broker calls this once per
    message it routes.
    """
    cdef RecordView v
    parse_record(<const unsigned char*>PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record), &v)
    topic = (<const char*>v.topic)[:v.topic_len].decode("utf-8")
    client_id = (<const char*>v.client_id)[:v.client_id_len].decode("utf-8")
    properties = _EMPTY
    if v.properties_len:
        properties = PyBytes_FromStringAndSize(<const char*>v.properties, v.properties_len)
    return v.time_ms, v.flags, topic, client_id, properties, \
        PyBytes_FromStringAndSize(<const char*>v.payload, v.payload_len)


cdef inline uint64_t _offset_of(object key) except? 0:
    # A log key is the offset as a big-endian u64 (pushcore/log.py).
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
    cdef uint64_t offset = 0
    cdef int i
    if PyBytes_GET_SIZE(key) != 8:
        raise ValueError("a log key is 8 bytes")
    for i in range(8):
        offset = (offset << 8) | k[i]
    return offset


def select_records(list rows, Py_ssize_t pos, uint64_t next_offset, Py_ssize_t limit,
                   dict routed, object route_miss, list taken, uint64_t first_offset):
    """A sink's next batch, picked from rows a partition read gave, in one call.

    ``rows`` are (key, record) pairs in offset order (``Log.read_raw``), read
    from ``pos`` on; rows before ``next_offset`` are passed over.  A record
    whose topic no route of the sink matches is skipped, and the cursor
    ``next_offset`` moves past it, while the batch is still empty; after
    that it ends the batch, as does a gap in the offsets, since a batch is
    consecutive records.  ``routed`` maps topic bytes to whether a route
    matches; ``route_miss(topic)`` answers (and caches) a topic not in it.
    Taken records are appended to ``taken`` (``first_offset`` is the offset
    of taken[0] once there is one).

    Returns (pos, next_offset, first_offset, done): ``done`` is false when
    the rows ran out before the batch was complete (``limit`` records, a gap
    or an unrouted record), so the caller reads on and calls again.
    """
    cdef Py_ssize_t n = len(rows)
    cdef uint64_t offset
    cdef Py_ssize_t ntaken = len(taken)
    cdef RecordView v
    cdef tuple row
    while pos < n:
        row = <tuple>rows[pos]
        offset = _offset_of(row[0])
        if offset < next_offset:
            pos += 1
            continue
        record = row[1]
        if type(record) is not bytes:
            raise TypeError("a record is bytes")
        parse_record(<const unsigned char*>PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record),
                     &v)
        topic = PyBytes_FromStringAndSize(<const char*>v.topic, v.topic_len)
        match = routed.get(topic)
        if match is None:
            match = route_miss(topic)
        if not match:
            if ntaken:
                return pos, next_offset, first_offset, True
            pos += 1
            next_offset = offset + 1
            continue
        if ntaken == 0:
            first_offset = offset
        elif offset != first_offset + <uint64_t>ntaken:
            return pos, next_offset, first_offset, True
        taken.append(record)
        ntaken += 1
        pos += 1
        if ntaken >= limit:
            return pos, next_offset, first_offset, True
    return pos, next_offset, first_offset, False


cdef inline Py_ssize_t _put_varint(unsigned char* w, Py_ssize_t n) noexcept nogil:
    # MQTT 5.0 §1.5.5: Variable Byte Integer, 7 bits per byte, at most 4 bytes.
    cdef Py_ssize_t i = 0
    while True:
        if n >= 128:
            w[i] = <unsigned char>((n & 0x7F) | 0x80)
        else:
            w[i] = <unsigned char>n
        i += 1
        n >>= 7
        if n == 0:
            return i


def encode_publish(bytes topic not None, int qos, bint retain, bint dup, int packet_id,
                   bytes properties not None, bytes payload not None, int version):
    """One PUBLISH packet (MQTT 3.1.1 §3.3 / 5.0 §3.3) in a single allocation.

    ``topic`` is UTF-8, ``properties`` the wire-encoded MQTT 5 property
    section without its length (ignored for 3.1.1).  The broker's per-delivery
    encoder; ``pushcore._frame.encode`` is the general one it is tested against.
    """
    cdef Py_ssize_t tn = PyBytes_GET_SIZE(topic)
    cdef Py_ssize_t pn = PyBytes_GET_SIZE(properties) if version == 5 else 0
    cdef Py_ssize_t yn = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t props_len = 0
    cdef unsigned char tmp[4]
    if version == 5:
        props_len = _put_varint(tmp, pn) + pn
    cdef Py_ssize_t remaining = 2 + tn + (2 if qos else 0) + props_len + yn
    if remaining > 268435455:
        raise ValueError("PUBLISH larger than the MQTT maximum of 268435455 bytes")
    cdef Py_ssize_t head = 1 + _put_varint(tmp, remaining)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, head + remaining)
    cdef unsigned char* w = <unsigned char*>PyBytes_AS_STRING(out)
    w[0] = <unsigned char>(0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0))
    w += 1
    w += _put_varint(w, remaining)
    w = _put_u16(w, tn)
    memcpy(w, PyBytes_AS_STRING(topic), tn)
    w += tn
    if qos:
        w = _put_u16(w, packet_id)
    if version == 5:
        w += _put_varint(w, pn)
        memcpy(w, PyBytes_AS_STRING(properties), pn)
        w += pn
    memcpy(w, PyBytes_AS_STRING(payload), yn)
    return out
