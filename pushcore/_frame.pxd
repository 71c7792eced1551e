# Declarations of the MQTT framing core, for later .pyx modules (WebSocket,
# HTTP) that cimport the packet classes or feed unmasked bytes straight to
# Parser.parse_ptr without a Python call.

# MQTT 5.0 §2.1.2 / 3.1.1 §2.2.1: control packet types (4 high bits of byte 0).
cdef enum PacketType:
    PT_CONNECT = 1
    PT_CONNACK = 2
    PT_PUBLISH = 3
    PT_PUBACK = 4
    PT_PUBREC = 5
    PT_PUBREL = 6
    PT_PUBCOMP = 7
    PT_SUBSCRIBE = 8
    PT_SUBACK = 9
    PT_UNSUBSCRIBE = 10
    PT_UNSUBACK = 11
    PT_PINGREQ = 12
    PT_PINGRESP = 13
    PT_DISCONNECT = 14
    PT_AUTH = 15


# MQTT 5.0 §2.2.2.2 / §1.5: how each property value is encoded on the wire.
cdef enum PropKind:
    PK_NONE = 0          # not a defined property identifier
    PK_BYTE = 1
    PK_U16 = 2
    PK_U32 = 3
    PK_VARINT = 4
    PK_STR = 5
    PK_BIN = 6
    PK_PAIR = 7


# Result of reading a Variable Byte Integer from a buffer that may end early.
cdef enum VarintStatus:
    VARINT_MALFORMED = -1    # a 4th byte still has its continuation bit set
    VARINT_INCOMPLETE = 0    # the buffer ends before the last byte
    VARINT_OK = 1


cdef class _Struct:
    cdef tuple _values(self)


cdef class Packet(_Struct):
    cdef readonly int type


cdef class Will(_Struct):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public dict properties


cdef class Connect(Packet):
    cdef public str client_id
    cdef public bint clean_start
    cdef public int keepalive
    cdef public int protocol_level
    cdef public str protocol_name
    cdef public str username
    cdef public bytes password
    cdef public Will will
    cdef public dict properties


cdef class Connack(Packet):
    cdef public bint session_present
    cdef public int reason_code
    cdef public dict properties


cdef class Publish(Packet):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public dict properties


cdef class Ack(Packet):
    cdef public int packet_id
    cdef public int reason_code
    cdef public dict properties


cdef class Subscribe(Packet):
    cdef public int packet_id
    cdef public list subscriptions
    cdef public dict properties


cdef class Suback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Unsubscribe(Packet):
    cdef public int packet_id
    cdef public list filters
    cdef public dict properties


cdef class Unsuback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Pingreq(Packet):
    pass


cdef class Pingresp(Packet):
    pass


cdef class Disconnect(Packet):
    cdef public int reason_code
    cdef public dict properties


cdef class Auth(Packet):
    cdef public int reason_code
    cdef public dict properties


cdef VarintStatus read_varint(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                              Py_ssize_t* value, Py_ssize_t* next_pos) noexcept nogil


cdef class Parser:
    cdef public int version
    cdef public Py_ssize_t max_packet_size
    cdef str _last_topic
    cdef tuple parse_ptr(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end)
