"""The C ingest path (pushcore/_ingest.pyx) against its references.

murmur3 against mmh3, the record encoder against the format written down in
pushcore/record.py, the batch's semantics, and the MQTT fast path
(``ConnState.ingest_publishes`` + ``ack_committed``) against the same byte
stream handled packet by packet through ``handle_<verb>`` and ``committed``.
"""

import struct

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore import _frame
from pushcore._frame import Connect, Pingreq, Publish, encode
from pushcore._ingest import (Batch, Ingest, ack_committed, batch_partitions, batch_rows,
                              count_duplicates, encode_publish, id_entries)
from pushcore.mqtt import MQTT5, MQTT311, MQTTServerConnection, MQTTSettings
from pushcore.record import decode_record, encode_record, id_hash, partition_for

# -- murmur3 x86_32 -----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 2**32))
def test_partition_for_equals_mmh3(key, n):
    assert partition_for(key, n) == mmh3.hash(key, signed=False) % n
    assert partition_for(bytearray(key), n) == mmh3.hash(key, signed=False) % n


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_partition_for_str_key_is_its_utf8(key):
    assert partition_for(key, 1 << 32) == mmh3.hash(key.encode(), signed=False)


def test_partition_for_every_tail_length():
    data = bytes(range(1, 40))
    for n in range(len(data)):
        assert partition_for(data[:n], 1 << 32) == mmh3.hash(data[:n], signed=False)


# -- the record encoder --------------------------------------------------------


def documented_record(time_ms, topic, payload, qos, retain, msg_id, key, client_id, properties):
    """The record format of pushcore/record.py's docstring, written out with struct."""
    flags = qos | (0x04 if retain else 0)
    tail = b""
    if msg_id is not None:
        flags |= 0x08
        tail += struct.pack(">H", len(msg_id)) + msg_id
    if key is not None:
        flags |= 0x10
        tail += struct.pack(">H", len(key)) + key
    if properties:
        flags |= 0x20
        tail += struct.pack(">I", len(properties)) + properties
    t = topic.encode()
    c = client_id.encode()
    return (struct.pack(">BBQH", 1, flags, time_ms, len(t)) + t + struct.pack(">H", len(c)) + c
            + tail + payload)


@settings(max_examples=300, deadline=None)
@given(time_ms=st.integers(0, 2**64 - 1), topic=st.text(max_size=40),
       payload=st.binary(max_size=100), qos=st.integers(0, 2), retain=st.booleans(),
       msg_id=st.none() | st.binary(max_size=30), key=st.none() | st.binary(max_size=30),
       client_id=st.text(max_size=30), properties=st.binary(max_size=30))
def test_encode_record_is_the_documented_format(time_ms, topic, payload, qos, retain, msg_id,
                                                key, client_id, properties):
    expected = documented_record(time_ms, topic, payload, qos, retain, msg_id, key, client_id,
                                 properties)
    assert encode_record(time_ms, topic, payload, qos, retain, msg_id, key, client_id,
                         properties) == expected
    # Any bytes-like value is taken as its bytes.
    assert encode_record(time_ms, topic, bytearray(payload), qos, retain,
                         None if msg_id is None else memoryview(msg_id),
                         None if key is None else bytearray(key), client_id,
                         bytearray(properties)) == expected


def test_ingest_add_builds_record_partition_and_id_hash():
    ingest = Ingest(8, scope_global=False)
    ingest.now_ms = 1234
    ingest.add("a/b", b"pl", 1, True, b"m1", None, "dev", b"", "conn", 7)
    ingest.add("a/b", b"pl", 0, False, None, b"k", "dev", b"\x26\x00\x01a\x00\x01b", None, 0)
    items = ingest.batch.items
    assert items[0] == (partition_for(b"dev", 8), id_hash(b"dev", b"m1"),
                        encode_record(1234, "a/b", b"pl", 1, True, b"m1", None, "dev"))
    assert items[1] == (partition_for(b"k", 8), None,
                        encode_record(1234, "a/b", b"pl", 0, False, None, b"k", "dev",
                                      b"\x26\x00\x01a\x00\x01b"))
    assert ingest.batch.waiters == [("conn", 7, 1, 0)]
    assert decode_record(items[0][2]).client_id == "dev"
    glob = Ingest(1)
    glob.add("t", b"", 2, False, b"m1", None, "dev", None, "c", 1)
    assert glob.batch.items[0][:2] == (0, id_hash(b"", b"m1"))


# -- the batch -------------------------------------------------------------------


def test_batch_add_ack_only_extend_len():
    a = Batch()
    assert len(a) == 0 and a.nbytes == 0
    a.add(0, None, b"abc", None, 0, 0)
    a.add(1, b"h" * 16, b"de", "c1", 5, 1)
    a.add_ack_only("c1", 6, 2)
    assert a.items == [(0, None, b"abc"), (1, b"h" * 16, b"de")]
    assert a.waiters == [("c1", 5, 1, 1), ("c1", 6, 2, -1)]
    assert len(a) == 4 and a.nbytes == 5
    b = Batch()
    b.add(2, None, b"f", "c2", 9, 2)
    b.add_ack_only("c2", 10, 2)
    a.extend(b)
    assert a.items[-1] == (2, None, b"f")
    assert a.waiters[-2:] == [("c2", 9, 2, 2), ("c2", 10, 2, -1)]
    assert len(a) == 7 and a.nbytes == 6
    assert len(b) == 3


def test_ingest_take_starts_a_new_batch():
    ingest = Ingest(1)
    ingest.add("t", b"x", 0, False, None, None, "c", b"", None, 0)
    batch = ingest.take()
    assert len(batch) == 1 and len(ingest.batch) == 0 and ingest.batch is not batch


def test_count_duplicates():
    assert count_duplicates([]) == 0
    assert count_duplicates([(0, 1, False), (0, 1, True), (1, 4, True)]) == 2


# -- the fast path against handle_<verb> ---------------------------------------


def publishes(version):
    user = st.lists(st.sampled_from([("id", "m1"), ("id", "m2"), ("key", "k1"), ("key", ""),
                                     ("other", "v"), ("id", "é")]), max_size=3)
    # Mostly the common case; now and then something only handle_publish does.
    extra = st.sampled_from([None] * 8 + [{"payload_format_indicator": 1},
                             {"payload_format_indicator": 0}, {"message_expiry_interval": 9},
                             {"topic_alias": 1}, {"topic_alias": 99}, {"content_type": "x"}])
    props = st.tuples(user, extra) if version == MQTT5 else st.just(([], None))

    def build(qos, packet_id, retain, topic, payload, prop_parts):
        pairs, more = prop_parts
        properties = dict(more or {})
        if pairs:
            properties["user_property"] = pairs
        if properties.get("topic_alias") == 1 and topic == "t/alias":
            topic = ""
        return Publish(topic, payload, qos, retain, False, packet_id if qos else 0,
                       properties or None)

    return st.builds(build, st.sampled_from([0, 1, 1, 2]), st.integers(1, 6), st.booleans(),
                     st.sampled_from(["t/a", "t/b", "t/alias", "dev/é"]),
                     st.sampled_from([b"", b"hi", b"\xff\xfe", b'{"id": 7}']), props)


@st.composite
def sessions(draw):
    version = draw(st.sampled_from([MQTT311, MQTT5]))
    packets = draw(st.lists(st.one_of(
        publishes(version),
        st.builds(Pingreq),
        st.builds(lambda pid: _frame.Ack(_frame.PUBREL, pid), st.integers(1, 6)),
    ), min_size=1, max_size=60))
    stream = encode(Connect(draw(st.sampled_from(["dev-1", "é"])), protocol_level=version),
                    version)
    stream += b"".join(encode(p, version) for p in packets)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=3)))
    cfg = dict(
        receive_maximum=draw(st.sampled_from([2, 3, 64])),
        max_qos=draw(st.sampled_from([2, 2, 2, 1, 0])),
        json_field=draw(st.sampled_from([None, "id"])),
        id_property="id",
        key_property=draw(st.sampled_from(["key", "id"])),
    )
    return stream, cuts, cfg, draw(st.sampled_from([1, 4])), draw(st.booleans())


def run_session(stream, cuts, cfg, partitions, scope_global, fast):
    ingest = Ingest(partitions, scope_global)
    ingest.now_ms = 1_700_000_000_000
    conn = MQTTServerConnection(MQTTSettings(**cfg), ingest)
    conn.fast_path = fast
    buf = bytearray(stream)
    start = 0
    for end in cuts + [len(stream)]:
        start = conn.receive(buf, start, max(start, end))
        if conn.state == 2:
            break
    batch = ingest.take()
    received = bytes(conn.out)
    conn.out.clear()
    if fast:
        acked = ack_committed(batch.waiters)
    else:
        acked = set()
        for proto, packet_id, qos, _index in batch.waiters:
            proto.committed(packet_id, qos)
            acked.add(proto)
    waiters = [("conn" if w[0] is conn else w[0],) + w[1:] for w in batch.waiters]
    return dict(items=batch.items, waiters=waiters, nbytes=batch.nbytes, received=received,
                acks=bytes(conn.out), acked=len(acked), state=conn.state,
                inflight=conn.inflight, acks_written=conn.acks_written,
                qos2=sorted(conn.qos2_received), held=list(conn.held_refusals),
                errors=conn.errors, close=repr(conn.close_reason),
                close_after_flush=conn.close_after_flush)


@settings(max_examples=300, deadline=None)
@given(sessions())
def test_fast_path_is_byte_identical_to_handlers(session):
    stream, cuts, cfg, partitions, scope_global = session
    assert (run_session(stream, cuts, cfg, partitions, scope_global, True)
            == run_session(stream, cuts, cfg, partitions, scope_global, False))


def test_fast_path_takes_the_ordinary_publishes():
    ingest = Ingest(1)
    conn = MQTTServerConnection(MQTTSettings(receive_maximum=3), ingest)
    stream = encode(Connect("c", protocol_level=5), 5)
    stream += encode(Publish("t", b"1", 1, packet_id=1,
                             properties={"user_property": [("id", "a"), ("key", "k")]}), 5)
    stream += encode(Publish("t", b"2", 2, packet_id=2), 5)
    stream += encode(Publish("t", b"3", 2, packet_id=2), 5)
    handled = []
    original = MQTTServerConnection._handlers[_frame.PUBLISH]
    MQTTServerConnection._handlers[_frame.PUBLISH] = lambda self, p: handled.append(p)
    try:
        conn.receive(stream, 0, len(stream))
    finally:
        MQTTServerConnection._handlers[_frame.PUBLISH] = original
    # None of them reached handle_publish; the re-sent QoS 2 id is an ack-only waiter.
    assert handled == []
    assert [w[1:] for w in ingest.batch.waiters] == [(1, 1, 0), (2, 2, 1), (2, 2, -1)]
    assert decode_record(ingest.batch.items[0][2]).msg_id == b"a"
    assert conn.inflight == 3
    # A fourth in flight passes Receive Maximum 3: handle_publish disconnects with 0x93.
    more = encode(Publish("t", b"4", 1, packet_id=3), 5)
    conn.receive(more, 0, len(more))
    assert conn.state == 2 and conn.close_reason.reason_code == 0x93
    assert len(ingest.batch.items) == 2


def test_ack_committed_keeps_order_and_skips_closed():
    ingest = Ingest(1)
    a = MQTTServerConnection(MQTTSettings(), ingest)
    b = MQTTServerConnection(MQTTSettings(), ingest)
    for conn, name in ((a, "a"), (b, "b")):
        stream = encode(Connect(name, protocol_level=5), 5)
        stream += encode(Publish("t", b"", 1, packet_id=300), 5)
        stream += encode(Publish("t", b"", 2, packet_id=2), 5)
        conn.receive(stream, 0, len(stream))
        conn.out.clear()
    b.state = 2
    acked = ack_committed(ingest.take().waiters)
    assert acked == {a, b}
    assert bytes(a.out) == bytes.fromhex("4002012c" "50020002")
    assert a.inflight == 0 and a.acks_written == 2
    assert bytes(b.out) == b"" and b.inflight == 0 and b.acks_written == 0


# -- Log.append_batch's per-item work -----------------------------------------

# Items over 5 partitions: (partition, has an id, record payload).
_items = st.lists(st.tuples(st.integers(0, 4), st.booleans(), st.binary(max_size=20)),
                  max_size=40)


def _batch(spec):
    return [(p, id_hash(b"", b"%d" % i) if has_id else None, payload)
            for i, (p, has_id, payload) in enumerate(spec)]


def test_batch_partitions_first_appearance_and_ids():
    items = [(3, None, b"a"), (1, b"h" * 16, b"b"), (3, b"i" * 16, b"c"), (0, None, b"d")]
    assert batch_partitions(items, 4) == ([3, 1, 0], 2)
    assert batch_partitions([], 4) == ([], 0)
    # Any 3-sequence is an item, as for tuple unpacking.
    assert batch_partitions([[2, None, b"x"]], 4) == ([2], 0)


def test_batch_partitions_rejects_out_of_range():
    for bad in (4, -1, 2**70, -(2**70)):
        with pytest.raises(ValueError, match="out of range 0..3"):
            batch_partitions([(0, None, b"a"), (bad, None, b"b")], 4)
    with pytest.raises(ValueError):
        batch_partitions([(0, None)], 4)


@settings(max_examples=200, deadline=None)
@given(_items, st.data())
def test_batch_rows_equals_reference(spec, data):
    items = _batch(spec)
    touched, with_ids = batch_partitions(items, 5)
    assert with_ids == sum(has_id for _, has_id, _ in spec)
    first = [data.draw(st.integers(0, 2**64 - len(items) - 1)) for _ in touched]
    dup_indexes = data.draw(st.sets(st.integers(0, max(len(items) - 1, 0))))
    duplicates = {i: (9, 99 + i, True) for i in dup_indexes if i < len(items)}
    results, rows, sizes = batch_rows(items, 5, touched, first, duplicates)
    # Reference: the per-item loop Log.append_batch used to run in Python.
    next_offset = dict(zip(touched, first))
    want_rows = {p: [] for p in touched}
    want_results = []
    for index, (p, _, record) in enumerate(items):
        if index in duplicates:
            want_results.append(duplicates[index])
            continue
        want_rows[p].append((struct.pack(">Q", next_offset[p]), record))
        want_results.append((p, next_offset[p], False))
        next_offset[p] += 1
    assert results == want_results
    assert rows == [want_rows[p] for p in touched]
    assert sizes == [sum(len(r) for _, r in want_rows[p]) for p in touched]


def test_id_entries_offsets_as_if_no_duplicates():
    items = [(1, b"a" * 16, b"r"), (0, None, b"r"), (1, None, b"r"), (1, b"b" * 16, b"r"),
             (0, b"c" * 16, b"r")]
    touched, _ = batch_partitions(items, 2)
    entries = id_entries(items, 2, touched, [10, 2**40], 7)
    assert [(i, p, off, h) for i, p, off, h, _ in entries] == [
        (0, 1, 10, b"a" * 16), (3, 1, 12, b"b" * 16), (4, 0, 2**40 + 1, b"c" * 16)]
    assert [struct.unpack(">HQQ", e) for *_, e in entries] == [
        (1, 10, 7), (1, 12, 7), (0, 2**40 + 1, 7)]


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=40), qos=st.integers(0, 2), retain=st.booleans(),
       dup=st.booleans(), packet_id=st.integers(1, 65535), payload=st.binary(max_size=300),
       user=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
       version=st.sampled_from([4, 5]))
def test_encode_publish_matches_the_general_encoder(topic, qos, retain, dup, packet_id, payload,
                                                    user, version):
    # The broker's one-allocation PUBLISH encoder agrees with _frame.encode byte for byte.
    # MQTT 5.0 §3.3.1.1 [MQTT-3.3.1-2]: DUP is 0 on every QoS 0 PUBLISH.
    dup = dup and qos > 0
    props = {"user_property": user} if user and version == 5 else None
    raw = _frame.encode_properties(props) if props else b""
    expected = _frame.encode(_frame.Publish(topic, payload, qos=qos, retain=retain, dup=dup,
                                            packet_id=packet_id if qos else 0,
                                            properties=props), version)
    assert encode_publish(topic.encode(), qos, retain, dup, packet_id, raw, payload,
                          version) == expected
