import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import lmdb
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pushcore.errors import PartitionMismatch, StoreError, StoreFull
from pushcore.log import Log
from pushcore.record import decode_record, encode_record, id_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def rec(time_ms, payload=b"p", topic="t"):
    return encode_record(time_ms, topic, payload, qos=1, client_id="c")


def ih(name):
    return id_hash(b"scope", name.encode())


def open_log(path, **kw):
    kw.setdefault("partitions", 4)
    kw.setdefault("map_size", 16 * MiB)
    kw.setdefault("durability", "os")
    return Log(path, **kw)


def test_append_and_read(tmp_env):
    with open_log(tmp_env) as log:
        result = log.append_batch([(0, None, rec(1, b"a")), (0, None, rec(1, b"b")),
                                   (2, None, rec(1, b"c"))], now_ms=1)
        assert result == [(0, 0, False), (0, 1, False), (2, 0, False)]
        assert [decode_record(v).payload for _, v in log.read(0)] == [b"a", b"b"]
        assert log.read(2) == [(0, rec(1, b"c"))]
        assert log.read(1) == []
        assert log.read(0, start_offset=1) == [(1, rec(1, b"b"))]
        assert log.read(0, limit=1) == [(0, rec(1, b"a"))]
        assert log.read(0, limit=0) == []
        assert log.read(0, start_offset=5) == []
        assert log.next_offsets == [2, 0, 1, 0]
        assert log.append_batch([], now_ms=2) == []
        with pytest.raises(ValueError):
            log.read(4)


def test_offsets_contiguous_per_partition(tmp_env):
    with open_log(tmp_env) as log:
        for batch in range(5):
            items = [(i % 3, None, rec(batch, b"%d-%d" % (batch, i))) for i in range(batch * 7)]
            log.append_batch(items, now_ms=batch)
        for partition in range(3):
            offsets = [offset for offset, _ in log.read(partition)]
            assert offsets == list(range(len(offsets)))
            assert log.next_offsets[partition] == len(offsets)
        assert log.next_offsets[3] == 0


def test_out_of_range_partition_writes_nothing(tmp_env):
    with open_log(tmp_env) as log:
        with pytest.raises(ValueError):
            log.append_batch([(0, None, rec(1)), (4, None, rec(1))], now_ms=1)
        with pytest.raises(ValueError):
            log.append_batch([(-1, None, rec(1))], now_ms=1)
        assert log.read(0) == []
        assert log.next_offsets == [0, 0, 0, 0]


def test_reopen_recovers_next_offsets(tmp_env):
    with open_log(tmp_env) as log:
        log.append_batch([(p, None, rec(1)) for p in (0, 0, 1, 3, 3, 3)], now_ms=1)
    with open_log(tmp_env) as log:
        assert log.next_offsets == [2, 1, 0, 3]
        assert log.append_batch([(3, None, rec(2))], now_ms=2) == [(3, 3, False)]


def test_trimmed_empty_partition_keeps_next_offset_across_reopen(tmp_env):
    with open_log(tmp_env, retention_max_age_ms=10) as log:
        log.append_batch([(1, None, rec(1)) for _ in range(3)], now_ms=1)
        assert log.expire(now_ms=100)["records_trimmed"] == 3
        assert log.read(1) == []
        assert log.first_offset(1) == 3
        assert log.next_offsets[1] == 3
    with open_log(tmp_env) as log:
        assert log.next_offsets == [0, 3, 0, 0]
        assert log.first_offset(1) == 3
        assert log.append_batch([(1, None, rec(200))], now_ms=200) == [(1, 3, False)]


def test_partition_count_mismatch(tmp_env):
    open_log(tmp_env, partitions=4).close()
    with pytest.raises(PartitionMismatch) as info:
        open_log(tmp_env, partitions=8)
    message = str(info.value)
    assert "4" in message and "8" in message and "fixed" in message
    with pytest.raises(PartitionMismatch):
        open_log(tmp_env, partitions=8, readonly=True)


def test_unknown_store_format_version(tmp_env):
    open_log(tmp_env).close()
    env = lmdb.open(str(tmp_env), max_dbs=32)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", (99).to_bytes(4, "big"), db=meta)
    env.close()
    with pytest.raises(StoreError, match="format version 99"):
        open_log(tmp_env)


def test_bad_arguments(tmp_env):
    with pytest.raises(ValueError):
        open_log(tmp_env, durability="sometimes")
    with pytest.raises(ValueError):
        open_log(tmp_env, partitions=0)


def test_dedup_within_one_batch(tmp_env):
    with open_log(tmp_env) as log:
        result = log.append_batch([(0, ih("a"), rec(1, b"first")), (1, None, rec(1)),
                                   (0, ih("a"), rec(1, b"second")), (2, ih("a"), rec(1))],
                                  now_ms=1000)
        assert result == [(0, 0, False), (1, 0, False), (0, 0, True), (0, 0, True)]
        assert [decode_record(v).payload for _, v in log.read(0)] == [b"first"]
        assert log.read(2) == []
        assert log.lookup_id(ih("a")) == (0, 0, 1000)
        assert log.lookup_id(ih("unknown")) is None


def test_duplicate_moves_later_items_of_its_partition_down(tmp_env):
    with open_log(tmp_env) as log:
        log.append_batch([(1, ih("old"), rec(1))], now_ms=1)
        items = [(1, None, rec(2)), (1, ih("old"), rec(2)), (0, ih("x"), rec(2)),
                 (1, ih("x"), rec(2)), (1, ih("new"), rec(2)), (1, None, rec(2)),
                 (0, ih("y"), rec(2))]
        # A tuple of lists is a batch too.
        result = log.append_batch(tuple(list(item) for item in items), now_ms=2)
        assert result == [(1, 1, False), (1, 0, True), (0, 0, False), (0, 0, True),
                          (1, 2, False), (1, 3, False), (0, 1, False)]
        assert log.lookup_id(ih("new")) == (1, 2, 2)
        assert log.lookup_id(ih("y")) == (0, 1, 2)
        assert log.lookup_id(ih("x")) == (0, 0, 2)
        assert [offset for offset, _ in log.read(1)] == [0, 1, 2, 3]
        assert log.next_offsets == [2, 4, 0, 0]
        assert log.stats()["bytes"] == 6 * len(rec(1))


def test_dedup_across_batches_and_reopen(tmp_env):
    with open_log(tmp_env) as log:
        assert log.append_batch([(1, ih("a"), rec(1))], now_ms=1000) == [(1, 0, False)]
        assert log.append_batch([(1, ih("b"), rec(2)), (1, ih("a"), rec(2))], now_ms=2000) == [
            (1, 1, False), (1, 0, True)]
    with open_log(tmp_env) as log:
        assert log.append_batch([(3, ih("a"), rec(3)), (3, ih("b"), rec(3))], now_ms=3000) == [
            (1, 0, True), (1, 1, True)]
        assert log.next_offsets == [0, 2, 0, 0]


def test_dedup_window_expiry_stores_again(tmp_env):
    with open_log(tmp_env, dedup_window_ms=1000) as log:
        log.append_batch([(0, ih("a"), rec(0)), (0, ih("b"), rec(0))], now_ms=10_000)
        # The window is inclusive: exactly window ms later is still a duplicate.
        assert log.append_batch([(0, ih("a"), rec(0))], now_ms=11_000) == [(0, 0, True)]
        # Past the window, without any expire() call, the id is stored again.
        assert log.append_batch([(2, ih("a"), rec(0))], now_ms=11_001) == [(2, 0, False)]
        assert log.lookup_id(ih("a")) == (2, 0, 11_001)
        # expire() drops b (stored at 10_000) but not the re-stored a.
        assert log.expire(now_ms=11_500) == {"ids_expired": 1, "records_trimmed": 0,
                                             "bytes_trimmed": 0,
                                             "records_trimmed_undelivered": 0, "more": False}
        assert log.lookup_id(ih("b")) is None
        assert log.lookup_id(ih("a")) == (2, 0, 11_001)
        assert log.stats()["ids"] == 1
        assert log.append_batch([(1, ih("b"), rec(0)), (1, ih("a"), rec(0))],
                                now_ms=11_600) == [(1, 0, False), (2, 0, True)]


@pytest.mark.parametrize("durability", ["os", "fsync"])
def test_durability_modes(tmp_env, durability):
    with open_log(tmp_env, durability=durability) as log:
        assert log.stats()["durability"] == durability
        for batch in range(3):
            log.append_batch([(batch, ih(str(batch)), rec(batch))], now_ms=batch)
    with open_log(tmp_env, durability=durability) as log:
        assert log.next_offsets == [1, 1, 1, 0]
        assert log.lookup_id(ih("2")) == (2, 0, 2)


def _run_readonly_stats(path, partitions=4):
    code = ("import json, sys\n"
            "from pushcore.log import Log\n"
            f"log = Log(sys.argv[1], partitions={partitions}, readonly=True)\n"
            "s = log.stats()\n"
            "s['read0'] = [[o, v.hex()] for o, v in log.read(0)]\n"
            "s['next_offsets'] = log.next_offsets\n"
            "log.close()\n"
            "print(json.dumps(s))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc


def test_readonly_while_writer_is_open(tmp_env):
    # py-lmdb refuses to open one environment twice in a process: the
    # reader is a separate process, as `pushcore log stats` is.
    with open_log(tmp_env) as log:
        log.append_batch([(0, ih("a"), rec(1, b"x")), (0, None, rec(1, b"y"))], now_ms=1)
        proc = _run_readonly_stats(tmp_env)
        assert proc.returncode == 0, proc.stderr
        stats = json.loads(proc.stdout)
        assert stats["next_offsets"] == [2, 0, 0, 0]
        assert stats["per_partition"][0] == {"partition": 0, "first": 0, "next": 2, "count": 2,
                                             "bytes": len(rec(1, b"x")) * 2}
        assert stats["ids"] == 1
        assert [bytes.fromhex(v) for _, v in stats["read0"]] == [rec(1, b"x"), rec(1, b"y")]
        # The writer goes on while the reader is gone, and again with a reader.
        log.append_batch([(0, None, rec(2))], now_ms=2)
        assert json.loads(_run_readonly_stats(tmp_env).stdout)["next_offsets"] == [3, 0, 0, 0]


def test_readonly_refuses_writes(tmp_env):
    open_log(tmp_env).close()
    with open_log(tmp_env, readonly=True) as log:
        assert log.next_offsets == [0, 0, 0, 0]
        with pytest.raises(StoreError, match="read-only"):
            log.append_batch([(0, None, rec(1))], now_ms=1)
        with pytest.raises(StoreError, match="read-only"):
            log.expire(now_ms=1)


def test_readonly_without_store_creates_nothing(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(StoreError, match="no store at"):
        open_log(missing, readonly=True)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="no store at"):
        open_log(empty, readonly=True)
    assert list(empty.iterdir()) == []


def _fill(log, now_ms, payload=b"x" * 200, batch=50):
    """Append batches with ids until StoreFull; return the number of records stored."""
    stored = 0
    for b in range(10_000):
        items = [(i % log.partitions, ih(f"{now_ms}-{b}-{i}"), rec(now_ms, payload))
                 for i in range(batch)]
        try:
            log.append_batch(items, now_ms=now_ms)
        except StoreFull:
            return stored
        stored += batch
    raise AssertionError("the map never filled")


def test_store_full_then_expire_frees_space(tmp_env):
    log = open_log(tmp_env, map_size=256 * 1024, dedup_window_ms=1000)
    stored = _fill(log, now_ms=1000)
    assert stored > 0
    before = log.next_offsets[:]
    stats = log.stats()
    assert stats["records"] == stored
    # The refused batch wrote nothing: no offsets, no records, no ids.
    with pytest.raises(StoreFull):
        log.append_batch([(0, ih(f"big-{i}"), rec(1000, b"y" * 200)) for i in range(500)],
                         now_ms=1000)
    assert log.next_offsets == before
    assert log.stats()["records"] == stored
    assert log.lookup_id(ih("big-0")) is None
    log.close()

    log = open_log(tmp_env, map_size=256 * 1024, dedup_window_ms=1000,
                   retention_max_bytes=10_000)
    # In a full map expire() shrinks its transaction until it fits; the
    # caller repeats while it reports more work.
    totals = {"ids_expired": 0, "records_trimmed": 0}
    for _ in range(100):
        result = log.expire(now_ms=5000)
        totals["ids_expired"] += result["ids_expired"]
        totals["records_trimmed"] += result["records_trimmed"]
        if not result["more"]:
            break
    assert totals["ids_expired"] == stored
    assert totals["records_trimmed"] > 0
    assert log.stats()["bytes"] <= 10_000
    assert log.next_offsets == before
    items = [(p, ih(f"after-{p}"), rec(5000)) for p in range(4)]
    assert log.append_batch(items, now_ms=5000) == [(p, before[p], False) for p in range(4)]
    log.close()


def test_large_records_fit_again_after_one_big_trim(tmp_env):
    # Regression: after one transaction trimmed a whole full map, multi-page
    # (overflow) records kept failing with MapFull until a small commit let
    # LMDB take up the freed pages; append_batch now does that itself.
    log = open_log(tmp_env, map_size=1 << 20, retention_max_age_ms=4000)
    stored = 0
    with pytest.raises(StoreFull):
        while True:
            log.append_batch([(0, None, rec(1000, b"z" * 8000))], now_ms=1000)
            stored += 1
    assert stored > 50
    assert log.expire(now_ms=9000)["records_trimmed"] == stored
    for i in range(stored // 2):
        log.append_batch([(1, None, rec(10_000, b"z" * 8000))], now_ms=10_000)
    assert log.next_offsets[1] == stored // 2


def test_map_grows_when_reopened_with_a_bigger_budget(tmp_env):
    log = open_log(tmp_env, map_size=256 * 1024)
    _fill(log, now_ms=1)
    log.close()
    with open_log(tmp_env, map_size=2 * MiB) as log:
        assert log.stats()["map_size"] == 2 * MiB
        log.append_batch([(0, None, rec(2, b"x" * 200)) for _ in range(500)], now_ms=2)


def test_map_grown_by_another_process_is_adopted(tmp_env):
    log = open_log(tmp_env, map_size=256 * 1024)
    log.append_batch([(0, None, rec(1))], now_ms=1)
    code = ("import sys\n"
            "from pushcore.log import Log\n"
            "from pushcore.record import encode_record\n"
            "log = Log(sys.argv[1], partitions=4, map_size=4 << 20, durability='os')\n"
            "for b in range(20):\n"
            "    log.append_batch([(1, None, encode_record(2, 't', b'z' * 500))] * 100, 2)\n"
            "log.close()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_env)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert log.append_batch([(0, None, rec(3)), (1, None, rec(3))], now_ms=3) == [
        (0, 1, False), (1, 2000, False)]
    assert log.stats()["map_size"] >= 4 << 20
    log.close()


def test_retention_by_age(tmp_env):
    with open_log(tmp_env, retention_max_age_ms=100) as log:
        for t in (0, 50, 100, 150):
            log.append_batch([(0, None, rec(t)), (1, None, rec(t))], now_ms=t)
        assert log.expire(now_ms=120) == {"ids_expired": 0, "records_trimmed": 2,
                                          "bytes_trimmed": 2 * len(rec(0)),
                                          "records_trimmed_undelivered": 0,
                                          "more": False}
        assert [decode_record(v).time_ms for _, v in log.read(0)] == [50, 100, 150]
        assert log.first_offset(0) == 1
        assert log.expire(now_ms=200)["records_trimmed"] == 2
        assert log.first_offset(1) == 2
        assert log.next_offsets == [4, 4, 0, 0]
        assert log.stats()["per_partition"][0] == {
            "partition": 0, "first": 2, "next": 4, "count": 2, "bytes": 2 * len(rec(0))}


def test_retention_by_bytes_trims_oldest_first(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_max_bytes=5 * size) as log:
        log.append_batch([(0, None, rec(10)), (0, None, rec(11)), (0, None, rec(12))], now_ms=12)
        log.append_batch([(1, None, rec(1)), (1, None, rec(20))], now_ms=20)
        log.append_batch([(2, None, rec(5)), (2, None, rec(30))], now_ms=30)
        assert log.stats()["bytes"] == 7 * size
        result = log.expire(now_ms=30)
        assert result == {"ids_expired": 0, "records_trimmed": 2, "bytes_trimmed": 2 * size,
                          "records_trimmed_undelivered": 0, "more": False}
        kept = sorted(decode_record(v).time_ms for p in range(4) for _, v in log.read(p))
        assert kept == [10, 11, 12, 20, 30]
        assert log.stats()["bytes"] == 5 * size
        assert log.expire(now_ms=30)["records_trimmed"] == 0


def test_retention_by_bytes_takes_equal_times_round_robin(tmp_env):
    size = len(rec(0))
    with open_log(tmp_env, retention_max_bytes=8 * size) as log:
        log.append_batch([(p, None, rec(7)) for p in range(4) for _ in range(4)], now_ms=7)
        assert log.expire(now_ms=7)["records_trimmed"] == 8
        assert [log.first_offset(p) for p in range(4)] == [2, 2, 2, 2]


def test_expire_work_is_bounded(tmp_env):
    with open_log(tmp_env, dedup_window_ms=10, retention_max_age_ms=10) as log:
        log.append_batch([(0, ih(str(i)), rec(0)) for i in range(25)], now_ms=0)
        first = log.expire(now_ms=100, max_deletions=20)
        assert first == {"ids_expired": 0, "records_trimmed": 20, "bytes_trimmed": 20 * len(rec(0)),
                         "records_trimmed_undelivered": 0, "more": True}
        second = log.expire(now_ms=100, max_deletions=20)
        assert second["records_trimmed"] == 5 and second["ids_expired"] == 15
        assert second["more"] is True
        third = log.expire(now_ms=100, max_deletions=20)
        assert third["ids_expired"] == 10 and third["more"] is False
        assert log.stats()["ids"] == 0 and log.stats()["records"] == 0
        assert log.next_offsets[0] == 25


def test_reads_from_another_thread_during_writes(tmp_env):
    # The server's shape: one writer thread, readers in another thread.
    errors = []
    done = threading.Event()

    def reader(log):
        try:
            while not done.is_set():
                offsets = [offset for offset, _ in log.read(0)]
                assert offsets == list(range(len(offsets)))
                stats = log.stats()["per_partition"][0]
                assert stats["count"] == stats["next"] - stats["first"]
        except Exception as exc:
            errors.append(exc)

    with open_log(tmp_env) as log:
        thread = threading.Thread(target=reader, args=(log,))
        thread.start()
        try:
            for batch in range(100):
                log.append_batch([(0, ih(f"{batch}-{i}"), rec(batch)) for i in range(20)],
                                 now_ms=batch)
        finally:
            done.set()
            thread.join()
        assert errors == []
        assert log.next_offsets[0] == 2000


def test_expire_rejects_a_zero_budget(tmp_env):
    with open_log(tmp_env) as log:
        with pytest.raises(ValueError):
            log.expire(now_ms=1, max_deletions=0)


def test_stats(tmp_env):
    with open_log(tmp_env) as log:
        log.append_batch([(0, ih("a"), rec(1)), (3, ih("b"), rec(1)), (3, None, rec(1))],
                         now_ms=1)
        stats = log.stats()
    assert stats["partitions"] == 4
    assert stats["durability"] == "os"
    assert stats["map_size"] == 16 * MiB
    assert 0 < stats["used_bytes"] <= stats["map_size"]
    assert stats["ids"] == 2
    assert stats["records"] == 3
    assert stats["bytes"] == 3 * len(rec(1))
    assert [(p["first"], p["next"], p["count"]) for p in stats["per_partition"]] == [
        (0, 1, 1), (0, 0, 0), (0, 0, 0), (0, 2, 2)]


# The model-based test: the log against a few dicts.

PARTITIONS = 3
WINDOW_MS = 100
ID_NAMES = [f"id{i}" for i in range(12)]


class LogMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pushcore-log-model-")
        self.log = None

    @initialize(max_age=st.sampled_from([0, 150, 400]), max_records=st.sampled_from([0, 6, 20]))
    def open_store(self, max_age, max_records):
        self.size = len(rec(0))
        self.config = dict(partitions=PARTITIONS, map_size=16 * MiB, durability="os",
                           dedup_window_ms=WINDOW_MS, retention_max_age_ms=max_age,
                           retention_max_bytes=max_records * self.size)
        self.log = Log(self.dir, **self.config)
        self.now = 1000
        self.records = [dict() for _ in range(PARTITIONS)]
        self.next = [0] * PARTITIONS
        self.ids = {}

    @rule(items=st.lists(st.tuples(st.integers(0, PARTITIONS - 1),
                                   st.none() | st.sampled_from(ID_NAMES)), max_size=12),
          advance=st.integers(0, 80))
    def append_batch(self, items, advance):
        self.now += advance
        batch = [(p, None if name is None else ih(name), rec(self.now)) for p, name in items]
        expected = []
        for partition, name in items:
            stored = self.ids.get(name)
            if stored is not None and stored[2] >= self.now - WINDOW_MS:
                expected.append((stored[0], stored[1], True))
                continue
            offset = self.next[partition]
            self.next[partition] += 1
            self.records[partition][offset] = rec(self.now)
            if name is not None:
                self.ids[name] = (partition, offset, self.now)
            expected.append((partition, offset, False))
        assert self.log.append_batch(batch, now_ms=self.now) == expected

    @rule(advance=st.integers(0, 300))
    def expire(self, advance):
        self.now += advance
        result = self.log.expire(now_ms=self.now)
        assert not result["more"]
        horizon = self.now - WINDOW_MS
        expired = [name for name, (_, _, t) in self.ids.items() if t < horizon]
        for name in expired:
            del self.ids[name]
        assert result["ids_expired"] == len(expired)

        trimmed = []
        max_age = self.config["retention_max_age_ms"]
        for partition, kept in enumerate(self.records):
            first = self.log.first_offset(partition)
            gone = [offset for offset in kept if offset < first]
            trimmed.extend(decode_record(kept.pop(offset)).time_ms for offset in gone)
            if max_age:
                assert all(decode_record(v).time_ms >= self.now - max_age
                           for v in kept.values())
        assert result["records_trimmed"] == len(trimmed)
        assert result["bytes_trimmed"] == len(trimmed) * self.size
        max_bytes = self.config["retention_max_bytes"]
        remaining = [decode_record(v).time_ms for kept in self.records for v in kept.values()]
        if max_bytes:
            assert len(remaining) * self.size <= max_bytes
        if trimmed and remaining:
            # Oldest records go first, across partitions.
            assert max(trimmed) <= min(remaining)

    @rule()
    def reopen(self):
        self.log.close()
        self.log = Log(self.dir, **self.config)

    @invariant()
    def log_matches_model(self):
        if self.log is None:
            return
        assert self.log.next_offsets == self.next
        for partition, kept in enumerate(self.records):
            assert self.log.read(partition) == sorted(kept.items())
        for name in ID_NAMES:
            assert self.log.lookup_id(ih(name)) == self.ids.get(name)
        stats = self.log.stats()
        assert stats["ids"] == len(self.ids)
        assert stats["records"] == sum(len(kept) for kept in self.records)
        assert stats["bytes"] == stats["records"] * self.size
        assert self.log.kept_bytes == stats["bytes"]

    def teardown(self):
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.dir)


LogMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
test_log_model = LogMachine.TestCase
