"""Property-based tests of the MQTT framing core (hypothesis).

- every packet type round-trips through encode and Parser.parse, in 3.1.1
  and 5.0, with generated fields and properties valid for the type;
- any split of a valid stream, fed as a receive buffer would, gives the same
  packets;
- arbitrary bytes, with and without a CONNECT before them, never make parse
  raise: it returns packets and None or an MQTTError.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore import _frame as f
from pushcore.errors import MQTTError

SETTINGS = settings(max_examples=200, deadline=None)

# MQTT 5.0 §1.5.4: any Unicode scalar value except U+0000 (surrogates cannot
# be encoded at all).
mqtt_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12)
# §4.7: topic names have no wildcards and at least one character.
topic_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"),
    min_size=1, max_size=12)
binary = st.binary(max_size=24)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
packet_ids = st.integers(1, 0xFFFF)
bits = st.integers(0, 1)

# Values each property may take (§3.x.2.x "It is a Protocol Error ..." rules).
PROPERTY_VALUES = {
    "payload_format_indicator": bits,
    "message_expiry_interval": u32,
    "content_type": mqtt_text,
    "response_topic": topic_names,
    "correlation_data": binary,
    "subscription_identifier": st.lists(st.integers(1, 268435455), min_size=1, max_size=3),
    "session_expiry_interval": u32,
    "assigned_client_identifier": mqtt_text,
    "server_keep_alive": u16,
    "authentication_method": mqtt_text,
    "authentication_data": binary,
    "request_problem_information": bits,
    "will_delay_interval": u32,
    "request_response_information": bits,
    "response_information": mqtt_text,
    "server_reference": mqtt_text,
    "reason_string": mqtt_text,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": bits,
    "retain_available": bits,
    "user_property": st.lists(st.tuples(mqtt_text, mqtt_text), min_size=1, max_size=3),
    "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
    "wildcard_subscription_available": bits,
    "subscription_identifier_available": bits,
    "shared_subscription_available": bits,
}

# The "Used in" column of MQTT 5.0 §2.2.2.2, written out independently of
# the implementation's table.
ALLOWED = {
    "will": ["payload_format_indicator", "message_expiry_interval", "content_type",
             "response_topic", "correlation_data", "will_delay_interval", "user_property"],
    f.CONNECT: ["session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information",
                "receive_maximum", "topic_alias_maximum", "user_property",
                "maximum_packet_size"],
    f.CONNACK: ["session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum",
                "topic_alias_maximum", "maximum_qos", "retain_available", "user_property",
                "maximum_packet_size", "wildcard_subscription_available",
                "subscription_identifier_available", "shared_subscription_available"],
    f.PUBLISH: ["payload_format_indicator", "message_expiry_interval", "content_type",
                "response_topic", "correlation_data", "subscription_identifier",
                "topic_alias", "user_property"],
    f.PUBACK: ["reason_string", "user_property"],
    f.SUBSCRIBE: ["subscription_identifier", "user_property"],
    f.SUBACK: ["reason_string", "user_property"],
    f.UNSUBSCRIBE: ["user_property"],
    f.UNSUBACK: ["reason_string", "user_property"],
    f.DISCONNECT: ["session_expiry_interval", "server_reference", "reason_string",
                   "user_property"],
    f.AUTH: ["authentication_method", "authentication_data", "reason_string",
             "user_property"],
}


def properties(slot, version):
    """None, or a non-empty dict of properties allowed in `slot` (what decode gives)."""
    if version == 4:
        return st.none()
    names = ALLOWED[slot]

    def build(chosen):
        values = {name: PROPERTY_VALUES[name] for name in chosen}
        if slot == f.SUBSCRIBE and "subscription_identifier" in values:
            values["subscription_identifier"] = st.lists(
                st.integers(1, 268435455), min_size=1, max_size=1)
        return st.fixed_dictionaries(values)

    return st.one_of(
        st.none(),
        st.sets(st.sampled_from(names), min_size=1, max_size=4).flatmap(build))


def wills(version):
    return st.builds(f.Will, topic_names, binary, st.integers(0, 2), st.booleans(),
                     properties("will", version))


@st.composite
def connects(draw, version):
    username = draw(st.none() | mqtt_text)
    password = draw(st.none() | binary)
    if version == 4 and username is None:
        password = None
    return f.Connect(
        client_id=draw(mqtt_text), clean_start=draw(st.booleans()), keepalive=draw(u16),
        protocol_level=version, username=username, password=password,
        will=draw(st.none() | wills(version)), properties=draw(properties(f.CONNECT, version)))


@st.composite
def publishes(draw, version):
    qos = draw(st.integers(0, 2))
    props = draw(properties(f.PUBLISH, version))
    topic = draw(topic_names)
    if props and "topic_alias" in props and draw(st.booleans()):
        topic = ""
    return f.Publish(
        topic, draw(st.binary(max_size=300)), qos, draw(st.booleans()),
        draw(st.booleans()) if qos else False, draw(packet_ids) if qos else 0, props)


def acks(version):
    reason = st.sampled_from([0, 0x10, 0x80, 0x87, 0x91, 0x92, 0x97]) if version == 5 \
        else st.just(0)
    ack_props = properties(f.PUBACK, version)

    @st.composite
    def build(draw):
        props = draw(ack_props)
        return f.Ack(draw(st.integers(f.PUBACK, f.PUBCOMP)), draw(packet_ids), draw(reason),
                     props)

    return build()


def subscribes(version):
    options = (st.integers(0, 2) | st.sampled_from([0x04, 0x09, 0x1A, 0x2E])) \
        if version == 5 else st.integers(0, 2)
    return st.builds(f.Subscribe, packet_ids,
                     st.lists(st.tuples(topic_names, options), min_size=1, max_size=4),
                     properties(f.SUBSCRIBE, version))


def subacks(version):
    codes = st.integers(0, 255) if version == 5 else st.sampled_from([0, 1, 2, 0x80])
    return st.builds(f.Suback, packet_ids, st.lists(codes, min_size=1, max_size=5),
                     properties(f.SUBACK, version))


def unsubscribes(version):
    return st.builds(f.Unsubscribe, packet_ids, st.lists(topic_names, min_size=1, max_size=4),
                     properties(f.UNSUBSCRIBE, version))


def unsubacks(version):
    codes = st.lists(st.integers(0, 255), max_size=5) if version == 5 else st.just([])
    return st.builds(f.Unsuback, packet_ids, codes, properties(f.UNSUBACK, version))


def reason_packets(cls, ptype, version):
    if version == 4:
        return st.builds(cls)
    return st.builds(cls, st.integers(0, 255), properties(ptype, version))


def connacks(version):
    code = st.integers(0, 255) if version == 5 else st.integers(0, 5)
    return st.builds(f.Connack, st.booleans(), code, properties(f.CONNACK, version))


def any_packet(version, with_connect=True):
    choices = [
        publishes(version), acks(version), subscribes(version), subacks(version),
        unsubscribes(version), unsubacks(version), connacks(version),
        st.builds(f.Pingreq), st.builds(f.Pingresp),
        reason_packets(f.Disconnect, f.DISCONNECT, version),
    ]
    if version == 5:
        choices.append(reason_packets(f.Auth, f.AUTH, version))
    if with_connect:
        choices.append(connects(version))
    return st.one_of(choices)


def decode(data, version):
    parser = f.Parser(version=version)
    packets, consumed, error = parser.parse(data, 0, len(data))
    assert error is None, error
    assert consumed == len(data)
    return packets


@SETTINGS
@given(st.data(), st.sampled_from([4, 5]))
def test_round_trip_every_packet_type(data, version):
    packet = data.draw(any_packet(version, with_connect=False))
    assert decode(f.encode(packet, version), version) == [packet]


@SETTINGS
@given(st.data(), st.sampled_from([4, 5]))
def test_round_trip_connect(data, version):
    packet = data.draw(connects(version))
    assert decode(f.encode(packet, version), 0) == [packet]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_round_trip_properties(data):
    props = data.draw(properties(f.PUBLISH, 5))
    assert f.decode_properties(f.encode_properties(props)) == props


def stream_strategy():
    @st.composite
    def build(draw):
        version = draw(st.sampled_from([4, 5]))
        packets = [draw(connects(version))]
        packets += draw(st.lists(any_packet(version, with_connect=False), max_size=8))
        return packets, b"".join(f.encode(p, version) for p in packets)

    return build()


@SETTINGS
@given(stream_strategy(), st.data())
def test_any_split_of_a_valid_stream(stream, data):
    packets, raw = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
    chunks = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
    parser = f.Parser()
    buf = bytearray()
    got = []
    for chunk in chunks:
        buf += chunk
        new, consumed, error = parser.parse(buf, 0, len(buf))
        assert error is None, error
        got.extend(new)
        del buf[:consumed]
    assert got == packets
    assert not buf


def check_never_raises(parser, data, prefix_count):
    packets, consumed, error = parser.parse(data, 0, len(data))
    assert error is None or isinstance(error, MQTTError)
    assert 0 <= consumed <= len(data)
    assert len(packets) >= prefix_count
    if error is not None:
        assert 0x80 <= error.reason_code <= 0xFF


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_without_connect(data):
    check_never_raises(f.Parser(), data, 0)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 5]), st.binary(max_size=200))
def test_arbitrary_bytes_after_connect(version, data):
    connect = f.encode(f.Connect(client_id="c"), version)
    check_never_raises(f.Parser(), connect + data, 1)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([4, 5]), st.binary(max_size=200))
def test_arbitrary_bytes_client_side(version, data):
    check_never_raises(f.Parser(version=version), data, 0)


@settings(max_examples=200, deadline=None)
@given(stream_strategy(), st.data())
def test_corrupted_valid_stream(stream, data):
    """Valid packets with bytes flipped: the parser reports, never raises."""
    _, raw = stream
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    check_never_raises(f.Parser(), bytes(raw), 0)
