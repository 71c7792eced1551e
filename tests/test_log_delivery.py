"""The delivery state in the log: sink ids, cursors, retry queue, dead letters, and
retention that waits for every sink's cursor (groundwork for the delivery engine)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore._ingest import select_records
from pushcore.errors import RetentionFull, StoreError
from pushcore.log import (
    OP_DELETE,
    OP_PUT,
    Log,
    StoreOps,
    cursor_key,
    cursor_value,
    decode_failure,
    dlq_key,
    encode_failure,
    retry_key,
)
from pushcore.record import decode_record, encode_record

MiB = 1 << 20
_U64 = struct.Struct(">Q")


def rec(time_ms, payload=b"p"):
    return encode_record(time_ms, "t", payload, qos=1, client_id="c")


def open_log(path, **kw):
    kw.setdefault("partitions", 2)
    kw.setdefault("map_size", 16 * MiB)
    kw.setdefault("durability", "os")
    return Log(path, **kw)


def writes(*rows):
    ops = StoreOps()
    ops.writes.extend(rows)
    return ops


def test_sink_ids_are_stable_and_never_reused(tmp_env):
    with open_log(tmp_env) as log:
        assert log.register_sinks(["hooks", "audit"]) == {"hooks": 1, "audit": 2}
        assert log.register_sinks(["audit", "python"]) == {"hooks": 1, "audit": 2, "python": 3}
    with open_log(tmp_env) as log:
        assert log.sinks() == {"hooks": 1, "audit": 2, "python": 3}


def test_cursors_are_written_with_a_batch(tmp_env):
    with open_log(tmp_env) as log:
        ops = writes((OP_PUT, b"cursor", cursor_key(1, 0), cursor_value(2)),
                     (OP_PUT, b"cursor", cursor_key(1, 1), cursor_value(7)))
        log.append_batch([(0, None, rec(1))], now_ms=1, ops=ops)
        assert log.cursors() == {(1, 0): 2, (1, 1): 7}
        log.append_batch([], now_ms=2, ops=writes((OP_DELETE, b"cursor", cursor_key(1, 1), None)))
        assert log.cursors() == {(1, 0): 2}


def test_failure_value_round_trip():
    value = encode_failure(3, 503, "Service Unavailable: é", rec(5))
    attempts, status, error, record = decode_failure(value)
    assert (attempts, status, error) == (3, 503, "Service Unavailable: é")
    assert decode_record(record).time_ms == 5
    # A connection error has no status.
    assert decode_failure(encode_failure(1, 0, "connection refused", b""))[:3] == \
        (1, 0, "connection refused")


def test_retry_queue_is_read_by_due_time(tmp_env):
    with open_log(tmp_env) as log:
        ops = writes(
            (OP_PUT, b"retry", retry_key(300, 1, 0, 5), encode_failure(2, 500, "e", rec(1))),
            (OP_PUT, b"retry", retry_key(100, 2, 1, 9), encode_failure(1, 429, "slow", rec(2))),
            (OP_PUT, b"retry", retry_key(200, 1, 1, 3), encode_failure(4, 0, "refused", rec(3))))
        log.append_batch([], now_ms=0, ops=ops)
        due = log.retry_due(250)
        assert [(d[1], d[2], d[3], d[4], d[5], d[6], d[7]) for d in due] == [
            (100, 2, 1, 9, 1, 429, "slow"), (200, 1, 1, 3, 4, 0, "refused")]
        assert log.retry_due(1000, limit=1)[0][1] == 100
        assert log.retry_due(99) == []
        # The entry's key is what the engine deletes once the retry is done.
        log.append_batch([], now_ms=0, ops=writes((OP_DELETE, b"retry", due[0][0], None)))
        assert [d[1] for d in log.retry_due(1000)] == [200, 300]
        assert log.delivery_counts() == {1: (2, 0)}


def test_dead_letters_filter_by_sink_and_time(tmp_env):
    with open_log(tmp_env) as log:
        ops = writes(*(
            (OP_PUT, b"dlq", dlq_key(sink, t, 0, t), encode_failure(5, 400, "bad", rec(t)))
            for sink, t in ((1, 10), (1, 20), (2, 15), (1, 30))))
        log.append_batch([], now_ms=0, ops=ops)
        assert [(d[1], d[2]) for d in log.dead_letters()] == [(1, 10), (1, 20), (1, 30), (2, 15)]
        assert [d[2] for d in log.dead_letters(sink_id=1)] == [10, 20, 30]
        assert [d[2] for d in log.dead_letters(sink_id=1, since_ms=15, until_ms=25)] == [20]
        assert [d[2] for d in log.dead_letters(sink_id=2)] == [15]
        assert log.dead_letters(sink_id=3) == []
        assert len(log.dead_letters(limit=2)) == 2
        entry = log.dead_letters(sink_id=2)[0]
        assert entry[5:8] == (5, 400, "bad")
        assert decode_record(entry[8]).time_ms == 15
        assert log.delivery_counts() == {1: (0, 3), 2: (0, 1)}


def test_retention_waits_for_every_sinks_cursor(tmp_env):
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        log.register_sinks(["a", "b"])
        log.append_batch([(0, None, rec(t)) for t in range(0, 50, 10)], now_ms=50)
        # Sink a passed offsets 0..3, sink b only 0..1; nothing is old enough to keep.
        log.append_batch([], now_ms=50, ops=writes(
            (OP_PUT, b"cursor", cursor_key(1, 0), cursor_value(4)),
            (OP_PUT, b"cursor", cursor_key(2, 0), cursor_value(2))))
        result = log.expire(now_ms=1000)
        assert (result["records_trimmed"], result["records_trimmed_undelivered"]) == (2, 0)
        assert log.first_offset(0) == 2
        # A partition a sink has no cursor for is not trimmed at all.
        log.append_batch([(1, None, rec(0))], now_ms=50)
        assert log.expire(now_ms=1000)["records_trimmed"] == 0
        assert log.first_offset(1) == 0


def test_a_sink_taken_out_of_the_configuration_no_longer_holds_records(tmp_env):
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        log.register_sinks(["a", "gone"])
        log.append_batch([(0, None, rec(t)) for t in range(0, 50, 10)], now_ms=50)
        log.append_batch([], now_ms=50, ops=writes(
            (OP_PUT, b"cursor", cursor_key(1, 0), cursor_value(4)),
            (OP_PUT, b"cursor", cursor_key(2, 0), cursor_value(1))))
    # The next start configures only "a": "gone" keeps its id and cursor, and no
    # longer holds anything back.
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        assert log.register_sinks(["a"]) == {"a": 1, "gone": 2}
        assert log.cursors()[(2, 0)] == 1
        assert log.expire(now_ms=1000)["records_trimmed"] == 4
        assert log.first_offset(0) == 4
    # With no sink configured at all, age alone decides.
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        log.register_sinks([])
        assert log.expire(now_ms=1000)["records_trimmed"] == 1


def test_a_sink_taken_out_does_not_refuse_publishes_at_the_hard_limit(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_hard_max_bytes=3 * size) as log:
        log.register_sinks(["gone"])
        log.append_batch([(0, None, rec(t)) for t in range(3)], now_ms=10)
        with pytest.raises(RetentionFull, match="sinks behind: gone"):
            log.append_batch([(0, None, rec(3))], now_ms=10)
    with open_log(tmp_env, retention_hard_max_bytes=3 * size) as log:
        log.register_sinks([])
        # Room is made from the records nobody holds any more.
        log.append_batch([(0, None, rec(3))], now_ms=10)
        assert log.first_offset(0) == 1


def test_hard_byte_limit_drop_oldest_trims_past_the_cursors_and_counts_it(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_max_bytes=size, retention_hard_max_bytes=3 * size,
                  retention_overflow="drop_oldest") as log:
        log.register_sinks(["slow"])
        # Nothing is refused: past the limit is expire's business.
        log.append_batch([(0, None, rec(t)) for t in range(4)], now_ms=10)
        log.append_batch([(0, None, rec(t)) for t in range(4, 6)], now_ms=10)
        result = log.expire(now_ms=10)
        # max_bytes waits for the sink (it read nothing); the hard limit does not.
        assert (result["records_trimmed"], result["records_trimmed_undelivered"]) == (3, 3)
        assert [decode_record(v).time_ms for _, v in log.read(0)] == [3, 4, 5]
        assert log.kept_bytes == log.stats()["bytes"] == 3 * size


# -- the hard byte limit with overflow: refuse -------------------------------------------


def times(log, partition):
    return [decode_record(v).time_ms for _, v in log.read(partition)]


def cursor_at(sink_id, partition, offset):
    return (OP_PUT, b"cursor", cursor_key(sink_id, partition), cursor_value(offset))


def test_refuse_raises_naming_the_limit_and_the_sinks_behind(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_hard_max_bytes=4 * size) as log:
        assert log.retention_overflow == "refuse"
        log.register_sinks(["fast", "slow"])
        log.append_batch([(0, None, rec(t)) for t in range(3)] + [(1, None, rec(3))], now_ms=10)
        # fast has passed everything, slow nothing.
        log.append_batch([], now_ms=10, ops=writes(cursor_at(1, 0, 3), cursor_at(1, 1, 1)))
        with pytest.raises(RetentionFull) as refused:
            log.append_batch([(1, None, rec(4))], now_ms=11)
        assert str(refused.value) == (
            f"storage.retention.hard_max_bytes ({4 * size} bytes) reached with {4 * size}"
            f" bytes of records kept and {size} more to store; sinks behind: slow"
            f" (storage.retention.overflow: refuse)")
        # Nothing of the batch is stored; what was there stays.
        assert log.next_offsets == [3, 1]
        assert (times(log, 0), times(log, 1)) == ([0, 1, 2], [3])
        assert log.kept_bytes == log.stats()["bytes"] == 4 * size
        # Refused the same way after a reopen (the kept bytes come from the store).
        log.close()
        log.__init__(tmp_env, partitions=2, map_size=16 * MiB, durability="os",
                     retention_hard_max_bytes=4 * size)
        assert log.kept_bytes == 4 * size
        with pytest.raises(RetentionFull):
            log.append_batch([(0, None, rec(5))], now_ms=12)


def test_refuse_makes_room_from_what_every_sink_has_passed(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_hard_max_bytes=4 * size) as log:
        log.register_sinks(["a", "b"])
        # Over the limit from the start: an empty store takes any batch (no sink's
        # backlog is in its way).
        log.append_batch([(0, None, rec(t)) for t in (0, 2, 4)] +
                         [(1, None, rec(t)) for t in (1, 3)], now_ms=10)
        assert log.kept_bytes == 5 * size
        # Both sinks passed offsets 0..1 of partition 0 and 0 of partition 1; b is
        # behind on 2 (time 4) and 1 (time 3).
        log.append_batch([], now_ms=10, ops=writes(
            cursor_at(1, 0, 3), cursor_at(1, 1, 2), cursor_at(2, 0, 2), cursor_at(2, 1, 1)))
        # Two more records need room for three: the oldest delivered ones go first
        # (times 0, 1, 2), in the same transaction as the append.
        assert log.append_batch([(0, None, rec(5)), (1, None, rec(6))], now_ms=11) == [
            (0, 3, False), (1, 2, False)]
        assert (times(log, 0), times(log, 1)) == ([4, 5], [3, 6])
        assert log.kept_bytes == log.stats()["bytes"] == 4 * size
        # Nothing left that both have passed: refused until b moves on.
        with pytest.raises(RetentionFull, match="sinks behind: b "):
            log.append_batch([(0, None, rec(7))], now_ms=12)
        # The refused batch's own cursor writes count: b passing partition 1's time 3
        # makes room for the batch that carries that news.
        assert log.append_batch([(0, None, rec(7))], now_ms=12,
                                ops=writes(cursor_at(2, 1, 2))) == [(0, 4, False)]
        assert (times(log, 0), times(log, 1)) == ([4, 5, 7], [6])
        # Retention by expire() never takes what a sink has not passed under refuse.
        result = log.expire(now_ms=10_000)
        assert (result["records_trimmed"], result["records_trimmed_undelivered"]) == (0, 0)


def test_refuse_commits_cursor_and_session_writes_while_refusing(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_hard_max_bytes=2 * size) as log:
        log.register_sinks(["hook"])
        log.append_batch([(0, None, rec(0)), (0, None, rec(1))], now_ms=10)
        # A refused batch: its records and what goes with them (a queued delivery)
        # are not written, its other writes are.
        ops = writes(cursor_at(1, 1, 0), (OP_PUT, b"session", b"client", b"{}"))
        ops.queued.append((0, b"\x00\x01q" + bytes(8), b"copy"))
        with pytest.raises(RetentionFull):
            log.append_batch([(0, None, rec(2))], now_ms=11, ops=ops)
        assert log.cursors() == {(1, 1): 0}
        assert log.queue("q") == []
        assert log.next_offsets[0] == 2
        # A cursor-only write commits while the store is refusing records ...
        log.append_batch([], now_ms=11, ops=writes(cursor_at(1, 0, 1)))
        assert log.cursors() == {(1, 0): 1, (1, 1): 0}
        # ... and the room it makes is used by the next batch.
        assert log.append_batch([(0, None, rec(2))], now_ms=12) == [(0, 2, False)]
        assert times(log, 0) == [1, 2]


def test_refuse_stores_duplicates_and_a_batch_larger_than_the_limit(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_hard_max_bytes=2 * size) as log:
        log.register_sinks(["hook"])
        # Nothing else kept: no sink's backlog is in the way of an oversized batch.
        first = log.append_batch([(0, b"i" * 16, rec(0)), (0, None, rec(1)), (0, None, rec(2))],
                                 now_ms=10)
        assert first == [(0, 0, False), (0, 1, False), (0, 2, False)]
        with pytest.raises(RetentionFull):
            log.append_batch([(0, None, rec(3))], now_ms=11)
        # A duplicate stores nothing, so it needs no room: acked as before.
        assert log.append_batch([(0, b"i" * 16, rec(4))], now_ms=11) == [(0, 0, True)]


def test_refuse_expire_trims_delivered_records_over_a_lowered_limit(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env) as log:
        log.register_sinks(["hook"])
        log.append_batch([(0, None, rec(t)) for t in range(6)], now_ms=10,
                         ops=writes(cursor_at(1, 0, 4)))
    with open_log(tmp_env, retention_hard_max_bytes=size) as log:
        result = log.expire(now_ms=10)
        # Down to the limit by the delivered records only; the two undelivered stay.
        assert (result["records_trimmed"], result["records_trimmed_undelivered"]) == (4, 0)
        assert times(log, 0) == [4, 5]
        assert log.kept_bytes == 2 * size


def test_overflow_policy_is_checked(tmp_env):
    with pytest.raises(ValueError, match="retention_overflow"):
        open_log(tmp_env, retention_overflow="drop_newest")


def test_without_sinks_retention_is_as_before(tmp_env):
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        log.append_batch([(0, None, rec(0)), (0, None, rec(500))], now_ms=500)
        assert log.expire(now_ms=550)["records_trimmed"] == 1


def test_unknown_db_name_in_a_write_is_refused(tmp_env):
    with open_log(tmp_env) as log:
        with pytest.raises(KeyError):
            log.append_batch([], now_ms=0, ops=writes((OP_PUT, b"nope", b"k", b"v")))
        assert log.cursors() == {}


def test_register_sinks_on_a_readonly_store_fails(tmp_env):
    open_log(tmp_env).close()
    with Log(tmp_env, partitions=None, readonly=True) as log:
        with pytest.raises(StoreError):
            log.register_sinks(["x"])


# -- what a sink reads: Log.read_raw and select_records ---------------------------------


def reference_batches(offsets_topics, start, limit, routed):
    """A sink's batches in Python, as select_records documents them: (first offset,
    count, cursor after) per batch, until the rows run out."""
    batches = []
    cursor = start
    rows = [(o, t) for o, t in offsets_topics if o >= start]
    i = 0
    while True:
        taken = []
        while i < len(rows):
            offset, topic = rows[i]
            if not routed(topic):
                if taken:
                    break
                cursor = offset + 1
                i += 1
                continue
            if taken and offset != taken[-1] + 1:
                break
            taken.append(offset)
            i += 1
            if len(taken) == limit:
                break
        if not taken:
            return batches, cursor
        batches.append((taken[0], len(taken), cursor))
        cursor = taken[-1] + 1


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_select_records_matches_the_reference(data):
    # Offsets with gaps (trimmed or other partitions' ids do not matter here: a gap is
    # what a retention trim leaves), topics some routed, rows read in small chunks.
    offsets = sorted(data.draw(st.sets(st.integers(0, 60), max_size=30)))
    topics = data.draw(st.lists(st.sampled_from(["a/1", "a/2", "b/1"]), min_size=len(offsets),
                                max_size=len(offsets)))
    rows = [(_U64.pack(o), encode_record(o, t, b"x")) for o, t in zip(offsets, topics)]
    start = data.draw(st.integers(0, 62))
    limit = data.draw(st.integers(1, 5))
    chunk = data.draw(st.integers(1, 7))
    routed_topics = {"a/1", "a/2"}
    misses = []

    def route_miss(topic):
        misses.append(topic)
        cache[topic] = topic.decode() in routed_topics
        return cache[topic]

    cache = {}
    expected, expected_cursor = reference_batches(list(zip(offsets, topics)), start, limit,
                                                  lambda t: t in routed_topics)
    # The engine's loop (server/delivery.py Sink._send_next), over chunks of rows.
    got = []
    cursor = start
    pending = [r for r in rows if int.from_bytes(r[0], "big") >= start]
    while True:
        taken, first, pos = [], 0, 0
        chunk_rows = pending[:chunk]
        while True:
            if pos >= len(chunk_rows):
                read_from = first + len(taken) if taken else cursor
                pending = [r for r in rows if int.from_bytes(r[0], "big") >= read_from]
                chunk_rows, pos = pending[:chunk], 0
                if not chunk_rows:
                    break
            pos, cursor, first, done = select_records(chunk_rows, pos, cursor, limit, cache,
                                                      route_miss, taken, first)
            if done:
                break
        if not taken:
            break
        assert all(decode_record(r).topic in routed_topics for r in taken)
        got.append((first, len(taken), cursor))
        cursor = first + len(taken)
        pending = [r for r in rows if int.from_bytes(r[0], "big") >= cursor]
    assert got == expected
    assert cursor == expected_cursor
    # Each topic is asked about once; the cache answers after that.
    assert len(misses) == len(set(misses))


def test_read_raw_returns_stored_keys_and_records(tmp_path):
    log = open_log(tmp_path / "d", partitions=1)
    log.append_batch([(0, None, rec(i)) for i in range(5)], now_ms=1)
    rows = log.read_raw(0, 2, 2)
    assert rows == [(_U64.pack(2), rec(2)), (_U64.pack(3), rec(3))]
    assert log.read_raw(0, 5, 10) == []
    assert [(int.from_bytes(k, "big"), v) for k, v in log.read_raw(0, 0, 10)] == log.read(0, 0)


def test_select_records_refuses_a_broken_row():
    with pytest.raises(ValueError, match="truncated record"):
        select_records([(_U64.pack(0), encode_record(1, "topic", b"")[:16])], 0, 0, 1, {},
                       lambda t: True, [], 0)
    with pytest.raises(ValueError, match="a log key is 8 bytes"):
        select_records([(b"\0", encode_record(1, "t", b""))], 0, 0, 1, {}, lambda t: True, [], 0)
