# Declarations of the C ingest path: the pending batch, the record builder, and
# the per-connection fields the hot loops read and write without a Python call.

from libc.stdint cimport uint32_t, uint64_t


# The life of one MQTT connection (pushcore/mqtt.py re-exports these).
cdef enum ConnStateCode:
    CS_CONNECTING = 0
    CS_CONNECTED = 1
    CS_CLOSED = 2


cdef uint32_t murmur3_32(const unsigned char* data, Py_ssize_t n) noexcept nogil


# The fields of one stored record (layout in pushcore/record.py), as pointers
# into its bytes: parse_record fills it without creating an object.
cdef struct RecordView:
    uint64_t time_ms
    int flags
    const unsigned char* topic
    Py_ssize_t topic_len
    const unsigned char* client_id
    Py_ssize_t client_id_len
    const unsigned char* msg_id
    Py_ssize_t msg_id_len
    const unsigned char* properties
    Py_ssize_t properties_len
    const unsigned char* payload
    Py_ssize_t payload_len


cdef int parse_record(const unsigned char* p, Py_ssize_t n, RecordView* out) except -1


cdef class Batch:
    cdef public list items
    cdef public list waiters
    cdef public Py_ssize_t nbytes
    cdef public Py_ssize_t nretain
    cdef int _add(self, object partition, object idh, bytes record, object conn,
                  object packet_id, object qos) except -1


cdef class Ingest:
    cdef public Py_ssize_t partitions
    cdef public bint scope_global
    cdef public Batch batch
    cdef public uint64_t now_ms
    cdef int _add(self, str topic, bytes payload, int qos, bint retain, bytes msg_id,
                  bytes key, str client_id, bytes properties, object conn,
                  int packet_id) except -1


cdef class ConnState:
    cdef public int state
    cdef public int version
    cdef public Py_ssize_t inflight
    cdef public Py_ssize_t acks_written
    cdef public str client_id
    cdef public bytearray out
    cdef public set qos2_received
    cdef public object held_refusals
    cdef public object settings
    cdef public Ingest ingest
