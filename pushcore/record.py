"""The stored record format, and the hashes that place a record.

A record is the value stored under one offset of a ``log.pNNN`` database.
It is written once by the group-commit writer and read by every sink, so
the format is versioned and byte-exact.  All integers are big-endian.

Record format version 1, byte by byte::

    offset  size  field
    0       1     version         u8, = FORMAT_VERSION (1)
    1       1     flags           u8:
                                    bits 0-1  QoS (0, 1 or 2)
                                    bit 2     retain
                                    bit 3     message id present
                                    bit 4     ordering key present
                                    bit 5     properties present
                                    bits 6-7  zero (a set bit is rejected)
    2       8     time_ms         u64, ms since the Unix epoch, set by the server
    10      2     topic length    u16 = T
    12      T     topic           UTF-8
    12+T    2     client length   u16 = C
    14+T    C     client id       UTF-8 (the publisher's identity, may be empty)
    then, only when bit 3 is set:
            2     id length       u16 = I
            I     message id      bytes (UTF-8 of the publisher's id)
    then, only when bit 4 is set:
            2     key length      u16 = K
            K     ordering key    bytes
    then, only when bit 5 is set:
            4     props length    u32 = P
            P     properties      the MQTT 5 property section, wire-encoded
    then    rest  payload         to the end of the record

An absent message id or key (``None``) differs from a present empty one
(flag set, length 0).  Properties are present exactly when non-empty.

Example: ``encode_record(1, "a", b"hi", qos=1, client_id="c")`` is
``01 01 0000000000000001 0001 61 0001 63 6869``.

The encoder is in C (pushcore/_ingest.pyx, the server's hot path) and is
re-exported here with the two hashes that place a record:
``partition_for(key, n)`` is murmur3 x86_32 (unsigned) of the ordering key mod
N, and ``id_hash(scope, msg_id)`` the 16-byte murmur3 x64_128 of
scope + NUL + message id, the dedup key.  This module is the format's written
form and its decoder.
"""

from dataclasses import dataclass
from struct import Struct
from struct import error as StructError

from pushcore._ingest import encode_record, id_hash, partition_for
from pushcore.errors import StoreError

__all__ = ["FORMAT_VERSION", "Record", "decode_record", "encode_record", "id_hash",
           "partition_for", "record_time_ms"]

FORMAT_VERSION = 1

_QOS_MASK = 0x03
_RETAIN = 0x04
_HAS_ID = 0x08
_HAS_KEY = 0x10
_HAS_PROPERTIES = 0x20
_KNOWN_FLAGS = _QOS_MASK | _RETAIN | _HAS_ID | _HAS_KEY | _HAS_PROPERTIES

# version, flags, time_ms, topic length: the fixed head every record starts with.
_HEAD = Struct(">BBQH")
_U16 = Struct(">H")
_U32 = Struct(">I")
_TIME = Struct(">Q")
_TIME_OFFSET = 2


@dataclass(slots=True, frozen=True)
class Record:
    time_ms: int
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    msg_id: bytes | None = None
    key: bytes | None = None
    client_id: str = ""
    properties: bytes = b""


def decode_record(data):
    """Parse stored bytes (bytes or memoryview) into a Record.

    Raises StoreError for an unknown version, unknown flag bits, a
    truncated record or a topic/client id that is not UTF-8.
    """
    view = memoryview(data)
    try:
        version, flags, time_ms, topic_len = _HEAD.unpack_from(view, 0)
        if version != FORMAT_VERSION:
            raise StoreError(f"unknown record format version {version}"
                             f" (this build reads version {FORMAT_VERSION})")
        if flags & ~_KNOWN_FLAGS:
            raise StoreError(f"record has unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
        pos = _HEAD.size
        topic = _take(view, pos, topic_len)
        pos += topic_len
        (client_len,) = _U16.unpack_from(view, pos)
        pos += 2
        client_id = _take(view, pos, client_len)
        pos += client_len
        msg_id = key = None
        properties = b""
        if flags & _HAS_ID:
            (n,) = _U16.unpack_from(view, pos)
            msg_id = _take(view, pos + 2, n)
            pos += 2 + n
        if flags & _HAS_KEY:
            (n,) = _U16.unpack_from(view, pos)
            key = _take(view, pos + 2, n)
            pos += 2 + n
        if flags & _HAS_PROPERTIES:
            (n,) = _U32.unpack_from(view, pos)
            properties = _take(view, pos + 4, n)
            pos += 4 + n
        return Record(time_ms, topic.decode(), bytes(view[pos:]), flags & _QOS_MASK,
                      bool(flags & _RETAIN), msg_id, key, client_id.decode(), properties)
    except StructError as exc:
        raise StoreError(f"truncated record ({len(view)} bytes)") from exc
    except UnicodeDecodeError as exc:
        raise StoreError(f"record topic or client id is not UTF-8: {exc}") from exc


def _take(view, pos, n):
    if pos + n > len(view):
        raise StoreError(f"truncated record ({len(view)} bytes, field needs {pos + n})")
    return bytes(view[pos:pos + n])


def record_time_ms(data):
    """Return a stored record's time_ms without decoding the rest (for retention)."""
    if not data or data[0] != FORMAT_VERSION:
        raise StoreError(f"unknown record format version {data[0] if data else None}")
    try:
        return _TIME.unpack_from(data, _TIME_OFFSET)[0]
    except StructError as exc:
        raise StoreError(f"truncated record ({len(data)} bytes)") from exc
