"""``pushcore dlq list|show|replay|purge`` and the per-sink table of ``pushcore log stats``,
run as a user would, on a store built with Log; and the two Log methods they write with."""

import json
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushcore._frame import encode_properties
from pushcore.errors import StoreError
from pushcore.log import (
    OP_PUT,
    Log,
    StoreOps,
    cursor_key,
    cursor_value,
    dlq_key,
    encode_failure,
    retry_key,
)
from pushcore.record import encode_record
from server.cli import _entry_id, _iso_utc, _time_arg
from support import ROOT, Daemon, pushcore_cmd

MiB = 1 << 20
# 2024-05-01T12:00:00Z
T0 = 1714564800000

REC_A = encode_record(T0, "orders/eu/1", b"hello", qos=1, client_id="shop-1", msg_id=b"m-1",
                      key=b"k1", properties=encode_properties(
                          {"content_type": "text/plain", "user_property": [("tenant", "acme")]}))
REC_B = encode_record(T0 + 1000, "orders/us/2", b"\xff\x00", qos=0, client_id="shop-2")
REC_C = encode_record(T0 + 2000, "audit/log", b"{}", qos=1, retain=True, client_id="auditor")
# (sink id, dead-lettered at, partition, offset, attempts, status, error, record)
ENTRIES = {
    "A": (1, T0 + 100_000, 0, 5, 5, 503, "Service Unavailable", REC_A),
    "B": (1, T0 + 160_000, 1, 2, 2, 0, "connection refused", REC_B),
    "C": (2, T0 + 110_000, 0, 1, 8, 400, 'Bad Request: "x" y', REC_C),
}
ID = {name: dlq_key(*entry[:4]).hex() for name, entry in ENTRIES.items()}
# An id in the right form that no entry has.
UNKNOWN_ID = dlq_key(1, T0, 0, 99).hex()


def run(*args):
    return subprocess.run(pushcore_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def put_dead_letters(log, entries, extra=()):
    ops = StoreOps()
    ops.writes.extend(
        (OP_PUT, b"dlq", dlq_key(sink, at, part, off), encode_failure(attempts, status, error, rec))
        for sink, at, part, off, attempts, status, error, rec in entries)
    ops.writes.extend(extra)
    log.append_batch([], now_ms=T0, ops=ops)


@pytest.fixture
def store(tmp_path):
    """Two sinks, five records, three dead letters, one retry, two cursors."""
    data = tmp_path / "data"
    with Log(data, partitions=2, map_size=16 * MiB, durability="os") as log:
        assert log.register_sinks(["hooks", "audit"]) == {"hooks": 1, "audit": 2}
        log.append_batch([(0, None, REC_A)] * 3 + [(1, None, REC_B)] * 2, now_ms=T0)
        put_dead_letters(log, ENTRIES.values(), extra=(
            (OP_PUT, b"retry", retry_key(T0 + 500_000, 1, 0, 3),
             encode_failure(1, 500, "Internal Server Error", REC_A)),
            (OP_PUT, b"cursor", cursor_key(1, 0), cursor_value(2)),
            (OP_PUT, b"cursor", cursor_key(2, 1), cursor_value(2))))
    return str(data)


def reopen(data):
    return Log(data, partitions=None, readonly=True)


def dead_ids(data):
    with reopen(data) as log:
        return [entry[0].hex() for entry in log.dead_letters()]


def listed_ids(data, *args):
    r = run("dlq", "list", "--data", data, "--json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["entry_id"] for line in r.stdout.splitlines()]


# -- list ---------------------------------------------------------------------------

HEADER = ("entry id                                  sink             time                    "
          "     partition/offset tries status  error  topic")


def test_list_prints_one_line_per_entry_by_sink_oldest_first(store):
    r = run("dlq", "list", "--data", store)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        HEADER,
        f"{ID['A']}  hooks            2024-05-01T12:01:40.000Z                  0/5     5    503"
        f"  \"Service Unavailable\"  orders/eu/1",
        f"{ID['B']}  hooks            2024-05-01T12:02:40.000Z                  1/2     2      -"
        f"  \"connection refused\"  orders/us/2",
        f"{ID['C']}  audit            2024-05-01T12:01:50.000Z                  0/1     8    400"
        f"  \"Bad Request: \\\"x\\\" y\"  audit/log",
    ]
    assert r.stderr == ""


def test_list_json_carries_the_failure_the_record_and_the_payload(store):
    r = run("dlq", "list", "--data", store, "--json")
    assert r.returncode == 0, r.stderr
    a, b, c = (json.loads(line) for line in r.stdout.splitlines())
    assert a == {
        "entry_id": ID["A"], "sink": "hooks", "time": "2024-05-01T12:01:40.000Z",
        "time_ms": T0 + 100_000, "partition": 0, "offset": 5, "attempts": 5, "status": 503,
        "error": "Service Unavailable", "topic": "orders/eu/1", "id": "m-1", "key": "k1",
        "client": "shop-1", "qos": 1, "retain": False, "published": "2024-05-01T12:00:00.000Z",
        "payload": "hello"}
    # No HTTP status (a connection error) is null; a payload that is not UTF-8 is base64.
    assert (b["status"], b["id"], b["key"], b["payload_b64"]) == (None, None, None, "/wA=")
    assert "payload" not in b
    assert (c["sink"], c["retain"], c["error"], c["payload"]) == \
        ("audit", True, 'Bad Request: "x" y', "{}")


def test_list_filters_by_sink_topic_time_and_limit(store):
    assert listed_ids(store, "--sink", "audit") == [ID["C"]]
    assert listed_ids(store, "--sink", "hooks") == [ID["A"], ID["B"]]
    assert listed_ids(store, "--topic", "orders/+/1") == [ID["A"]]
    assert listed_ids(store, "--topic", "orders/#") == [ID["A"], ID["B"]]
    # The limit counts entries the topic filter kept, not entries read.
    assert listed_ids(store, "--topic", "+/log", "--limit", "1") == [ID["C"]]
    assert listed_ids(store, "--limit", "2") == [ID["A"], ID["B"]]
    # Both bounds are inclusive; a time without an offset is UTC.
    assert listed_ids(store, "--since", "2024-05-01T12:01:50Z") == [ID["B"], ID["C"]]
    assert listed_ids(store, "--until", "2024-05-01T12:01:50") == [ID["A"], ID["C"]]
    assert listed_ids(store, "--since", "2024-05-01T14:01:41+02:00",
                      "--until", "2024-05-01T12:02:39.999Z") == [ID["C"]]
    assert listed_ids(store, "--sink", "hooks", "--since", "2024-05-01T12:01:41Z") == [ID["B"]]
    assert listed_ids(store, "--sink", "audit", "--topic", "orders/#") == []


def test_since_and_until_take_a_duration_ago(tmp_path):
    data = str(tmp_path / "data")
    now = int(time.time() * 1000)
    two_hours_ago = dlq_key(1, now - 7_200_000, 0, 0).hex()
    ten_minutes_ago = dlq_key(1, now - 600_000, 0, 1).hex()
    with Log(data, partitions=1, map_size=16 * MiB, durability="os") as log:
        log.register_sinks(["hooks"])
        put_dead_letters(log, [(1, now - 7_200_000, 0, 0, 1, 500, "e", REC_A),
                               (1, now - 600_000, 0, 1, 1, 500, "e", REC_A)])
    assert listed_ids(data, "--since", "1h") == [ten_minutes_ago]
    assert listed_ids(data, "--since", "90m", "--until", "5m") == [ten_minutes_ago]
    assert listed_ids(data, "--until", "1h") == [two_hours_ago]
    assert listed_ids(data, "--since", "1d") == [two_hours_ago, ten_minutes_ago]
    assert listed_ids(data, "--since", "0.5h") == [ten_minutes_ago]
    assert listed_ids(data, "--since", "9" * 400 + "d") == [two_hours_ago, ten_minutes_ago]


# -- show ---------------------------------------------------------------------------

def test_show_prints_everything_about_an_entry(store):
    r = run("dlq", "show", "--data", store, ID["A"], ID["B"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n\n") == [
        f"entry id       {ID['A']}\n"
        "sink           hooks (id 1)\n"
        "dead since     2024-05-01T12:01:40.000Z\n"
        "partition      0\n"
        "offset         5\n"
        "attempts       5\n"
        "last status    503\n"
        "last error     Service Unavailable\n"
        "topic          orders/eu/1\n"
        "published      2024-05-01T12:00:00.000Z\n"
        "client         shop-1\n"
        "message id     m-1\n"
        "key            k1\n"
        "qos            1\n"
        "retain         no\n"
        "content type   text/plain\n"
        "user property  tenant: acme\n"
        "payload        5 bytes\n"
        "hello",
        f"entry id     {ID['B']}\n"
        "sink         hooks (id 1)\n"
        "dead since   2024-05-01T12:02:40.000Z\n"
        "partition    1\n"
        "offset       2\n"
        "attempts     2\n"
        "last status  -\n"
        "last error   connection refused\n"
        "topic        orders/us/2\n"
        "published    2024-05-01T12:00:01.000Z\n"
        "client       shop-2\n"
        "message id   -\n"
        "key          -\n"
        "qos          0\n"
        "retain       no\n"
        "payload      2 bytes, base64\n"
        "/wA=\n",
    ]


def test_show_json_adds_properties_and_ids(store):
    r = run("dlq", "show", "--data", store, "--json", ID["A"], ID["A"])
    assert r.returncode == 0, r.stderr
    # An id given twice is shown once.
    (line,) = r.stdout.splitlines()
    obj = json.loads(line)
    assert (obj["sink_id"], obj["published_ms"]) == (1, T0)
    assert obj["properties"] == {"content_type": "text/plain",
                                 "user_property": [["tenant", "acme"]]}
    assert obj["payload"] == "hello"


# -- replay -------------------------------------------------------------------------

def test_replay_by_id_moves_the_entry_to_the_retry_queue_due_now(store):
    before = int(time.time() * 1000)
    r = run("dlq", "replay", "--data", store, ID["A"])
    after = int(time.time() * 1000)
    assert (r.returncode, r.stdout, r.stderr) == (0, "replayed 1 dead letter\n", "")
    assert dead_ids(store) == [ID["B"], ID["C"]]
    with reopen(store) as log:
        due = log.retry_due(after)
        # The retry that was already queued (due later) is untouched.
        assert [entry[1] for entry in log.retry_due(T0 + 500_000)] == [T0 + 500_000]
    (replayed,) = [entry for entry in due if entry[1] != T0 + 500_000]
    key, due_ms, sink_id, partition, offset, attempts, status, error, record = replayed
    assert before <= due_ms <= after
    assert key == retry_key(due_ms, 1, 0, 5)
    assert (sink_id, partition, offset, attempts, status, error, record) == \
        (1, 0, 5, 0, 503, "Service Unavailable", REC_A)


def test_replay_all_takes_the_list_filters(store):
    r = run("dlq", "replay", "--data", store, "--all", "--sink", "hooks", "--topic", "orders/us/#")
    assert (r.returncode, r.stdout) == (0, "replayed 1 dead letter\n"), r.stderr
    assert dead_ids(store) == [ID["A"], ID["C"]]
    r = run("dlq", "replay", "--data", store, "--all", "--until", "2024-05-01T12:01:40Z")
    assert r.stdout == "replayed 1 dead letter\n"
    r = run("dlq", "replay", "--data", store, "--all")
    assert r.stdout == "replayed 1 dead letter\n"
    r = run("dlq", "replay", "--data", store, "--all")
    assert (r.returncode, r.stdout) == (0, "replayed 0 dead letters\n")
    with reopen(store) as log:
        assert log.dead_letters() == []
        queued = log.retry_due(1 << 62)
        assert log.delivery_counts() == {1: (3, 0), 2: (1, 0)}
    assert sorted((e[2], e[3], e[4], e[5], e[6]) for e in queued) == [
        (1, 0, 3, 1, 500), (1, 0, 5, 0, 503), (1, 1, 2, 0, 0), (2, 0, 1, 0, 400)]


# -- purge --------------------------------------------------------------------------

def test_purge_asks_for_yes_then_deletes(store):
    r = run("dlq", "purge", "--data", store, "--all")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("pushcore dlq purge: this deletes 3 dead letters for good;"
                        " add --yes to do it\n")
    r = run("dlq", "purge", "--data", store, ID["C"])
    assert r.stderr == ("pushcore dlq purge: this deletes 1 dead letter for good;"
                        " add --yes to do it\n")
    assert dead_ids(store) == [ID["A"], ID["B"], ID["C"]]
    r = run("dlq", "purge", "--data", store, "--yes", ID["C"])
    assert (r.returncode, r.stdout, r.stderr) == (0, "purged 1 dead letter\n", "")
    r = run("dlq", "purge", "--data", store, "-y", "--all", "--sink", "hooks", "--since",
            "2024-05-01T12:02:00Z")
    assert r.stdout == "purged 1 dead letter\n"
    assert dead_ids(store) == [ID["A"]]
    with reopen(store) as log:
        # Purging touches neither the retry queue nor the cursors.
        assert log.delivery_counts() == {1: (1, 1)}
        assert log.cursors() == {(1, 0): 2, (2, 1): 2}


# -- errors -------------------------------------------------------------------------

@pytest.mark.parametrize("command", [("show",), ("replay",), ("purge", "--yes")])
def test_an_unknown_entry_id_fails_and_changes_nothing(store, command):
    r = run("dlq", *command, "--data", store, ID["A"], UNKNOWN_ID)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"pushcore dlq {command[0]}: no dead-letter entry {UNKNOWN_ID}"
                        f" (replayed or purged already?)\n")
    assert dead_ids(store) == [ID["A"], ID["B"], ID["C"]]


@pytest.mark.parametrize("command", [("list",), ("replay", "--all"), ("purge", "--all", "--yes")])
def test_an_unknown_sink_fails_naming_the_known_ones(store, command):
    r = run("dlq", *command, "--data", store, "--sink", "nope")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"pushcore dlq {command[0]}: no sink named 'nope'"
                        f" (sinks: audit, hooks)\n")
    assert dead_ids(store) == [ID["A"], ID["B"], ID["C"]]


def test_an_unknown_sink_in_a_store_without_sinks(tmp_path):
    data = str(tmp_path / "data")
    Log(data, partitions=1, map_size=16 * MiB, durability="os").close()
    r = run("dlq", "list", "--data", data, "--sink", "hooks")
    assert (r.returncode, r.stderr) == \
        (1, "pushcore dlq list: no sink named 'hooks' (sinks: none is registered)\n")
    r = run("dlq", "list", "--data", data)
    assert (r.returncode, r.stdout.splitlines()) == (0, [HEADER])


@pytest.mark.parametrize("args, message", [
    (("show", "xyz"), "argument ID: not a dead-letter entry id (40 hex digits, as"
                      " `pushcore dlq list` prints them): 'xyz'"),
    (("show", ID["A"] + "00"), "argument ID: not a dead-letter entry id"),
    (("list", "--since", "yesterday"), "argument --since: not an ISO 8601 time"),
    (("list", "--until", "3600"), "argument --until: not an ISO 8601 time"),
    (("list", "--topic", "a/#/b"), "argument --topic: '#' must be the last level"),
    (("list", "--topic", "$share/g/a"), "argument --topic: a shared subscription is no"
                                        " topic filter here: '$share/g/a'"),
    (("list", "--limit", "0"), "argument --limit: must be at least 1, not 0"),
])
def test_malformed_arguments_are_usage_errors(store, args, message):
    r = run("dlq", args[0], "--data", store, *args[1:])
    assert r.returncode == 2
    assert f"pushcore dlq {args[0]}: error: {message}" in r.stderr


@pytest.mark.parametrize("command", ["replay", "purge"])
def test_replay_and_purge_need_ids_or_all_and_not_both(store, command):
    r = run("dlq", command, "--data", store)
    assert (r.returncode, r.stderr) == \
        (2, f"pushcore dlq {command}: give entry ids (from `pushcore dlq list`) or --all\n")
    r = run("dlq", command, "--data", store, "--all", ID["A"])
    assert (r.returncode, r.stderr) == \
        (2, f"pushcore dlq {command}: give entry ids or --all, not both\n")
    r = run("dlq", command, "--data", store, "--sink", "hooks", ID["A"])
    assert (r.returncode, r.stderr) == \
        (2, f"pushcore dlq {command}: --sink, --topic, --since, --until and --limit"
            f" go with --all\n")
    assert dead_ids(store) == [ID["A"], ID["B"], ID["C"]]


@pytest.mark.parametrize("command", [("list",), ("replay", "--all"), ("purge", "--all", "--yes")])
def test_no_store_is_an_error_and_none_is_created(tmp_path, command):
    data = tmp_path / "nothing"
    r = run("dlq", *command, "--data", str(data))
    assert (r.returncode, r.stderr) == (1, f"pushcore: store error: no store at {data}\n")
    assert not (data / "data.mdb").exists()


# -- log stats ----------------------------------------------------------------------

def test_log_stats_shows_each_sinks_cursor_backlog_retries_and_dead_letters(store):
    r = run("log", "stats", "--data", store)
    assert r.returncode == 0, r.stderr
    tail = r.stdout.split("\n\n")[1:]
    assert tail == [
        "sink                          backlog    retries dead letters\n"
        "hooks                               3          1            2\n"
        "audit                               3          0            1",
        "sink                     partition       cursor      backlog\n"
        "hooks                            0            2            1\n"
        "hooks                            1            0            2\n"
        "audit                            0            0            3\n"
        "audit                            1            2            0\n",
    ]
    stats = json.loads(run("log", "stats", "--data", store, "--json").stdout)
    assert stats["sinks"] == [
        {"name": "hooks", "id": 1, "backlog": 3, "retries": 1, "dead_letters": 2,
         "per_partition": [{"partition": 0, "cursor": 2, "backlog": 1},
                           {"partition": 1, "cursor": 0, "backlog": 2}], "configured": None},
        {"name": "audit", "id": 2, "backlog": 3, "retries": 0, "dead_letters": 1,
         "per_partition": [{"partition": 0, "cursor": 0, "backlog": 3},
                           {"partition": 1, "cursor": 2, "backlog": 0}], "configured": None},
    ]


def test_log_stats_backlog_is_never_negative_and_absent_without_sinks(tmp_path):
    data = str(tmp_path / "data")
    with Log(data, partitions=1, map_size=16 * MiB, durability="os") as log:
        log.append_batch([(0, None, REC_A)], now_ms=T0)
    r = run("log", "stats", "--data", data)
    assert "sink" not in r.stdout
    assert json.loads(run("log", "stats", "--data", data, "--json").stdout)["sinks"] == []
    with Log(data, partitions=1, map_size=16 * MiB, durability="os") as log:
        log.register_sinks(["hooks"])
        # A cursor past the partition's end (the records were trimmed and none came since).
        put_dead_letters(log, [], extra=[(OP_PUT, b"cursor", cursor_key(1, 0), cursor_value(9))])
    stats = json.loads(run("log", "stats", "--data", data, "--json").stdout)
    assert stats["sinks"] == [{"name": "hooks", "id": 1, "backlog": 0, "retries": 0,
                               "dead_letters": 0,
                               "per_partition": [{"partition": 0, "cursor": 9, "backlog": 0}],
                               "configured": None}]


# -- while the daemon serves ----------------------------------------------------------

def test_dlq_commands_work_while_the_daemon_serves(tmp_path):
    daemon = Daemon(tmp_path)
    now = int(time.time() * 1000)
    # The daemon's defaults: 8 partitions, a 1 GiB map.
    with Log(daemon.data_dir, partitions=8, map_size=1 << 30, durability="os") as log:
        log.register_sinks(["hooks", "audit"])
        put_dead_letters(log, [(1, now - 2000, 3, 7, 5, 502, "Bad Gateway", REC_A),
                               (2, now - 1000, 4, 1, 5, 410, "Gone", REC_C)])
    hooks_id, audit_id = dlq_key(1, now - 2000, 3, 7).hex(), dlq_key(2, now - 1000, 4, 1).hex()
    daemon.start()
    try:
        pub = ("pub", "-h", daemon.host, "-p", str(daemon.port), "-t", "live/a", "-m", "x")
        r = daemon.cli(*pub, text=True)
        assert r.returncode == 0, r.stderr
        assert listed_ids(daemon.data_dir, "--since", "1m") == [hooks_id, audit_id]
        r = daemon.cli("dlq", "replay", "--data", daemon.data_dir, hooks_id, text=True)
        assert (r.returncode, r.stdout) == (0, "replayed 1 dead letter\n"), r.stderr
        r = daemon.cli("dlq", "purge", "--data", daemon.data_dir, "--all", "--yes", text=True)
        assert (r.returncode, r.stdout) == (0, "purged 1 dead letter\n"), r.stderr
        # The daemon still takes publishes after the CLI wrote to its store.
        r = daemon.cli(*pub, text=True)
        assert r.returncode == 0, r.stderr
        r = daemon.cli("log", "stats", "--data", daemon.data_dir, "--json", text=True)
        sinks = json.loads(r.stdout)["sinks"]
        assert [(s["name"], s["backlog"], s["retries"], s["dead_letters"]) for s in sinks] == \
            [("hooks", 2, 1, 0), ("audit", 2, 0, 0)]
        assert daemon.alive()
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert [record["payload"] for record in daemon.dump()] == ["x", "x"]
    with reopen(daemon.data_dir) as log:
        assert log.dead_letters() == []
        (entry,) = log.retry_due(1 << 62)
        assert entry[2:] == (1, 3, 7, 0, 502, "Bad Gateway", REC_A)


# -- the Log methods ------------------------------------------------------------------

def test_replay_and_purge_skip_keys_already_gone(store):
    keys = [bytes.fromhex(ID[name]) for name in "ABC"]
    with Log(store, partitions=2, map_size=16 * MiB, durability="os") as log:
        assert log.purge_dead_letters(keys[:1]) == 1
        assert log.replay_dead_letters(keys, now_ms=T0) == 2
        assert log.replay_dead_letters(keys, now_ms=T0) == 0
        assert log.purge_dead_letters(keys) == 0
        assert log.replay_dead_letters([], now_ms=T0) == 0
        assert [entry[1:6] for entry in log.retry_due(T0)] == [(T0, 1, 1, 2, 0), (T0, 2, 0, 1, 0)]


def test_replay_and_purge_on_a_readonly_store_fail(store):
    with reopen(store) as log:
        with pytest.raises(StoreError, match="open read-only"):
            log.replay_dead_letters([bytes.fromhex(ID["A"])], now_ms=T0)
        with pytest.raises(StoreError, match="open read-only"):
            log.purge_dead_letters([bytes.fromhex(ID["A"])])


dead_letter_sets = st.dictionaries(
    st.tuples(st.integers(1, 3), st.integers(0, 1 << 50), st.integers(0, 3),
              st.integers(0, 1 << 40)),
    st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.text(max_size=20),
              st.binary(max_size=20)),
    max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=dead_letter_sets, data=st.data())
def test_replay_then_purge_partition_the_dead_letters(tmp_path_factory, entries, data):
    """Replaying a subset moves exactly it, with attempts reset and everything
    else kept; purging another subset of what is left deletes exactly that."""
    path = tmp_path_factory.mktemp("model")
    items = sorted(entries.items())
    keys = [dlq_key(*where) for where, _ in items]
    chosen = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    with Log(path, partitions=4, map_size=16 * MiB, durability="os") as log:
        put_dead_letters(log, [(*where, *failure) for where, failure in items])
        assert log.replay_dead_letters(chosen, now_ms=77) == len(chosen)
        left = [key for key in keys if key not in chosen]
        assert [entry[0] for entry in log.dead_letters()] == left
        replayed = {(entry[2], entry[3], entry[4]): entry[5:] for entry in log.retry_due(77)}
        expected = {}
        failures = dict(zip(keys, items))
        for key in chosen:
            (sink, _at, part, off), (_attempts, status, error, rec) = failures[key]
            # One sink, partition and offset dead-lettered twice is one retry:
            # the one replayed last.
            expected[(sink, part, off)] = (0, status, error, rec)
        assert replayed == expected
        purged = data.draw(st.lists(st.sampled_from(left), unique=True) if left else st.just([]))
        assert log.purge_dead_letters(purged) == len(purged)
        assert [entry[0] for entry in log.dead_letters()] == \
            [key for key in left if key not in purged]


# -- argument parsers ---------------------------------------------------------------

@given(st.integers(0, 253402300799999))
def test_times_printed_parse_back_to_the_same_millisecond(ms):
    assert _time_arg(_iso_utc(ms)) == ms


def test_iso_times_print_in_utc_with_milliseconds():
    assert _iso_utc(T0 + 250) == "2024-05-01T12:00:00.250Z"
    assert _iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert _time_arg("2024-05-01") == T0 - 12 * 3_600_000


@given(st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1), st.integers(0, 0xFFFF),
       st.integers(0, (1 << 64) - 1))
def test_entry_ids_parse_back_to_the_key(sink, at, part, off):
    key = dlq_key(sink, at, part, off)
    assert _entry_id(key.hex()) == key
    assert _entry_id(key.hex().upper()) == key
