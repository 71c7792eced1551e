"""MQTT 3.1.1 / 5.0 framing core: split, decode and encode control packets.

The parser works on a caller-owned buffer and a [start, end) window and
returns every complete packet in it, so Python is entered once per ``recv``
rather than once per message.  A partial trailing packet is left where it is;
``consumed_to`` tells the caller where it starts.  ``parse`` never raises on
bad input: a bad packet ends the call with an ``MQTTError`` (carrying its
reason code) next to the packets decoded before it.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from pushcore.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_COMPACT_ASCII(object unicode)


CONNECT = PT_CONNECT
CONNACK = PT_CONNACK
PUBLISH = PT_PUBLISH
PUBACK = PT_PUBACK
PUBREC = PT_PUBREC
PUBREL = PT_PUBREL
PUBCOMP = PT_PUBCOMP
SUBSCRIBE = PT_SUBSCRIBE
SUBACK = PT_SUBACK
UNSUBSCRIBE = PT_UNSUBSCRIBE
UNSUBACK = PT_UNSUBACK
PINGREQ = PT_PINGREQ
PINGRESP = PT_PINGRESP
DISCONNECT = PT_DISCONNECT
AUTH = PT_AUTH

cdef enum:
    # MQTT 5.0 §1.5.5 / §2.1.4: the largest value a 4-byte Variable Byte Integer holds.
    MAX_VARINT = 268435455
    # MQTT 5.0 §1.5.4 / §1.5.6: strings and binary data carry a 2-byte length.
    MAX_U16 = 0xFFFF

cdef enum:
    # MQTT 5.0 §2.2.2.2 property identifiers the codec treats specially.
    PROP_SUBSCRIPTION_IDENTIFIER = 0x0B
    PROP_RECEIVE_MAXIMUM = 0x21
    PROP_USER_PROPERTY = 0x26
    PROP_MAXIMUM_PACKET_SIZE = 0x27

cdef enum:
    # Slots of the allowed-properties table besides packet types 1..15.  Packet
    # type 0 is reserved (§2.1.2) and never decoded, so slot 0 holds the Will
    # Properties of a CONNECT (§3.1.3.2); slot 16 allows every property, for
    # encode_properties/decode_properties (the log stores PUBLISH properties).
    SLOT_WILL = 0
    SLOT_ANY = 16


# ---------------------------------------------------------------------------
# Properties (MQTT 5.0 §2.2.2.2)

_PROPERTY_TABLE = (
    (0x01, "payload_format_indicator", PK_BYTE),
    (0x02, "message_expiry_interval", PK_U32),
    (0x03, "content_type", PK_STR),
    (0x08, "response_topic", PK_STR),
    (0x09, "correlation_data", PK_BIN),
    (0x0B, "subscription_identifier", PK_VARINT),
    (0x11, "session_expiry_interval", PK_U32),
    (0x12, "assigned_client_identifier", PK_STR),
    (0x13, "server_keep_alive", PK_U16),
    (0x15, "authentication_method", PK_STR),
    (0x16, "authentication_data", PK_BIN),
    (0x17, "request_problem_information", PK_BYTE),
    (0x18, "will_delay_interval", PK_U32),
    (0x19, "request_response_information", PK_BYTE),
    (0x1A, "response_information", PK_STR),
    (0x1C, "server_reference", PK_STR),
    (0x1F, "reason_string", PK_STR),
    (0x21, "receive_maximum", PK_U16),
    (0x22, "topic_alias_maximum", PK_U16),
    (0x23, "topic_alias", PK_U16),
    (0x24, "maximum_qos", PK_BYTE),
    (0x25, "retain_available", PK_BYTE),
    (0x26, "user_property", PK_PAIR),
    (0x27, "maximum_packet_size", PK_U32),
    (0x28, "wildcard_subscription_available", PK_BYTE),
    (0x29, "subscription_identifier_available", PK_BYTE),
    (0x2A, "shared_subscription_available", PK_BYTE),
)

# Which packet may carry which property: the "Used in" column of §2.2.2.2.
_ALLOWED_BY_SLOT = {
    SLOT_WILL: ("payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "will_delay_interval", "user_property"),
    PT_CONNECT: ("session_expiry_interval", "authentication_method", "authentication_data",
                 "request_problem_information", "request_response_information",
                 "receive_maximum", "topic_alias_maximum", "user_property",
                 "maximum_packet_size"),
    PT_CONNACK: ("session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                 "authentication_method", "authentication_data", "response_information",
                 "server_reference", "reason_string", "receive_maximum", "topic_alias_maximum",
                 "maximum_qos", "retain_available", "user_property", "maximum_packet_size",
                 "wildcard_subscription_available", "subscription_identifier_available",
                 "shared_subscription_available"),
    PT_PUBLISH: ("payload_format_indicator", "message_expiry_interval", "content_type",
                 "response_topic", "correlation_data", "subscription_identifier", "topic_alias",
                 "user_property"),
    PT_PUBACK: ("reason_string", "user_property"),
    PT_PUBREC: ("reason_string", "user_property"),
    PT_PUBREL: ("reason_string", "user_property"),
    PT_PUBCOMP: ("reason_string", "user_property"),
    PT_SUBSCRIBE: ("subscription_identifier", "user_property"),
    PT_SUBACK: ("reason_string", "user_property"),
    PT_UNSUBSCRIBE: ("user_property",),
    PT_UNSUBACK: ("reason_string", "user_property"),
    PT_DISCONNECT: ("session_expiry_interval", "server_reference", "reason_string",
                    "user_property"),
    PT_AUTH: ("authentication_method", "authentication_data", "reason_string",
              "user_property"),
}

# §3.1.2.11 / §3.2.2.3 / §3.3.2.3.2: "It is a Protocol Error to include a value
# other than 0 or 1" for these byte properties.
_BOOLEAN_PROPERTIES = (
    "payload_format_indicator", "request_problem_information", "request_response_information",
    "maximum_qos", "retain_available", "wildcard_subscription_available",
    "subscription_identifier_available", "shared_subscription_available",
)

# Indexed by any byte, so an identifier read off the wire needs no bounds check.
# Every defined identifier is below 64, so the per-packet masks are 64-bit.
cdef PropKind _prop_kind[256]
cdef uint64_t _allowed[17]
cdef uint64_t _boolean_mask = 0
cdef tuple _prop_names
cdef dict _prop_ids = {}


def _init_property_tables():
    global _prop_names, _boolean_mask
    names = [None] * 64
    for pid, name, kind in _PROPERTY_TABLE:
        names[pid] = name
        _prop_kind[pid] = <PropKind><int>kind
        _prop_ids[name] = pid
    _prop_names = tuple(names)
    for slot, allowed_names in _ALLOWED_BY_SLOT.items():
        for name in allowed_names:
            _allowed[slot] |= (<uint64_t>1) << <int>_prop_ids[name]
    for pid in _prop_ids.values():
        _allowed[SLOT_ANY] |= (<uint64_t>1) << <int>pid
    for name in _BOOLEAN_PROPERTIES:
        _boolean_mask |= (<uint64_t>1) << <int>_prop_ids[name]


_init_property_tables()


# ---------------------------------------------------------------------------
# Packet classes

cdef class _Struct:
    """Field-wise equality, a readable repr and pickling, driven by ``_fields``.

    ``_values()`` returns the fields in constructor-argument order, so
    ``type(self)(*self._values())`` rebuilds the object.
    """

    _fields = ()

    cdef tuple _values(self):
        return ()

    def __reduce__(self):
        return type(self), self._values()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == (<_Struct>other)._values()

    def __repr__(self):
        parts = []
        for name, value in zip(self._fields, self._values()):
            if isinstance(value, bytes) and len(value) > 64:
                parts.append(f"{name}={value[:64]!r}...({len(value)} bytes)")
            else:
                parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


cdef class Packet(_Struct):
    """Base of every control packet; ``type`` is its MQTT packet type."""


cdef class Will(_Struct):
    _fields = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, str topic, bytes payload=b"", int qos=0, bint retain=False,
                 dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties

    cdef tuple _values(self):
        return (self.topic, self.payload, self.qos, self.retain, self.properties)


cdef class Connect(Packet):
    _fields = ("client_id", "clean_start", "keepalive", "protocol_level", "protocol_name",
               "username", "password", "will", "properties")

    def __cinit__(self):
        self.type = PT_CONNECT

    def __init__(self, str client_id="", bint clean_start=True, int keepalive=60,
                 int protocol_level=4, str protocol_name="MQTT", str username=None,
                 bytes password=None, Will will=None, dict properties=None):
        self.client_id = client_id
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.protocol_level = protocol_level
        self.protocol_name = protocol_name
        self.username = username
        self.password = password
        self.will = will
        self.properties = properties

    cdef tuple _values(self):
        return (self.client_id, self.clean_start, self.keepalive, self.protocol_level,
                self.protocol_name, self.username, self.password, self.will, self.properties)


cdef class Connack(Packet):
    _fields = ("session_present", "reason_code", "properties")

    def __cinit__(self):
        self.type = PT_CONNACK

    def __init__(self, bint session_present=False, int reason_code=0, dict properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = properties

    cdef tuple _values(self):
        return (self.session_present, self.reason_code, self.properties)


# Packets hold only str, bytes, ints and property dicts of those, so they
# cannot be part of a reference cycle; leaving the hot ones out of the cyclic
# GC saves its bookkeeping on every decoded message and keeps large pending
# batches from making every collection slower.
@cython.no_gc
cdef class Publish(Packet):
    _fields = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")

    def __cinit__(self):
        self.type = PT_PUBLISH

    def __init__(self, str topic, bytes payload=b"", int qos=0, bint retain=False,
                 bint dup=False, int packet_id=0, dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = properties

    cdef tuple _values(self):
        return (self.topic, self.payload, self.qos, self.retain, self.dup, self.packet_id,
                self.properties)


@cython.no_gc
cdef class Ack(Packet):
    """PUBACK, PUBREC, PUBREL or PUBCOMP (they share one layout, §3.4-§3.7)."""

    _fields = ("type", "packet_id", "reason_code", "properties")

    def __init__(self, int type, int packet_id, int reason_code=0, dict properties=None):
        if type < PT_PUBACK or type > PT_PUBCOMP:
            raise ValueError(f"Ack type must be PUBACK..PUBCOMP, not {type}")
        self.type = type
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = properties

    cdef tuple _values(self):
        return (self.type, self.packet_id, self.reason_code, self.properties)


cdef class Subscribe(Packet):
    _fields = ("packet_id", "subscriptions", "properties")

    def __cinit__(self):
        self.type = PT_SUBSCRIBE

    def __init__(self, int packet_id, list subscriptions, dict properties=None):
        self.packet_id = packet_id
        self.subscriptions = subscriptions
        self.properties = properties

    cdef tuple _values(self):
        return (self.packet_id, self.subscriptions, self.properties)


cdef class Suback(Packet):
    _fields = ("packet_id", "reason_codes", "properties")

    def __cinit__(self):
        self.type = PT_SUBACK

    def __init__(self, int packet_id, list reason_codes, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = reason_codes
        self.properties = properties

    cdef tuple _values(self):
        return (self.packet_id, self.reason_codes, self.properties)


cdef class Unsubscribe(Packet):
    _fields = ("packet_id", "filters", "properties")

    def __cinit__(self):
        self.type = PT_UNSUBSCRIBE

    def __init__(self, int packet_id, list filters, dict properties=None):
        self.packet_id = packet_id
        self.filters = filters
        self.properties = properties

    cdef tuple _values(self):
        return (self.packet_id, self.filters, self.properties)


cdef class Unsuback(Packet):
    _fields = ("packet_id", "reason_codes", "properties")

    def __cinit__(self):
        self.type = PT_UNSUBACK

    def __init__(self, int packet_id, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = [] if reason_codes is None else reason_codes
        self.properties = properties

    cdef tuple _values(self):
        return (self.packet_id, self.reason_codes, self.properties)


cdef class Pingreq(Packet):
    def __cinit__(self):
        self.type = PT_PINGREQ


cdef class Pingresp(Packet):
    def __cinit__(self):
        self.type = PT_PINGRESP


cdef class Disconnect(Packet):
    _fields = ("reason_code", "properties")

    def __cinit__(self):
        self.type = PT_DISCONNECT

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = properties

    cdef tuple _values(self):
        return (self.reason_code, self.properties)


cdef class Auth(Packet):
    _fields = ("reason_code", "properties")

    def __cinit__(self):
        self.type = PT_AUTH

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = properties

    cdef tuple _values(self):
        return (self.reason_code, self.properties)


# ---------------------------------------------------------------------------
# Field readers.  Each takes the packet's body end, so a field running past it
# is a Malformed Packet (§4.13) however many bytes follow in the buffer.

cdef VarintStatus read_varint(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                              Py_ssize_t* value, Py_ssize_t* next_pos) noexcept nogil:
    # MQTT 5.0 §1.5.5: 7 value bits per byte, least significant first, high bit
    # set while more follow; at most 4 bytes.
    cdef Py_ssize_t result = 0
    cdef int shift = 0
    cdef unsigned char c
    while shift < 28:
        if pos >= end:
            return VARINT_INCOMPLETE
        c = p[pos]
        pos += 1
        result |= <Py_ssize_t>(c & 0x7F) << shift
        if not (c & 0x80):
            value[0] = result
            next_pos[0] = pos
            return VARINT_OK
        shift += 7
    return VARINT_MALFORMED


cdef bint _utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    # MQTT 5.0 §1.5.4: well-formed UTF-8 (RFC 3629: no overlong forms, no
    # surrogates U+D800..U+DFFF, nothing past U+10FFFF) and no U+0000.
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            if c == 0:
                return False
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if ((c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return False
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return False
            i += 4
        else:
            return False
    return True


cdef inline int _read_byte(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    if pos[0] >= end:
        raise MalformedPacket("packet ends inside a field")
    pos[0] += 1
    return p[pos[0] - 1]


cdef inline int _read_u16(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    cdef Py_ssize_t i = pos[0]
    if end - i < 2:
        raise MalformedPacket("packet ends inside a field")
    pos[0] = i + 2
    return (p[i] << 8) | p[i + 1]


cdef inline int _read_packet_id(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end) except -1:
    cdef int packet_id = _read_u16(p, pos, end)
    # MQTT 5.0 §2.2.1 [MQTT-2.2.1-3]: packet identifiers are non-zero.  The spec
    # names no code; a well-formed packet carrying a forbidden value is a
    # Protocol Error by its definition in §1.2.
    if packet_id == 0:
        raise ProtocolError("packet identifier 0")
    return packet_id


cdef str _read_str(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t n
    if end - i < 2:
        raise MalformedPacket("packet ends inside a string length")
    n = (p[i] << 8) | p[i + 1]
    i += 2
    if n > end - i:
        raise MalformedPacket("string runs past the packet end")
    if not _utf8_valid(p + i, n):
        raise MalformedPacket("string is not valid MQTT UTF-8")
    pos[0] = i + n
    return PyUnicode_DecodeUTF8(<const char*>(p + i), n, NULL)


cdef bytes _read_bin(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end):
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t n
    if end - i < 2:
        raise MalformedPacket("packet ends inside a binary data length")
    n = (p[i] << 8) | p[i + 1]
    i += 2
    if n > end - i:
        raise MalformedPacket("binary data runs past the packet end")
    pos[0] = i + n
    return PyBytes_FromStringAndSize(<char*>(p + i), n)


cdef inline str _read_topic(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end,
                            str previous):
    """A topic name: a string with no wildcard (may be empty; callers decide).

    A publisher usually repeats its topic, so an ASCII topic equal to
    ``previous`` returns that same object: no allocation, and its hash stays
    cached for the routing lookups downstream.
    """
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t n, k
    cdef const unsigned char* t
    cdef unsigned char c
    cdef bint ascii = True
    if end - i < 2:
        raise MalformedPacket("packet ends inside the topic length")
    n = (p[i] << 8) | p[i + 1]
    i += 2
    if n > end - i:
        raise MalformedPacket("topic runs past the packet end")
    t = p + i
    for k in range(n):
        c = t[k]
        if c >= 0x80:
            ascii = False
        elif c == 0x2B or c == 0x23:
            # MQTT 5.0 §3.3.2.1 [MQTT-3.3.2-2]: no '+' or '#' in a topic name.
            raise TopicNameInvalid("wildcard in topic name")
        elif c == 0:
            raise MalformedPacket("U+0000 in topic name")
    pos[0] = i + n
    if ascii:
        if (previous is not None and PyUnicode_IS_COMPACT_ASCII(previous)
                and PyUnicode_GET_LENGTH(previous) == n
                and memcmp(PyUnicode_1BYTE_DATA(previous), t, n) == 0):
            return previous
    elif not _utf8_valid(t, n):
        raise MalformedPacket("topic name is not valid MQTT UTF-8")
    return PyUnicode_DecodeUTF8(<const char*>t, n, NULL)


cdef dict _decode_props(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end, int slot):
    """Decode the property list in p[pos:end] (its length prefix already read)."""
    cdef uint64_t allowed = _allowed[slot]
    cdef uint64_t seen = 0
    cdef uint64_t bit
    cdef unsigned char pid
    cdef PropKind kind
    cdef Py_ssize_t value
    cdef dict props = None
    cdef list values
    cdef bint may_repeat
    while pos < end:
        pid = p[pos]
        pos += 1
        # §2.2.2.2: the identifier is a Variable Byte Integer, but every defined
        # one fits in a single byte, so a continuation bit is already unknown.
        if _prop_kind[pid] == PK_NONE:
            raise MalformedPacket(f"unknown property identifier 0x{pid:02x}")
        bit = (<uint64_t>1) << pid
        if not (allowed & bit):
            raise ProtocolError(f"property {_prop_names[pid]} is not allowed in this packet")
        # §3.3.2.3.8: only a PUBLISH may carry several Subscription Identifiers;
        # User Property may always repeat; any other repeat is a Protocol Error.
        may_repeat = pid == PROP_USER_PROPERTY or (
            pid == PROP_SUBSCRIPTION_IDENTIFIER and (slot == PT_PUBLISH or slot == SLOT_ANY))
        if (seen & bit) and not may_repeat:
            raise ProtocolError(f"property {_prop_names[pid]} included more than once")
        seen |= bit
        kind = _prop_kind[pid]
        if kind == PK_BYTE:
            value = _read_byte(p, &pos, end)
            if (_boolean_mask & bit) and value > 1:
                raise ProtocolError(f"property {_prop_names[pid]} must be 0 or 1")
            item = value
        elif kind == PK_U16:
            value = _read_u16(p, &pos, end)
            # §3.1.2.11.3 / §3.2.2.3.3: Receive Maximum 0 is a Protocol Error.
            if value == 0 and pid == PROP_RECEIVE_MAXIMUM:
                raise ProtocolError("receive_maximum 0")
            item = value
        elif kind == PK_U32:
            if end - pos < 4:
                raise MalformedPacket("packet ends inside a four byte integer")
            value = ((<Py_ssize_t>p[pos] << 24) | (p[pos + 1] << 16) | (p[pos + 2] << 8)
                     | p[pos + 3])
            pos += 4
            # §3.1.2.11.4 / §3.2.2.3.6: Maximum Packet Size 0 is a Protocol Error.
            if value == 0 and pid == PROP_MAXIMUM_PACKET_SIZE:
                raise ProtocolError("maximum_packet_size 0")
            item = value
        elif kind == PK_VARINT:
            if read_varint(p, pos, end, &value, &pos) != VARINT_OK:
                raise MalformedPacket("bad Variable Byte Integer in properties")
            # §3.3.2.3.8: a Subscription Identifier of 0 is a Protocol Error.
            if value == 0:
                raise ProtocolError("subscription_identifier 0")
            item = value
        elif kind == PK_STR:
            item = _read_str(p, &pos, end)
        elif kind == PK_BIN:
            item = _read_bin(p, &pos, end)
        else:
            key = _read_str(p, &pos, end)
            item = (key, _read_str(p, &pos, end))
        if props is None:
            props = {}
        name = _prop_names[pid]
        if pid == PROP_USER_PROPERTY or pid == PROP_SUBSCRIPTION_IDENTIFIER:
            values = props.get(name)
            if values is None:
                values = props[name] = []
            values.append(item)
        else:
            props[name] = item
    return props


cdef dict _read_props(const unsigned char* p, Py_ssize_t* pos, Py_ssize_t end, int slot):
    """Read a length-prefixed property section (§2.2.2.1); None when empty."""
    cdef Py_ssize_t length
    cdef Py_ssize_t start
    if read_varint(p, pos[0], end, &length, &start) != VARINT_OK or length > end - start:
        raise MalformedPacket("bad property length")
    pos[0] = start + length
    if length == 0:
        return None
    return _decode_props(p, start, start + length, slot)


cdef inline int _expect_end(Py_ssize_t pos, Py_ssize_t end) except -1:
    if pos != end:
        raise MalformedPacket("unexpected bytes at the end of the packet")
    return 0


# ---------------------------------------------------------------------------
# Packet decoders

cdef Publish _decode_publish(Parser parser, unsigned char b0, const unsigned char* p,
                             Py_ssize_t pos, Py_ssize_t end):
    cdef int version = parser.version
    cdef int qos = (b0 >> 1) & 3
    cdef int packet_id = 0
    cdef dict props = None
    cdef str topic
    cdef Publish pkt
    # MQTT 5.0 §3.3.1.2 [MQTT-3.3.1-4]: both QoS bits set is a Malformed Packet.
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    # §3.3.1.1 [MQTT-3.3.1-2]: DUP must be 0 for QoS 0.
    if qos == 0 and (b0 & 0x08):
        raise MalformedPacket("PUBLISH with DUP set and QoS 0")
    topic = _read_topic(p, &pos, end, parser._last_topic)
    if qos:
        packet_id = _read_packet_id(p, &pos, end)
    if version == 5:
        props = _read_props(p, &pos, end, PT_PUBLISH)
    if len(topic) == 0:
        # §3.3.2.1: "It is a Protocol Error if the Topic Name is zero length and
        # there is no Topic Alias."  3.1.1 §4.7.3 has no alias and no code.
        if version != 5:
            raise TopicNameInvalid("empty topic name")
        if props is None or "topic_alias" not in props:
            raise ProtocolError("empty topic name without topic_alias")
    parser._last_topic = topic
    pkt = Publish.__new__(Publish)
    pkt.topic = topic
    pkt.payload = PyBytes_FromStringAndSize(<char*>(p + pos), end - pos)
    pkt.qos = qos
    pkt.retain = b0 & 0x01
    pkt.dup = (b0 >> 3) & 0x01
    pkt.packet_id = packet_id
    pkt.properties = props
    return pkt


cdef Connect _decode_connect(Parser parser, const unsigned char* p, Py_ssize_t pos,
                             Py_ssize_t end):
    cdef int level, flags, will_qos
    cdef Connect pkt
    cdef Will will = None
    # MQTT 5.0 §3.1: "A Client can only send the CONNECT packet once".
    if parser.version != 0:
        raise ProtocolError("second CONNECT")
    name = _read_str(p, &pos, end)
    level = _read_byte(p, &pos, end)
    # §3.1.2.1-2: name "MQTT", level 4 (3.1.1) or 5.  The server answers 0x84
    # in a v5 CONNACK for level 5 and 0x01 in a 3.1.1 CONNACK otherwise, so
    # the error says which level was asked for.
    if name != "MQTT" or (level != 4 and level != 5):
        exc = UnsupportedProtocolVersion(f"protocol {name!r} level {level}")
        exc.protocol_level = level
        raise exc
    # Set before the rest is read, so that a reply to a bad CONNECT (a v5
    # CONNACK with 0x81/0x82, §4.13) can be written in the client's version.
    parser.version = level
    flags = _read_byte(p, &pos, end)
    # §3.1.2.3 [MQTT-3.1.2-3]: the reserved flag must be 0.
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")
    will_qos = (flags >> 3) & 3
    # §3.1.2.6: Will QoS 3 is malformed; §3.1.2.5-7: no Will QoS/Retain
    # without the Will Flag.
    if will_qos == 3:
        raise MalformedPacket("Will QoS 3")
    if not (flags & 0x04) and (will_qos or (flags & 0x20)):
        raise MalformedPacket("Will QoS or Retain set without the Will Flag")
    # 3.1.1 §3.1.2.9 [MQTT-3.1.2-22]: no password without a user name (5.0 allows it).
    if level == 4 and (flags & 0x40) and not (flags & 0x80):
        raise MalformedPacket("password flag without user name flag")
    pkt = Connect.__new__(Connect)
    pkt.protocol_name = name
    pkt.protocol_level = level
    pkt.clean_start = (flags >> 1) & 1
    pkt.keepalive = _read_u16(p, &pos, end)
    pkt.properties = _read_props(p, &pos, end, PT_CONNECT) if level == 5 else None
    pkt.client_id = _read_str(p, &pos, end)
    if flags & 0x04:
        will = Will.__new__(Will)
        will.properties = _read_props(p, &pos, end, SLOT_WILL) if level == 5 else None
        will.topic = _read_topic(p, &pos, end, None)
        if len(will.topic) == 0:
            raise TopicNameInvalid("empty Will topic")
        will.payload = _read_bin(p, &pos, end)
        will.qos = will_qos
        will.retain = (flags >> 5) & 1
    pkt.will = will
    pkt.username = _read_str(p, &pos, end) if flags & 0x80 else None
    pkt.password = _read_bin(p, &pos, end) if flags & 0x40 else None
    _expect_end(pos, end)
    return pkt


cdef Ack _decode_ack(int ptype, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                     int version):
    cdef Ack pkt = Ack.__new__(Ack)
    pkt.type = ptype
    pkt.packet_id = _read_packet_id(p, &pos, end)
    pkt.reason_code = 0
    pkt.properties = None
    # MQTT 5.0 §3.4.2.1: the reason code (and then the properties) may be
    # omitted; absent means 0x00 Success.
    if version == 5 and pos < end:
        pkt.reason_code = _read_byte(p, &pos, end)
        if pos < end:
            pkt.properties = _read_props(p, &pos, end, ptype)
    _expect_end(pos, end)
    return pkt


cdef Subscribe _decode_subscribe(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                 int version):
    cdef int options
    cdef list subscriptions = []
    cdef Subscribe pkt = Subscribe.__new__(Subscribe)
    pkt.packet_id = _read_packet_id(p, &pos, end)
    pkt.properties = _read_props(p, &pos, end, PT_SUBSCRIBE) if version == 5 else None
    while pos < end:
        topic_filter = _read_str(p, &pos, end)
        options = _read_byte(p, &pos, end)
        if version == 5:
            # MQTT 5.0 §3.8.3.1: bits 6-7 reserved (malformed); QoS 3 and
            # Retain Handling 3 are Protocol Errors.
            if options & 0xC0:
                raise MalformedPacket("subscription options reserved bits set")
            if (options & 0x03) == 3 or ((options >> 4) & 0x03) == 3:
                raise ProtocolError("subscription QoS or retain handling 3")
        elif (options & 0xFC) or (options & 0x03) == 3:
            # 3.1.1 §3.8.3.1 [MQTT-3-8.3-4]: reserved bits or QoS 3 are malformed.
            raise MalformedPacket("subscription options reserved bits set or QoS 3")
        subscriptions.append((topic_filter, options))
    # 5.0 §3.8.3 / 3.1.1 [MQTT-3.8.3-3]: at least one subscription.
    if not subscriptions:
        raise ProtocolError("SUBSCRIBE without subscriptions")
    pkt.subscriptions = subscriptions
    return pkt


cdef Suback _decode_suback(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                           int version):
    cdef Suback pkt = Suback.__new__(Suback)
    cdef list codes
    cdef int code
    pkt.packet_id = _read_packet_id(p, &pos, end)
    pkt.properties = _read_props(p, &pos, end, PT_SUBACK) if version == 5 else None
    codes = [p[i] for i in range(pos, end)]
    if not codes:
        raise ProtocolError("SUBACK without reason codes")
    if version != 5:
        # 3.1.1 §3.9.3: return codes other than 0x00-0x02 and 0x80 are reserved.
        for code in codes:
            if code > 2 and code != 0x80:
                raise MalformedPacket(f"SUBACK return code 0x{code:02x}")
    pkt.reason_codes = codes
    return pkt


cdef Unsubscribe _decode_unsubscribe(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                     int version):
    cdef list filters = []
    cdef Unsubscribe pkt = Unsubscribe.__new__(Unsubscribe)
    pkt.packet_id = _read_packet_id(p, &pos, end)
    pkt.properties = _read_props(p, &pos, end, PT_UNSUBSCRIBE) if version == 5 else None
    while pos < end:
        filters.append(_read_str(p, &pos, end))
    # 5.0 §3.10.3 / 3.1.1 [MQTT-3.10.3-2]: at least one topic filter.
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    pkt.filters = filters
    return pkt


cdef Unsuback _decode_unsuback(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                               int version):
    cdef Unsuback pkt = Unsuback.__new__(Unsuback)
    pkt.packet_id = _read_packet_id(p, &pos, end)
    pkt.properties = None
    pkt.reason_codes = []
    if version == 5:
        pkt.properties = _read_props(p, &pos, end, PT_UNSUBACK)
        pkt.reason_codes = [p[i] for i in range(pos, end)]
    else:
        _expect_end(pos, end)
    return pkt


cdef object _decode_reason_and_props(int ptype, const unsigned char* p, Py_ssize_t pos,
                                     Py_ssize_t end, int version):
    """DISCONNECT and AUTH: an empty body means reason 0x00, no properties."""
    cdef int reason_code = 0
    cdef dict props = None
    cdef Packet pkt
    if ptype == PT_AUTH and version != 5:
        # 3.1.1 §2.2.1: packet type 15 is reserved.
        raise MalformedPacket("AUTH packet in MQTT 3.1.1")
    # MQTT 5.0 §3.14.2.1 / §3.15.2.1: reason code and properties may be omitted.
    if version == 5 and pos < end:
        reason_code = _read_byte(p, &pos, end)
        if pos < end:
            props = _read_props(p, &pos, end, ptype)
    _expect_end(pos, end)
    if ptype == PT_AUTH:
        pkt = Auth.__new__(Auth)
        (<Auth>pkt).reason_code = reason_code
        (<Auth>pkt).properties = props
    else:
        pkt = Disconnect.__new__(Disconnect)
        (<Disconnect>pkt).reason_code = reason_code
        (<Disconnect>pkt).properties = props
    return pkt


cdef Connack _decode_connack(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                             int version):
    cdef int flags = _read_byte(p, &pos, end)
    cdef Connack pkt = Connack.__new__(Connack)
    # MQTT 5.0 §3.2.2.1 / 3.1.1 §3.2.2.1: bits 7-1 of the acknowledge flags are reserved.
    if flags & 0xFE:
        raise MalformedPacket("CONNACK reserved flags set")
    pkt.session_present = flags & 0x01
    pkt.reason_code = _read_byte(p, &pos, end)
    pkt.properties = None
    if version == 5 and pos < end:
        pkt.properties = _read_props(p, &pos, end, PT_CONNACK)
    _expect_end(pos, end)
    return pkt


cdef object _decode_packet(Parser parser, unsigned char b0, const unsigned char* p,
                           Py_ssize_t pos, Py_ssize_t end):
    cdef int ptype = b0 >> 4
    cdef int version = parser.version
    if ptype == PT_PUBLISH:
        return _decode_publish(parser, b0, p, pos, end)
    # MQTT 5.0 §2.1.3: fixed header flags are reserved; PUBREL, SUBSCRIBE and
    # UNSUBSCRIBE carry 0b0010, every other non-PUBLISH packet 0b0000.
    if (b0 & 0x0F) != (2 if ptype == PT_PUBREL or ptype == PT_SUBSCRIBE
                       or ptype == PT_UNSUBSCRIBE else 0):
        raise MalformedPacket(f"reserved fixed header flags 0x{b0 & 0x0F:x} in type {ptype}")
    if ptype == PT_CONNECT:
        return _decode_connect(parser, p, pos, end)
    if PT_PUBACK <= ptype <= PT_PUBCOMP:
        return _decode_ack(ptype, p, pos, end, version)
    if ptype == PT_SUBSCRIBE:
        return _decode_subscribe(p, pos, end, version)
    if ptype == PT_SUBACK:
        return _decode_suback(p, pos, end, version)
    if ptype == PT_UNSUBSCRIBE:
        return _decode_unsubscribe(p, pos, end, version)
    if ptype == PT_UNSUBACK:
        return _decode_unsuback(p, pos, end, version)
    if ptype == PT_CONNACK:
        return _decode_connack(p, pos, end, version)
    if ptype == PT_PINGREQ or ptype == PT_PINGRESP:
        _expect_end(pos, end)
        return Pingreq.__new__(Pingreq) if ptype == PT_PINGREQ else Pingresp.__new__(Pingresp)
    if ptype == PT_DISCONNECT or ptype == PT_AUTH:
        return _decode_reason_and_props(ptype, p, pos, end, version)
    # §2.1.2: packet type 0 is reserved.
    raise MalformedPacket("reserved packet type 0")


cdef class Parser:
    """Splits and decodes the MQTT packets in a buffer window.

    A server-side parser starts with version 0 and learns the version from
    the CONNECT; a client-side parser is made with version 4 or 5.
    """

    def __init__(self, Py_ssize_t max_packet_size=268435460, int version=0):
        if version not in (0, 4, 5):
            raise ValueError(f"version must be 0, 4 or 5, not {version}")
        self.max_packet_size = max_packet_size
        self.version = version

    def parse(self, buf, Py_ssize_t start, Py_ssize_t end):
        """Parse buf[start:end]; return (packets, consumed_to, error)."""
        cdef const unsigned char[:] view = buf
        if start < 0 or start > end or end > view.shape[0]:
            raise ValueError(f"bad window [{start}, {end}) for a buffer of {view.shape[0]}")
        if start == end:
            return [], start, None
        return self.parse_ptr(&view[0], start, end)

    cdef tuple parse_ptr(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        cdef list packets = []
        cdef Py_ssize_t pos = start
        cdef Py_ssize_t length, body
        cdef VarintStatus status
        cdef unsigned char b0
        error = None
        try:
            while pos < end:
                b0 = p[pos]
                # MQTT 5.0 §3.1 [MQTT-3.1.0-1]: the first packet from a client is
                # CONNECT.  Known from the first byte, so garbage (a stray HTTP
                # request, TLS hello) fails without waiting for more.
                if self.version == 0 and (b0 >> 4) != PT_CONNECT:
                    raise ProtocolError("first packet is not CONNECT")
                status = read_varint(p, pos + 1, end, &length, &body)
                if status == VARINT_INCOMPLETE:
                    break
                if status == VARINT_MALFORMED:
                    raise MalformedPacket("remaining length longer than 4 bytes")
                # §3.1.2.11.4 / §3.2.2.3.6: the limit counts the whole packet; it is
                # checked on the header so an oversized body is never buffered.
                if body - pos + length > self.max_packet_size:
                    raise PacketTooLarge(
                        f"packet of {body - pos + length} bytes exceeds {self.max_packet_size}")
                if end - body < length:
                    break
                if (b0 >> 4) == PT_PUBLISH:
                    packets.append(_decode_publish(self, b0, p, body, body + length))
                else:
                    packets.append(_decode_packet(self, b0, p, body, body + length))
                pos = body + length
        except MQTTError as exc:
            error = exc
        return packets, pos, error


# ---------------------------------------------------------------------------
# Encoders

cdef inline int _varint_size(Py_ssize_t n) noexcept nogil:
    if n < 128:
        return 1
    if n < 16384:
        return 2
    if n < 2097152:
        return 3
    return 4


cdef int _w_varint(bytearray out, Py_ssize_t n) except -1:
    if n < 0 or n > MAX_VARINT:
        raise ValueError(f"{n} does not fit in a Variable Byte Integer (max {MAX_VARINT})")
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return 0


cdef int _w_byte(bytearray out, long v) except -1:
    if v < 0 or v > 0xFF:
        raise ValueError(f"{v} does not fit in a byte")
    out.append(v)
    return 0


cdef int _w_u16(bytearray out, long v) except -1:
    if v < 0 or v > MAX_U16:
        raise ValueError(f"{v} does not fit in two bytes")
    out.append(v >> 8)
    out.append(v & 0xFF)
    return 0


cdef int _w_u32(bytearray out, long long v) except -1:
    if v < 0 or v > 0xFFFFFFFF:
        raise ValueError(f"{v} does not fit in four bytes")
    out.append((v >> 24) & 0xFF)
    out.append((v >> 16) & 0xFF)
    out.append((v >> 8) & 0xFF)
    out.append(v & 0xFF)
    return 0


cdef int _w_bin(bytearray out, bytes data) except -1:
    if data is None:
        raise TypeError("MQTT binary data cannot be None")
    cdef Py_ssize_t n = len(data)
    if n > MAX_U16:
        raise ValueError(f"{n} bytes do not fit in an MQTT string or binary field")
    out.append(n >> 8)
    out.append(n & 0xFF)
    out += data
    return 0


cdef int _w_str(bytearray out, str s) except -1:
    if s is None:
        raise TypeError("an MQTT string cannot be None")
    return _w_bin(out, s.encode("utf-8"))


cdef int _w_packet_id(bytearray out, long packet_id) except -1:
    if packet_id < 1 or packet_id > MAX_U16:
        raise ValueError(f"packet identifier {packet_id} is not in 1..65535")
    return _w_u16(out, packet_id)


cdef bytearray _props_body(dict props, int slot):
    cdef bytearray out = bytearray()
    cdef uint64_t allowed = _allowed[slot]
    cdef unsigned char pid
    cdef PropKind kind
    if not props:
        return out
    for name, value in props.items():
        found = _prop_ids.get(name)
        if found is None:
            raise ValueError(f"unknown MQTT property {name!r}")
        pid = found
        if not (allowed & ((<uint64_t>1) << pid)):
            raise ValueError(f"property {name} is not allowed in this packet")
        kind = _prop_kind[pid]
        if pid == PROP_SUBSCRIPTION_IDENTIFIER:
            if not isinstance(value, list):
                raise TypeError("subscription_identifier must be a list of ints")
            if len(value) > 1 and slot != PT_PUBLISH and slot != SLOT_ANY:
                raise ValueError("only PUBLISH carries several subscription identifiers")
            for item in value:
                out.append(pid)
                _w_varint(out, item)
        elif kind == PK_PAIR:
            if not isinstance(value, list):
                raise TypeError("user_property must be a list of (str, str) tuples")
            for key, item in value:
                out.append(pid)
                _w_str(out, key)
                _w_str(out, item)
        else:
            out.append(pid)
            if kind == PK_BYTE:
                _w_byte(out, value)
            elif kind == PK_U16:
                _w_u16(out, value)
            elif kind == PK_U32:
                _w_u32(out, value)
            elif kind == PK_STR:
                _w_str(out, value)
            else:
                _w_bin(out, value)
    return out


cdef int _w_props(bytearray out, dict props, int slot) except -1:
    cdef bytearray body = _props_body(props, slot)
    _w_varint(out, len(body))
    out += body
    return 0


cdef bytes _frame(int b0, bytearray body):
    cdef bytearray out = bytearray()
    out.append(b0)
    _w_varint(out, len(body))
    out += body
    return bytes(out)


cdef bytes _encode_publish(Publish pkt, int version):
    cdef Py_ssize_t topic_len, payload_len, props_len = 0, length, total, i
    cdef const char* topic
    cdef bytes props = None
    cdef bytes payload = pkt.payload
    cdef bytes out
    cdef unsigned char* w
    if pkt.topic is None:
        raise TypeError("PUBLISH topic cannot be None")
    if payload is None:
        raise TypeError("PUBLISH payload cannot be None")
    if pkt.qos < 0 or pkt.qos > 2:
        raise ValueError(f"PUBLISH QoS {pkt.qos}")
    if pkt.qos and (pkt.packet_id < 1 or pkt.packet_id > MAX_U16):
        raise ValueError(f"packet identifier {pkt.packet_id} is not in 1..65535")
    # §3.3.1.1 [MQTT-3.3.1-2]: DUP must be 0 for QoS 0.
    if pkt.dup and not pkt.qos:
        raise ValueError("PUBLISH with DUP set and QoS 0")
    topic = PyUnicode_AsUTF8AndSize(pkt.topic, &topic_len)
    if topic_len > MAX_U16:
        raise ValueError("topic longer than 65535 bytes")
    payload_len = len(payload)
    length = 2 + topic_len + payload_len + (2 if pkt.qos else 0)
    if version == 5:
        props = bytes(_props_body(pkt.properties, PT_PUBLISH))
        props_len = len(props)
        length += _varint_size(props_len) + props_len
    if length > MAX_VARINT:
        raise ValueError(f"PUBLISH of {length} bytes is past the MQTT limit")
    total = 1 + _varint_size(length) + length
    out = PyBytes_FromStringAndSize(NULL, total)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    # §3.3.1: DUP bit 3, QoS bits 1-2, RETAIN bit 0.
    w[0] = ((PT_PUBLISH << 4) | (0x08 if pkt.dup else 0) | (pkt.qos << 1)
            | (0x01 if pkt.retain else 0))
    i = 1
    while length >= 128:
        w[i] = (length & 0x7F) | 0x80
        length >>= 7
        i += 1
    w[i] = length
    i += 1
    w[i] = topic_len >> 8
    w[i + 1] = topic_len & 0xFF
    memcpy(w + i + 2, topic, topic_len)
    i += 2 + topic_len
    if pkt.qos:
        w[i] = pkt.packet_id >> 8
        w[i + 1] = pkt.packet_id & 0xFF
        i += 2
    if version == 5:
        length = props_len
        while length >= 128:
            w[i] = (length & 0x7F) | 0x80
            length >>= 7
            i += 1
        w[i] = length
        i += 1
        memcpy(w + i, PyBytes_AS_STRING(props), props_len)
        i += props_len
    memcpy(w + i, PyBytes_AS_STRING(payload), payload_len)
    return out


cdef bytes _encode_connect(Connect pkt, int version):
    cdef bytearray body = bytearray()
    cdef Will will = pkt.will
    cdef int flags = 0
    _w_str(body, pkt.protocol_name)
    # The level byte is the version the packet is encoded in (its layout
    # depends on it), not pkt.protocol_level.
    body.append(version)
    if pkt.clean_start:
        flags |= 0x02
    if will is not None:
        if will.qos < 0 or will.qos > 2:
            raise ValueError(f"Will QoS {will.qos}")
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if pkt.password is not None:
        if version == 4 and pkt.username is None:
            raise ValueError("MQTT 3.1.1 does not allow a password without a user name")
        flags |= 0x40
    if pkt.username is not None:
        flags |= 0x80
    body.append(flags)
    _w_u16(body, pkt.keepalive)
    if version == 5:
        _w_props(body, pkt.properties, PT_CONNECT)
    _w_str(body, pkt.client_id)
    if will is not None:
        if version == 5:
            _w_props(body, will.properties, SLOT_WILL)
        _w_str(body, will.topic)
        _w_bin(body, will.payload)
    if pkt.username is not None:
        _w_str(body, pkt.username)
    if pkt.password is not None:
        _w_bin(body, pkt.password)
    return _frame(PT_CONNECT << 4, body)


cdef bytes _encode_connack(Connack pkt, int version):
    cdef bytearray body = bytearray()
    body.append(1 if pkt.session_present else 0)
    _w_byte(body, pkt.reason_code)
    if version == 5:
        _w_props(body, pkt.properties, PT_CONNACK)
    return _frame(PT_CONNACK << 4, body)


cdef bytes _encode_subscribe(Subscribe pkt, int version):
    cdef bytearray body = bytearray()
    if not pkt.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    _w_packet_id(body, pkt.packet_id)
    if version == 5:
        _w_props(body, pkt.properties, PT_SUBSCRIBE)
    for topic_filter, options in pkt.subscriptions:
        _w_str(body, topic_filter)
        _w_byte(body, options)
    return _frame((PT_SUBSCRIBE << 4) | 0x02, body)


cdef bytes _encode_codes(int b0, int packet_id, list codes, dict props, int slot,
                         bint with_codes, int version):
    """SUBACK and UNSUBACK: packet id, v5 properties, one code per filter."""
    cdef bytearray body = bytearray()
    _w_packet_id(body, packet_id)
    if version == 5:
        _w_props(body, props, slot)
    if with_codes:
        for code in codes:
            _w_byte(body, code)
    return _frame(b0, body)


cdef bytes _encode_unsubscribe(Unsubscribe pkt, int version):
    cdef bytearray body = bytearray()
    if not pkt.filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    _w_packet_id(body, pkt.packet_id)
    if version == 5:
        _w_props(body, pkt.properties, PT_UNSUBSCRIBE)
    for topic_filter in pkt.filters:
        _w_str(body, topic_filter)
    return _frame((PT_UNSUBSCRIBE << 4) | 0x02, body)


cdef bytes _encode_reason_and_props(int ptype, int reason_code, dict props, int version):
    """DISCONNECT and AUTH: shortest form, as §3.14.2.1 / §3.15.2.1 allow."""
    cdef bytearray body = bytearray()
    if version == 5 and (reason_code or props):
        _w_byte(body, reason_code)
        if props:
            _w_props(body, props, ptype)
    return _frame(ptype << 4, body)


cdef bytes _encode_ack_full(Ack pkt, int version):
    cdef bytearray body
    if version == 4 or not pkt.properties:
        return encode_ack(pkt.type, pkt.packet_id, pkt.reason_code, version)
    body = bytearray()
    _w_packet_id(body, pkt.packet_id)
    _w_byte(body, pkt.reason_code)
    _w_props(body, pkt.properties, pkt.type)
    return _frame((pkt.type << 4) | (0x02 if pkt.type == PT_PUBREL else 0), body)


def encode(packet, int version):
    """Encode any packet class in MQTT 3.1.1 (version 4) or 5.0 (version 5).

    In 3.1.1, properties and the fields 3.1.1 lacks (DISCONNECT reason code,
    UNSUBACK reason codes) are ignored.
    """
    cdef Packet pkt = packet
    cdef int ptype
    if version != 4 and version != 5:
        raise ValueError(f"MQTT version must be 4 or 5, not {version}")
    ptype = pkt.type
    if ptype == PT_PUBLISH:
        return _encode_publish(<Publish>pkt, version)
    if PT_PUBACK <= ptype <= PT_PUBCOMP:
        return _encode_ack_full(<Ack>pkt, version)
    if ptype == PT_CONNECT:
        return _encode_connect(<Connect>pkt, version)
    if ptype == PT_CONNACK:
        return _encode_connack(<Connack>pkt, version)
    if ptype == PT_SUBSCRIBE:
        return _encode_subscribe(<Subscribe>pkt, version)
    if ptype == PT_SUBACK:
        if not (<Suback>pkt).reason_codes:
            raise ValueError("SUBACK needs at least one reason code")
        return _encode_codes(PT_SUBACK << 4, (<Suback>pkt).packet_id,
                             (<Suback>pkt).reason_codes, (<Suback>pkt).properties,
                             PT_SUBACK, True, version)
    if ptype == PT_UNSUBSCRIBE:
        return _encode_unsubscribe(<Unsubscribe>pkt, version)
    if ptype == PT_UNSUBACK:
        return _encode_codes(PT_UNSUBACK << 4, (<Unsuback>pkt).packet_id,
                             (<Unsuback>pkt).reason_codes, (<Unsuback>pkt).properties,
                             PT_UNSUBACK, version == 5, version)
    if ptype == PT_PINGREQ:
        return b"\xc0\x00"
    if ptype == PT_PINGRESP:
        return b"\xd0\x00"
    if ptype == PT_DISCONNECT:
        return _encode_reason_and_props(PT_DISCONNECT, (<Disconnect>pkt).reason_code,
                                        (<Disconnect>pkt).properties, version)
    if ptype == PT_AUTH:
        if version != 5:
            raise ValueError("AUTH exists only in MQTT 5.0")
        return _encode_reason_and_props(PT_AUTH, (<Auth>pkt).reason_code,
                                        (<Auth>pkt).properties, version)
    raise TypeError(f"cannot encode {packet!r}")


def encode_ack(int ptype, int packet_id, int reason_code=0, int version=4):
    """PUBACK/PUBREC/PUBREL/PUBCOMP without properties, in 4 or 5 bytes."""
    cdef bytes out
    cdef unsigned char* w
    cdef Py_ssize_t n
    if ptype < PT_PUBACK or ptype > PT_PUBCOMP:
        raise ValueError(f"encode_ack takes PUBACK..PUBCOMP, not {ptype}")
    if packet_id < 1 or packet_id > MAX_U16:
        raise ValueError(f"packet identifier {packet_id} is not in 1..65535")
    if reason_code < 0 or reason_code > 0xFF:
        raise ValueError(f"reason code {reason_code}")
    # MQTT 5.0 §3.4.2.1: a Success reason code with no properties may be
    # omitted, giving the 3.1.1 layout.
    n = 5 if (version == 5 and reason_code) else 4
    out = PyBytes_FromStringAndSize(NULL, n)
    w = <unsigned char*>PyBytes_AS_STRING(out)
    # §3.6.1: PUBREL's fixed header flags are 0b0010.
    w[0] = (ptype << 4) | (0x02 if ptype == PT_PUBREL else 0)
    w[1] = n - 2
    w[2] = packet_id >> 8
    w[3] = packet_id & 0xFF
    if n == 5:
        w[4] = reason_code
    return out


def encode_properties(props):
    """A property section without its length prefix (empty for None or {})."""
    return bytes(_props_body(props, SLOT_ANY))


def decode_properties(buf):
    """Inverse of encode_properties; None when there are no properties."""
    cdef const unsigned char[:] view = buf
    if view.shape[0] == 0:
        return None
    return _decode_props(&view[0], 0, view.shape[0], SLOT_ANY)


def encode_remaining_length(Py_ssize_t n):
    """The Variable Byte Integer encoding of n (§1.5.5); ValueError past 268435455."""
    cdef bytearray out = bytearray()
    _w_varint(out, n)
    return bytes(out)


def decode_remaining_length(buf, Py_ssize_t start, Py_ssize_t end):
    """(value, next_offset) of the Variable Byte Integer at buf[start:end].

    value is -1 (and next_offset start) when the buffer ends first.
    """
    cdef const unsigned char[:] view = buf
    cdef Py_ssize_t value, next_pos
    cdef VarintStatus status
    if start < 0 or start > end or end > view.shape[0]:
        raise ValueError(f"bad window [{start}, {end}) for a buffer of {view.shape[0]}")
    if start == end:
        return -1, start
    status = read_varint(&view[0], start, end, &value, &next_pos)
    if status == VARINT_MALFORMED:
        raise MalformedPacket("remaining length longer than 4 bytes")
    if status == VARINT_INCOMPLETE:
        return -1, start
    return value, next_pos
