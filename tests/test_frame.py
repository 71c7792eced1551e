"""MQTT framing core: byte-exact encodings, decoding, splits and every error.

Property-based tests (round-trip, random splits, random bytes) are in
test_frame_props.py.
"""

import copy
import pickle

import pytest

from pushcore import _frame as f
from pushcore.errors import (
    MalformedPacket,
    MQTTError,
    PacketTooLarge,
    ProtocolError,
    TopicNameInvalid,
    UnsupportedProtocolVersion,
)

CONNECT_V4 = f.encode(f.Connect(client_id="c"), 4)
CONNECT_V5 = f.encode(f.Connect(client_id="c"), 5)


def parse_all(data, version=0, **kwargs):
    """Parse bytes with a fresh parser; return (packets, consumed_to, error)."""
    parser = f.Parser(version=version, **kwargs)
    return parser.parse(bytearray(data), 0, len(data))


def parse_one(data, version):
    packets, consumed, error = parse_all(data, version)
    assert error is None
    assert consumed == len(data)
    assert len(packets) == 1
    return packets[0]


def parse_error(data, version):
    """The error a server raises on data, sent after a CONNECT of `version`."""
    prefix = {0: b"", 4: CONNECT_V4, 5: CONNECT_V5}[version]
    packets, consumed, error = parse_all(prefix + data)
    assert isinstance(error, MQTTError)
    assert len(packets) == (1 if prefix else 0)
    assert consumed == len(prefix)
    return error


def feed(parser, chunks):
    """Feed chunks as a connection's receive buffer would: append, parse, drop
    what was consumed and keep the partial tail."""
    buf = bytearray()
    packets = []
    for chunk in chunks:
        buf += chunk
        got, consumed, error = parser.parse(buf, 0, len(buf))
        assert error is None
        packets.extend(got)
        del buf[:consumed]
    assert not buf
    return packets


# ---------------------------------------------------------------------------
# Constants and packet classes


def test_packet_type_constants():
    names = ["CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
             "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP",
             "DISCONNECT", "AUTH"]
    assert [getattr(f, name) for name in names] == list(range(1, 16))


def test_packet_type_attribute():
    assert f.Publish("a").type == f.PUBLISH
    assert f.Connect().type == f.CONNECT
    assert f.Ack(f.PUBREC, 3).type == f.PUBREC
    assert f.Pingresp().type == f.PINGRESP
    assert f.Auth().type == f.AUTH
    with pytest.raises(AttributeError):
        f.Publish("a").type = 4
    with pytest.raises(ValueError):
        f.Ack(f.SUBACK, 1)


def test_constructor_defaults():
    c = f.Connect()
    assert (c.client_id, c.clean_start, c.keepalive, c.protocol_level, c.protocol_name,
            c.username, c.password, c.will, c.properties) == (
        "", True, 60, 4, "MQTT", None, None, None, None)
    p = f.Publish("t")
    assert (p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id, p.properties) == (
        "t", b"", 0, False, False, 0, None)
    assert f.Unsuback(1).reason_codes == []
    w = f.Will("w")
    assert (w.payload, w.qos, w.retain, w.properties) == (b"", 0, False, None)


def test_equality_compares_every_field():
    assert f.Publish("a", b"x", 1, packet_id=2) == f.Publish("a", b"x", 1, packet_id=2)
    assert f.Publish("a", b"x", 1, packet_id=2) != f.Publish("a", b"x", 1, packet_id=3)
    assert f.Publish("a", retain=True) != f.Publish("a")
    assert f.Ack(f.PUBACK, 1) != f.Ack(f.PUBREC, 1)
    assert f.Pingreq() == f.Pingreq()
    assert f.Pingreq() != f.Pingresp()
    assert f.Disconnect(0x8E) != f.Disconnect()
    assert f.Connect(will=f.Will("w", b"1")) != f.Connect(will=f.Will("w", b"2"))


@pytest.mark.parametrize("packet", [
    f.Publish("a", b"x", 1, True, True, 3, {"topic_alias": 1}),
    f.Connect("c", False, 5, 5, "MQTT", "u", b"p", f.Will("w", b"1", 2, True), None),
    f.Ack(f.PUBREL, 9, 0x92),
    f.Subscribe(1, [("a/#", 1)]),
    f.Unsuback(2, [0]),
    f.Pingreq(),
    f.Auth(0x18),
], ids=repr)
def test_packets_pickle_and_copy(packet):
    assert pickle.loads(pickle.dumps(packet)) == packet
    assert copy.copy(packet) == packet


def test_repr_is_readable_and_truncates_payloads():
    assert repr(f.Ack(f.PUBACK, 7)) == "Ack(type=4, packet_id=7, reason_code=0, properties=None)"
    text = repr(f.Publish("t/1", b"x" * 1000, qos=1, packet_id=5))
    assert text.startswith("Publish(topic='t/1', payload=b'xxxx")
    assert "(1000 bytes)" in text and "packet_id=5" in text
    assert len(text) < 200


# ---------------------------------------------------------------------------
# Byte-exact encodings (3.1.1 §3 / 5.0 §3 examples)

EXACT = [
    # (packet, version, bytes)
    (f.Ack(f.PUBACK, 1), 4, b"\x40\x02\x00\x01"),
    (f.Ack(f.PUBREC, 0x1234), 4, b"\x50\x02\x12\x34"),
    (f.Ack(f.PUBREL, 1), 4, b"\x62\x02\x00\x01"),
    (f.Ack(f.PUBCOMP, 1), 4, b"\x70\x02\x00\x01"),
    (f.Ack(f.PUBACK, 1), 5, b"\x40\x02\x00\x01"),
    (f.Ack(f.PUBACK, 1, 0x10), 5, b"\x40\x03\x00\x01\x10"),
    (f.Ack(f.PUBREC, 2, 0x80, {"reason_string": "no"}), 5,
     b"\x50\x09\x00\x02\x80\x05\x1f\x00\x02no"),
    (f.Connack(False, 0), 4, b"\x20\x02\x00\x00"),
    (f.Connack(True, 0), 4, b"\x20\x02\x01\x00"),
    (f.Connack(False, 0x05), 4, b"\x20\x02\x00\x05"),
    (f.Connack(False, 0), 5, b"\x20\x03\x00\x00\x00"),
    (f.Connack(True, 0, {"receive_maximum": 10}), 5, b"\x20\x06\x01\x00\x03\x21\x00\x0a"),
    (f.Connect(client_id="abc", protocol_level=4), 4,
     b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc"),
    (f.Connect(client_id="abc", protocol_level=5), 5,
     b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc"),
    (f.Connect(client_id="", clean_start=False, keepalive=10, username="u", password=b"p",
               will=f.Will("w", b"x", qos=1, retain=True)), 4,
     b"\x10\x18\x00\x04MQTT\x04\xec\x00\x0a\x00\x00\x00\x01w\x00\x01x\x00\x01u\x00\x01p"),
    (f.Publish("a/b", b"hi"), 4, b"\x30\x07\x00\x03a/bhi"),
    (f.Publish("a/b", b"hi", qos=1, retain=True, dup=True, packet_id=10), 4,
     b"\x3b\x09\x00\x03a/b\x00\x0ahi"),
    (f.Publish("a/b", b"hi", qos=2, packet_id=10), 5, b"\x34\x0a\x00\x03a/b\x00\x0a\x00hi"),
    (f.Publish("", b"", properties={"topic_alias": 3}), 5, b"\x30\x06\x00\x00\x03\x23\x00\x03"),
    (f.Subscribe(1, [("a/b", 1)]), 4, b"\x82\x08\x00\x01\x00\x03a/b\x01"),
    # The SUBSCRIBE/SUBACK pair captured from MQTTX in the EMQX MQTT 5.0 series.
    (f.Subscribe(0x05BE, [("demo", 2)]), 5, b"\x82\x0a\x05\xbe\x00\x00\x04demo\x02"),
    (f.Suback(0x05BE, [2]), 5, b"\x90\x04\x05\xbe\x00\x02"),
    (f.Suback(1, [0, 1, 2, 0x80]), 4, b"\x90\x06\x00\x01\x00\x01\x02\x80"),
    (f.Unsubscribe(5, ["a", "b/#"]), 4, b"\xa2\x0a\x00\x05\x00\x01a\x00\x03b/#"),
    (f.Unsuback(5), 4, b"\xb0\x02\x00\x05"),
    (f.Unsuback(5, [0, 0x11]), 5, b"\xb0\x05\x00\x05\x00\x00\x11"),
    (f.Pingreq(), 4, b"\xc0\x00"),
    (f.Pingresp(), 5, b"\xd0\x00"),
    (f.Disconnect(), 4, b"\xe0\x00"),
    (f.Disconnect(), 5, b"\xe0\x00"),
    (f.Disconnect(0x8E), 5, b"\xe0\x01\x8e"),
    (f.Disconnect(0, {"session_expiry_interval": 1}), 5,
     b"\xe0\x07\x00\x05\x11\x00\x00\x00\x01"),
    (f.Auth(), 5, b"\xf0\x00"),
    (f.Auth(0x18, {"authentication_method": "m"}), 5, b"\xf0\x06\x18\x04\x15\x00\x01m"),
]


@pytest.mark.parametrize("packet,version,data", EXACT, ids=lambda v: None)
def test_encode_is_byte_exact(packet, version, data):
    assert f.encode(packet, version) == data


@pytest.mark.parametrize("packet,version,data", EXACT, ids=lambda v: None)
def test_decode_byte_exact_packets(packet, version, data):
    if packet.type == f.CONNECT:
        decoded = parse_one(data, 0)
        assert decoded == packet
        return
    assert parse_one(data, version) == packet


def test_encode_ack_fast_path():
    assert f.encode_ack(f.PUBACK, 1) == b"\x40\x02\x00\x01"
    assert f.encode_ack(f.PUBREL, 0xFFFF) == b"\x62\x02\xff\xff"
    assert f.encode_ack(f.PUBACK, 1, 0, 5) == b"\x40\x02\x00\x01"
    assert f.encode_ack(f.PUBACK, 1, 0x97, 5) == b"\x40\x03\x00\x01\x97"
    assert f.encode_ack(f.PUBCOMP, 9, 0x92, 5) == b"\x70\x03\x00\x09\x92"
    # 3.1.1 acks have no reason code.
    assert f.encode_ack(f.PUBACK, 1, 0x97, 4) == b"\x40\x02\x00\x01"
    for bad in ((f.PUBLISH, 1), (f.PUBACK, 0), (f.PUBACK, 65536)):
        with pytest.raises(ValueError):
            f.encode_ack(*bad)
    with pytest.raises(ValueError):
        f.encode_ack(f.PUBACK, 1, 256, 5)


# ---------------------------------------------------------------------------
# Decoding, one packet of each type and version

SAMPLES_V4 = [
    f.Connack(True, 0),
    f.Publish("sensors/1/temp", b"21.5", qos=0),
    f.Publish("s", b"", qos=1, retain=True, packet_id=1),
    f.Publish("\u00e9t\u00e9/\U0001f600", b"\x00\xff", qos=2, dup=True, packet_id=65535),
    f.Ack(f.PUBACK, 1),
    f.Ack(f.PUBREC, 2),
    f.Ack(f.PUBREL, 3),
    f.Ack(f.PUBCOMP, 4),
    f.Subscribe(7, [("a/+", 0), ("b/#", 1), ("c", 2)]),
    f.Suback(7, [0, 1, 0x80]),
    f.Unsubscribe(8, ["a/+", "b/#"]),
    f.Unsuback(8),
    f.Pingreq(),
    f.Pingresp(),
    f.Disconnect(),
]

SAMPLES_V5 = [
    f.Connack(False, 0x87, {"reason_string": "nope", "user_property": [("a", "1"), ("a", "2")]}),
    f.Connack(True, 0, {
        "session_expiry_interval": 3600, "assigned_client_identifier": "auto-1",
        "server_keep_alive": 30, "receive_maximum": 100, "topic_alias_maximum": 10,
        "maximum_qos": 1, "retain_available": 0, "maximum_packet_size": 1 << 20,
        "wildcard_subscription_available": 1, "subscription_identifier_available": 1,
        "shared_subscription_available": 0, "response_information": "r/",
        "server_reference": "other:1883", "authentication_method": "SCRAM",
        "authentication_data": b"\x01\x02"}),
    f.Publish("t", b"x" * 300, qos=1, packet_id=9, properties={
        "payload_format_indicator": 1, "message_expiry_interval": 60,
        "content_type": "text/plain", "response_topic": "reply/1",
        "correlation_data": b"\x00id", "subscription_identifier": [1, 268435455],
        "topic_alias": 4, "user_property": [("message-id", "m1"), ("k", "")]}),
    f.Publish("", b"p", properties={"topic_alias": 1}),
    f.Ack(f.PUBACK, 1, 0x10),
    f.Ack(f.PUBREC, 2, 0x80, {"reason_string": "full"}),
    f.Ack(f.PUBREL, 3, 0x92, {"user_property": [("x", "y")]}),
    f.Ack(f.PUBCOMP, 4),
    f.Subscribe(7, [("a/+", 0x2d), ("$share/g/b", 0x02)],
                {"subscription_identifier": [42], "user_property": [("u", "v")]}),
    f.Suback(7, [0, 1, 2, 0x80, 0x87, 0x8F, 0x9E, 0xA1, 0xA2], {"reason_string": "partly"}),
    f.Unsubscribe(8, ["a/+"], {"user_property": [("u", "v")]}),
    f.Unsuback(8, [0, 0x11], {"reason_string": "r"}),
    f.Pingreq(),
    f.Pingresp(),
    f.Disconnect(0x04, {"session_expiry_interval": 0, "reason_string": "bye",
                        "server_reference": "s"}),
    f.Auth(0x18, {"authentication_method": "SCRAM", "authentication_data": b"x",
                  "reason_string": "more", "user_property": [("a", "b")]}),
]


@pytest.mark.parametrize("packet", SAMPLES_V4, ids=repr)
def test_decode_v4(packet):
    assert parse_one(f.encode(packet, 4), 4) == packet


@pytest.mark.parametrize("packet", SAMPLES_V5, ids=repr)
def test_decode_v5(packet):
    assert parse_one(f.encode(packet, 5), 5) == packet


@pytest.mark.parametrize("version", [4, 5])
def test_decode_connect_with_everything(version):
    will_props = {"will_delay_interval": 5, "payload_format_indicator": 1,
                  "message_expiry_interval": 9, "content_type": "c", "response_topic": "r",
                  "correlation_data": b"d", "user_property": [("w", "p")]}
    props = {"session_expiry_interval": 0xFFFFFFFF, "receive_maximum": 20,
             "maximum_packet_size": 4096, "topic_alias_maximum": 3,
             "request_response_information": 1, "request_problem_information": 0,
             "user_property": [("a", "b")], "authentication_method": "m",
             "authentication_data": b"\x00"}
    packet = f.Connect(
        client_id="dev-\u00fc", clean_start=False, keepalive=0, protocol_level=version,
        username="user", password=b"\x00secret",
        will=f.Will("last/will", b"gone", qos=2, retain=True,
                    properties=will_props if version == 5 else None),
        properties=props if version == 5 else None)
    parser = f.Parser()
    packets, consumed, error = parser.parse(f.encode(packet, version), 0,
                                            len(f.encode(packet, version)))
    assert error is None and packets == [packet]
    assert parser.version == version


def test_connect_v5_password_without_user_name():
    packet = f.Connect(client_id="x", protocol_level=5, password=b"token")
    assert parse_one(f.encode(packet, 5), 0) == packet
    with pytest.raises(ValueError):
        f.encode(packet, 4)


def test_v311_encoding_ignores_properties_and_v5_fields():
    props = {"reason_string": "ignored"}
    assert f.encode(f.Ack(f.PUBACK, 1, 0x80, props), 4) == b"\x40\x02\x00\x01"
    assert f.encode(f.Disconnect(0x8E, props), 4) == b"\xe0\x00"
    assert f.encode(f.Unsuback(1, [0x11], props), 4) == b"\xb0\x02\x00\x01"
    assert f.encode(f.Publish("t", properties={"topic_alias": 1}), 4) == b"\x30\x03\x00\x01t"


def test_v311_packets_decode_without_properties():
    for packet in SAMPLES_V4:
        decoded = parse_one(f.encode(packet, 4), 4)
        assert getattr(decoded, "properties", None) is None


def test_empty_v5_property_section_decodes_to_none():
    assert parse_one(b"\x30\x04\x00\x01t\x00", 5).properties is None
    assert parse_one(f.encode(f.Publish("t", properties={}), 5), 5).properties is None


def test_parser_learns_version_from_connect_in_the_same_buffer():
    publish = f.Publish("t", b"v5", qos=1, packet_id=1, properties={"content_type": "x"})
    stream = CONNECT_V5 + f.encode(publish, 5) + f.encode_ack(f.PUBREC, 1, 0x10, 5)
    parser = f.Parser()
    assert parser.version == 0
    packets, consumed, error = parser.parse(stream, 0, len(stream))
    assert error is None and consumed == len(stream)
    assert packets[1:] == [publish, f.Ack(f.PUBREC, 1, 0x10)]
    assert parser.version == 5


def test_accepts_bytes_bytearray_and_memoryview_windows():
    packet = f.encode(f.Publish("t", b"1"), 4)
    data = b"junk" + packet + packet + b"junk"
    for buf in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        packets, consumed, error = f.Parser(version=4).parse(buf, 4, 4 + 2 * len(packet))
        assert error is None and consumed == 4 + 2 * len(packet)
        assert packets == [f.Publish("t", b"1")] * 2
    assert f.Parser(version=4).parse(data, 3, 3) == ([], 3, None)
    for start, end in ((-1, 3), (5, 4), (0, len(data) + 1)):
        with pytest.raises(ValueError):
            f.Parser(version=4).parse(data, start, end)


def test_repeated_topic_reuses_the_string():
    stream = f.encode(f.Publish("t/1", b"a"), 4) * 3
    packets = parse_all(stream, 4)[0]
    assert packets[0].topic is packets[1].topic is packets[2].topic


def test_parser_version_must_be_known():
    with pytest.raises(ValueError):
        f.Parser(version=3)


# ---------------------------------------------------------------------------
# Partial packets and splits


def test_partial_packet_is_left_in_place():
    packet = f.encode(f.Publish("t", b"payload", qos=1, packet_id=3), 4)
    data = packet + packet[:5]
    packets, consumed, error = parse_all(data, 4)
    assert error is None
    assert len(packets) == 1 and consumed == len(packet)
    # A lone first byte, and a header cut inside its remaining length.
    assert parse_all(b"\x30", 4) == ([], 0, None)
    assert parse_all(b"\x30\x80", 4) == ([], 0, None)
    assert parse_all(b"\x30\x80\x80\x80", 4) == ([], 0, None)


def mixed_stream():
    packets = [
        f.Connect(client_id="client-1", protocol_level=5, username="u", password=b"p",
                  will=f.Will("w", b"bye", 1), properties={"receive_maximum": 5}),
        f.Publish("t/1", b"x" * 200, qos=1, packet_id=1,
                  properties={"user_property": [("message-id", "1")]}),
        f.Publish("t/2", b"", qos=0),
        f.Ack(f.PUBREL, 1),
        f.Subscribe(2, [("t/#", 1)]),
        f.Pingreq(),
        f.Publish("t/3", b"y" * 20000, qos=2, packet_id=3),
        f.Disconnect(0, {"session_expiry_interval": 0}),
    ]
    return packets, b"".join(f.encode(p, 5) for p in packets)


def test_split_at_every_offset():
    packets, stream = mixed_stream()
    # The big PUBLISH makes every offset costly; cover each boundary region
    # exhaustively and the 20000-byte payload at a stride.
    big_start = stream.index(b"y" * 100)
    offsets = [i for i in range(len(stream) + 1) if not big_start + 50 < i < big_start + 19950]
    offsets += range(big_start + 50, big_start + 19950, 97)
    for i in offsets:
        assert feed(f.Parser(), [stream[:i], stream[i:]]) == packets, i


def test_byte_by_byte_feed():
    packets, _ = mixed_stream()
    packets[6].payload = b"y" * 20
    stream = b"".join(f.encode(p, 5) for p in packets)
    assert feed(f.Parser(), [stream[i:i + 1] for i in range(len(stream))]) == packets


def test_parsing_from_a_moving_start_offset():
    """A ring buffer that is not compacted: start advances to consumed_to."""
    packets, stream = mixed_stream()
    buf = bytearray(len(stream))
    parser = f.Parser()
    got = []
    start = 0
    for end in range(0, len(stream) + 1, 333):
        buf[:end] = stream[:end]
        new, start, error = parser.parse(buf, start, end)
        assert error is None
        got.extend(new)
    buf[:] = stream
    new, start, error = parser.parse(buf, start, len(stream))
    got.extend(new)
    assert got == packets and start == len(stream)


# ---------------------------------------------------------------------------
# Remaining length (§1.5.5 Variable Byte Integer)

VARINTS = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize("value,data", VARINTS)
def test_remaining_length_boundaries(value, data):
    assert f.encode_remaining_length(value) == data
    assert f.decode_remaining_length(b"\xaa" + data + b"\xbb", 1, 1 + len(data) + 1) == (
        value, 1 + len(data))
    # Every strict prefix is incomplete.
    for cut in range(len(data)):
        assert f.decode_remaining_length(data, 0, cut) == (-1, 0)


def test_remaining_length_one_past_the_limit():
    with pytest.raises(ValueError):
        f.encode_remaining_length(268435456)
    with pytest.raises(ValueError):
        f.encode_remaining_length(-1)
    with pytest.raises(MalformedPacket) as info:
        f.decode_remaining_length(b"\xff\xff\xff\xff\x01", 0, 5)
    assert info.value.reason_code == 0x81
    # Four bytes that all continue are already malformed: no fifth byte needed.
    with pytest.raises(MalformedPacket):
        f.decode_remaining_length(b"\x80\x80\x80\x80", 0, 4)


def test_largest_remaining_length_in_a_header():
    packets, consumed, error = parse_all(b"\x30\xff\xff\xff\x7f\x00", 4)
    assert (packets, consumed, error) == ([], 0, None)


# ---------------------------------------------------------------------------
# Errors: each asserts the class and the reason code it is answered with


def check(error, cls, code):
    assert type(error) is cls, error
    assert error.reason_code == code


@pytest.mark.parametrize("version", [4, 5])
def test_remaining_length_over_four_bytes(version):
    check(parse_error(b"\x30\xff\xff\xff\xff\x01", version), MalformedPacket, 0x81)


def test_first_packet_must_be_connect():
    check(parse_error(f.encode(f.Publish("t"), 4), 0), ProtocolError, 0x82)
    check(parse_error(b"\xc0\x00", 0), ProtocolError, 0x82)
    # Known from the first byte, without waiting for the rest.
    check(parse_error(b"G", 0), ProtocolError, 0x82)


def test_second_connect_is_a_protocol_error():
    check(parse_error(CONNECT_V4, 4), ProtocolError, 0x82)
    check(parse_error(CONNECT_V5, 5), ProtocolError, 0x82)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("data", [
    b"\x00\x00",                                  # packet type 0
    b"\x41\x02\x00\x01",                          # PUBACK flags 0b0001
    b"\x60\x02\x00\x01",                          # PUBREL flags 0b0000
    b"\x80\x06\x00\x01\x00\x01a\x00",             # SUBSCRIBE flags 0b0000
    b"\xa0\x05\x00\x01\x00\x01a",                 # UNSUBSCRIBE flags 0b0000
    b"\xc2\x00",                                  # PINGREQ flags 0b0010
    b"\xe8\x00",                                  # DISCONNECT flags 0b1000
    b"\x36\x05\x00\x01t\x00\x01",                 # PUBLISH QoS 3
    b"\x38\x03\x00\x01t",                         # PUBLISH DUP with QoS 0
])
def test_reserved_flags_and_types(version, data):
    check(parse_error(data, version), MalformedPacket, 0x81)


def test_reserved_connect_flags():
    check(parse_error(b"\x11" + CONNECT_V4[1:], 0), MalformedPacket, 0x81)


@pytest.mark.parametrize("version,data", [
    (4, b"\x40\x01\x00"),                         # ack body too short
    (4, b"\x40\x03\x00\x01\x00"),                 # 3.1.1 ack with a reason code
    (5, b"\x40\x04\x00\x01\x00\x05"),             # property length past the end
    (4, b"\x30\x02\x00\x05"),                     # topic length past the end
    (4, b"\x30\x01\x00"),                         # topic length cut
    (4, b"\x32\x04\x00\x01t\x00"),                # packet id cut
    (5, b"\x30\x03\x00\x01t"),                    # v5 PUBLISH without property length
    (4, b"\xc0\x01\x00"),                         # PINGREQ with a body
    (4, b"\xe0\x01\x00"),                         # 3.1.1 DISCONNECT with a body
    (5, b"\xe0\x03\x00\x00\x00"),                 # bytes after DISCONNECT properties
    (4, b"\x20\x03\x00\x00\x00"),                 # 3.1.1 CONNACK too long
    (4, b"\x20\x02\x02\x00"),                     # CONNACK reserved flag
    (4, b"\xb0\x03\x00\x01\x00"),                 # 3.1.1 UNSUBACK with codes
    (4, b"\x90\x03\x00\x01\x03"),                 # 3.1.1 SUBACK code 3
    (4, b"\x82\x07\x00\x01\x00\x03a/b"),          # SUBSCRIBE options missing
    (4, b"\xa2\x05\x00\x01\x00\x03a"),            # UNSUBSCRIBE filter cut
    (4, b"\xf0\x00"),                             # AUTH does not exist in 3.1.1
    (5, b"\x40\x05\x00\x01\x00\x01\x7f"),         # unknown property 0x7f
    (5, b"\x40\x05\x00\x01\x00\x01\x80"),         # property id with continuation bit
    (5, b"\x40\x06\x00\x01\x00\x02\x1f\x00"),     # property string length cut
    (5, b"\x30\x08\x00\x01t\x04\x02\x00\x00\x00"),  # four byte integer cut
    (5, b"\x30\x06\x00\x01t\x02\x0b\x80"),        # subscription identifier cut
])
def test_truncated_or_trailing_fields(version, data):
    check(parse_error(data, version), MalformedPacket, 0x81)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("topic", [b"a/+", b"#", b"a/#/b", b"+"])
def test_wildcard_in_publish_topic(version, topic):
    props = b"\x00" if version == 5 else b""
    data = b"\x30" + bytes([2 + len(topic) + len(props)]) + b"\x00" + bytes([len(topic)]) \
        + topic + props
    check(parse_error(data, version), TopicNameInvalid, 0x90)


def test_empty_topic():
    check(parse_error(b"\x30\x02\x00\x00", 4), TopicNameInvalid, 0x90)
    # MQTT 5.0 §3.3.2.1: zero length without a Topic Alias is a Protocol Error.
    check(parse_error(b"\x30\x03\x00\x00\x00", 5), ProtocolError, 0x82)
    check(parse_error(b"\x30\x05\x00\x00\x02\x01\x01", 5), ProtocolError, 0x82)
    assert parse_one(b"\x30\x06\x00\x00\x03\x23\x00\x07", 5).properties == {"topic_alias": 7}


BAD_UTF8 = [
    b"\x00",                  # U+0000
    b"a\x00b",
    b"\xc0\xaf",              # overlong '/'
    b"\xe0\x80\xaf",          # overlong, 3 bytes
    b"\xed\xa0\x80",          # surrogate U+D800
    b"\xf4\x90\x80\x80",      # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # 5-byte form
    b"\x80",                  # lone continuation
    b"\xc3",                  # truncated sequence
    b"\xe2\x82",
    b"\xff",
]


@pytest.mark.parametrize("raw", BAD_UTF8)
def test_invalid_utf8_is_malformed_everywhere(raw):
    s = len(raw).to_bytes(2, "big") + raw
    # PUBLISH topic
    check(parse_error(b"\x30" + bytes([len(s)]) + s, 4), MalformedPacket, 0x81)
    # SUBSCRIBE filter
    body = b"\x00\x01" + s + b"\x00"
    check(parse_error(b"\x82" + bytes([len(body)]) + body, 4), MalformedPacket, 0x81)
    # CONNECT client id
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + s
    check(parse_error(b"\x10" + bytes([len(body)]) + body, 0), MalformedPacket, 0x81)
    # A v5 string property (reason string in a PUBACK)
    props = b"\x1f" + s
    body = b"\x00\x01\x00" + bytes([len(props)]) + props
    check(parse_error(b"\x40" + bytes([len(body)]) + body, 5), MalformedPacket, 0x81)
    # A user property value
    props = b"\x26\x00\x01k" + s
    body = b"\x00\x01\x00" + bytes([len(props)]) + props
    check(parse_error(b"\x40" + bytes([len(body)]) + body, 5), MalformedPacket, 0x81)


def test_valid_utf8_edges_are_accepted():
    for text in ["\u007f", "\u0080", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\uffff",
                 "\U00010000", "\U0010ffff"]:
        packet = f.Publish(text)
        assert parse_one(f.encode(packet, 4), 4) == packet


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("data", [
    b"\x32\x05\x00\x01t\x00\x00",                 # PUBLISH QoS 1, packet id 0
    b"\x34\x05\x00\x01t\x00\x00",                 # PUBLISH QoS 2, packet id 0
    b"\x82\x06\x00\x00\x00\x01a\x00",             # SUBSCRIBE packet id 0
    b"\xa2\x05\x00\x00\x00\x01a",                 # UNSUBSCRIBE packet id 0
    b"\x40\x02\x00\x00",                          # PUBACK packet id 0
    b"\x62\x02\x00\x00",                          # PUBREL packet id 0
])
def test_packet_id_zero(version, data):
    if version == 5 and data[0] in (0x32, 0x34):
        data = bytes([data[0], data[1] + 1]) + data[2:] + b"\x00"
    if version == 5 and data[0] in (0x82, 0xA2):
        data = bytes([data[0], data[1] + 1]) + data[2:4] + b"\x00" + data[4:]
    # MQTT 5.0 §2.2.1: a well-formed packet with a forbidden value: Protocol Error.
    check(parse_error(data, version), ProtocolError, 0x82)


def test_packet_too_large_is_detected_from_the_header():
    parser = f.Parser(max_packet_size=100, version=4)
    # Header only: announces a 200-byte body.
    packets, consumed, error = parser.parse(b"\x30\xc8\x01", 0, 3)
    check(error, PacketTooLarge, 0x95)
    assert packets == [] and consumed == 0
    # The limit counts the whole packet: 1 + 1 + 98 bytes is allowed, 101 is not.
    ok = f.encode(f.Publish("t", b"x" * 95), 4)
    assert len(ok) == 100
    assert f.Parser(max_packet_size=100, version=4).parse(ok, 0, 100)[2] is None
    big = f.encode(f.Publish("t", b"x" * 96), 4)
    packets, consumed, error = f.Parser(max_packet_size=100, version=4).parse(
        ok + big[:2], 0, 102)
    check(error, PacketTooLarge, 0x95)
    assert len(packets) == 1 and consumed == 100


@pytest.mark.parametrize("name,level,expected_level", [
    (b"MQTT", 3, 3),
    (b"MQTT", 6, 6),
    (b"MQIsdp", 3, 3),
    (b"MQTX", 5, 5),
    (b"mqtt", 4, 4),
])
def test_unsupported_protocol(name, level, expected_level):
    body = len(name).to_bytes(2, "big") + name + bytes([level]) + b"\x02\x00\x3c\x00\x01c"
    error = parse_error(b"\x10" + bytes([len(body)]) + body, 0)
    check(error, UnsupportedProtocolVersion, 0x84)
    assert error.connack_v3 == 0x01
    assert error.protocol_level == expected_level


def connect_body(flags, level=4, payload=b"\x00\x01c"):
    props = b"\x00" if level == 5 else b""
    return b"\x00\x04MQTT" + bytes([level, flags]) + b"\x00\x3c" + props + payload


@pytest.mark.parametrize("flags,level", [
    (0x03, 4),      # reserved bit
    (0x03, 5),
    (0x1C, 4),      # Will QoS 3
    (0x08, 4),      # Will QoS without Will Flag
    (0x20, 5),      # Will Retain without Will Flag
    (0x42, 4),      # password without user name in 3.1.1
])
def test_bad_connect_flags(flags, level):
    body = connect_body(flags, level)
    parser = f.Parser()
    packets, consumed, error = parser.parse(b"\x10" + bytes([len(body)]) + body, 0,
                                            2 + len(body))
    check(error, MalformedPacket, 0x81)
    # The version is known, so the server can answer in the client's format.
    assert parser.version == level


def test_connect_truncated_and_trailing():
    good = connect_body(0x02)
    check(parse_error(b"\x10" + bytes([len(good) - 1]) + good[:-1], 0), MalformedPacket, 0x81)
    check(parse_error(b"\x10" + bytes([len(good) + 1]) + good + b"x", 0), MalformedPacket, 0x81)
    # User name flag set but no user name.
    body = connect_body(0x82)
    check(parse_error(b"\x10" + bytes([len(body)]) + body, 0), MalformedPacket, 0x81)


def test_will_topic_must_be_a_topic_name():
    for topic in (b"", b"a/#"):
        payload = b"\x00\x01c" + len(topic).to_bytes(2, "big") + topic + b"\x00\x00"
        body = connect_body(0x06, payload=payload)
        check(parse_error(b"\x10" + bytes([len(body)]) + body, 0), TopicNameInvalid, 0x90)


@pytest.mark.parametrize("version", [4, 5])
def test_empty_subscribe_and_unsubscribe(version):
    props = b"\x00" if version == 5 else b""
    body = b"\x00\x01" + props
    check(parse_error(b"\x82" + bytes([len(body)]) + body, version), ProtocolError, 0x82)
    check(parse_error(b"\xa2" + bytes([len(body)]) + body, version), ProtocolError, 0x82)
    check(parse_error(b"\x90" + bytes([len(body)]) + body, version), ProtocolError, 0x82)


@pytest.mark.parametrize("version,options,cls", [
    (4, 0x03, MalformedPacket),       # QoS 3
    (4, 0x04, MalformedPacket),       # 3.1.1: bits 2-7 reserved
    (4, 0x80, MalformedPacket),
    (5, 0x40, MalformedPacket),       # 5.0: bits 6-7 reserved
    (5, 0x80, MalformedPacket),
    (5, 0x03, ProtocolError),         # 5.0 §3.8.3.1: QoS 3
    (5, 0x30, ProtocolError),         # Retain Handling 3
])
def test_subscription_options(version, options, cls):
    props = b"\x00" if version == 5 else b""
    body = b"\x00\x01" + props + b"\x00\x01a" + bytes([options])
    error = parse_error(b"\x82" + bytes([len(body)]) + body, version)
    check(error, cls, cls.reason_code)


def test_v5_subscription_options_are_kept():
    # No Local, Retain As Published, Retain Handling 2, QoS 1.
    packet = parse_one(b"\x82\x07\x00\x01\x00\x00\x01a\x2d", 5)
    assert packet.subscriptions == [("a", 0x2D)]


def ack_with_props(props):
    body = b"\x00\x01\x00" + bytes([len(props)]) + props
    return b"\x40" + bytes([len(body)]) + body


def publish_with_props(props):
    body = b"\x00\x01t" + bytes([len(props)]) + props
    return b"\x30" + bytes([len(body)]) + body


@pytest.mark.parametrize("data", [
    ack_with_props(b"\x1f\x00\x01a\x1f\x00\x01b"),            # reason string twice
    publish_with_props(b"\x23\x00\x01\x23\x00\x02"),          # topic alias twice
    publish_with_props(b"\x01\x00\x01\x01"),                  # payload format twice
    ack_with_props(b"\x23\x00\x01"),                          # topic alias in PUBACK
    ack_with_props(b"\x11\x00\x00\x00\x01"),                  # session expiry in PUBACK
    publish_with_props(b"\x21\x00\x01"),                      # receive maximum in PUBLISH
    publish_with_props(b"\x18\x00\x00\x00\x01"),              # will delay in PUBLISH
    publish_with_props(b"\x01\x02"),                          # payload format 2
    publish_with_props(b"\x0b\x00"),                          # subscription identifier 0
])
def test_property_protocol_errors(data):
    check(parse_error(data, 5), ProtocolError, 0x82)


def test_property_rules_in_connect_and_subscribe():
    # Subscription Identifier twice in SUBSCRIBE (only PUBLISH may repeat it).
    body = b"\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00"
    check(parse_error(b"\x82" + bytes([len(body)]) + body, 5), ProtocolError, 0x82)
    # Receive Maximum 0, Maximum Packet Size 0, Request Problem Information 2.
    for props in (b"\x21\x00\x00", b"\x27\x00\x00\x00\x00", b"\x17\x02"):
        body = (b"\x00\x04MQTT\x05\x02\x00\x3c" + bytes([len(props)]) + props
                + b"\x00\x01c")
        check(parse_error(b"\x10" + bytes([len(body)]) + body, 0), ProtocolError, 0x82)
    # A Will property outside the Will, and a CONNECT property inside it.
    for props, will_props in ((b"\x18\x00\x00\x00\x01", b""), (b"", b"\x11\x00\x00\x00\x01")):
        body = (b"\x00\x04MQTT\x05\x06\x00\x3c" + bytes([len(props)]) + props + b"\x00\x01c"
                + bytes([len(will_props)]) + will_props + b"\x00\x01w\x00\x00")
        check(parse_error(b"\x10" + bytes([len(body)]) + body, 0), ProtocolError, 0x82)


def test_repeatable_properties():
    packet = parse_one(publish_with_props(
        b"\x0b\x01\x0b\x02\x26\x00\x01a\x00\x01b\x26\x00\x01a\x00\x01c"), 5)
    assert packet.properties == {"subscription_identifier": [1, 2],
                                 "user_property": [("a", "b"), ("a", "c")]}


def test_packets_before_an_error_are_returned():
    good = f.encode(f.Publish("ok", b"1"), 4)
    data = CONNECT_V4 + good + good + b"\x30\x03\x00\x01#" + good
    packets, consumed, error = parse_all(data)
    assert [p.topic for p in packets[1:]] == ["ok", "ok"]
    assert consumed == len(CONNECT_V4) + 2 * len(good)
    check(error, TopicNameInvalid, 0x90)


# ---------------------------------------------------------------------------
# Properties as stored by the log


def test_encode_decode_properties():
    props = {"user_property": [("message-id", "m-1"), ("key", "device-9")],
             "content_type": "application/json", "message_expiry_interval": 30,
             "subscription_identifier": [3, 4], "correlation_data": b"\x00\x01"}
    data = f.encode_properties(props)
    assert data.startswith(b"\x26\x00\x0amessage-id\x00\x03m-1")
    assert f.decode_properties(data) == props
    assert f.decode_properties(bytearray(data)) == props
    assert f.encode_properties(None) == b""
    assert f.encode_properties({}) == b""
    assert f.decode_properties(b"") is None


def test_decode_properties_errors():
    with pytest.raises(MalformedPacket):
        f.decode_properties(b"\x7f\x00")
    with pytest.raises(MalformedPacket):
        f.decode_properties(b"\x03\x00\x05ab")
    with pytest.raises(ProtocolError):
        f.decode_properties(b"\x03\x00\x00\x03\x00\x00")


@pytest.mark.parametrize("props,exc", [
    ({"no_such_property": 1}, ValueError),
    ({"payload_format_indicator": 256}, ValueError),
    ({"topic_alias": 65536}, ValueError),
    ({"message_expiry_interval": 1 << 32}, ValueError),
    ({"subscription_identifier": [268435456]}, ValueError),
    ({"subscription_identifier": 5}, TypeError),
    ({"user_property": ("a", "b")}, TypeError),
    ({"content_type": "x" * 65536}, ValueError),
])
def test_encode_properties_rejects_bad_values(props, exc):
    with pytest.raises(exc):
        f.encode_properties(props)


# ---------------------------------------------------------------------------
# Encoder argument checks


@pytest.mark.parametrize("packet,version", [
    (f.Publish("t", qos=1), 4),                           # QoS 1 needs a packet id
    (f.Publish("t", qos=3, packet_id=1), 4),
    (f.Publish("t", dup=True), 4),                        # DUP with QoS 0
    (f.Publish("t" * 65536), 4),
    (f.Publish("t", properties={"reason_string": "x"}), 5),   # not a PUBLISH property
    (f.Subscribe(1, []), 4),
    (f.Subscribe(0, [("a", 0)]), 4),
    (f.Subscribe(1, [("a", 0)], {"subscription_identifier": [1, 2]}), 5),
    (f.Unsubscribe(1, []), 4),
    (f.Suback(1, []), 4),
    (f.Auth(), 4),
    (f.Connect(will=f.Will("w", qos=3)), 4),
    (f.Publish("t"), 3),
])
def test_encode_rejects_what_the_parser_would_refuse(packet, version):
    with pytest.raises(ValueError):
        f.encode(packet, version)


def test_encode_rejects_non_packets():
    with pytest.raises(TypeError):
        f.encode(f.Will("w"), 4)
    with pytest.raises(TypeError):
        f.encode(b"\xc0\x00", 4)
