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
"""

from dataclasses import dataclass
from struct import Struct
from struct import error as StructError

import mmh3

from pushcore.errors import StoreError

FORMAT_VERSION = 1

_QOS_MASK = 0x03
_RETAIN = 0x04
_HAS_ID = 0x08
_HAS_KEY = 0x10
_HAS_PROPERTIES = 0x20
_KNOWN_FLAGS = _QOS_MASK | _RETAIN | _HAS_ID | _HAS_KEY | _HAS_PROPERTIES

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF

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


def encode_record(time_ms, topic, payload, qos=0, retain=False, msg_id=None, key=None,
                  client_id="", properties=b""):
    """Return the stored bytes of one record (the server's hot path)."""
    if qos.__class__ is not int or not 0 <= qos <= 2:
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")
    topic_bytes = topic.encode()
    client_bytes = client_id.encode()
    if len(topic_bytes) > _U16_MAX or len(client_bytes) > _U16_MAX:
        raise ValueError("topic and client id are limited to 65535 bytes")
    flags = qos
    if retain:
        flags |= _RETAIN
    if msg_id is None and key is None and not properties:
        return b"".join((_HEAD.pack(FORMAT_VERSION, flags, time_ms, len(topic_bytes)),
                         topic_bytes, _U16.pack(len(client_bytes)), client_bytes, payload))
    parts = [b"", topic_bytes, _U16.pack(len(client_bytes)), client_bytes]
    if msg_id is not None:
        if len(msg_id) > _U16_MAX:
            raise ValueError("message id is limited to 65535 bytes")
        flags |= _HAS_ID
        parts.append(_U16.pack(len(msg_id)))
        parts.append(msg_id)
    if key is not None:
        if len(key) > _U16_MAX:
            raise ValueError("ordering key is limited to 65535 bytes")
        flags |= _HAS_KEY
        parts.append(_U16.pack(len(key)))
        parts.append(key)
    if properties:
        if len(properties) > _U32_MAX:
            raise ValueError("properties are limited to 4 GiB")
        flags |= _HAS_PROPERTIES
        parts.append(_U32.pack(len(properties)))
        parts.append(properties)
    parts.append(payload)
    parts[0] = _HEAD.pack(FORMAT_VERSION, flags, time_ms, len(topic_bytes))
    return b"".join(parts)


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


def partition_for(key, partitions):
    """The partition of an ordering key: murmur3 x86_32, unsigned, mod N."""
    return mmh3.hash(key, signed=False) % partitions


def id_hash(scope, msg_id):
    """The 16-byte dedup key of a message id within a scope (murmur3 x64_128).

    The NUL separator keeps (b"ab", b"c") and (b"a", b"bc") apart.
    """
    return mmh3.hash_bytes(scope + b"\0" + msg_id)
