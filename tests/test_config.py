"""Tests for pushcore.config and the documentation in conf/pushcore.yaml."""

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore.config import (
    OPTIONS,
    SINK_OPTIONS,
    Config,
    Duration,
    List,
    Number,
    PythonFunction,
    Route,
    Sink,
    Size,
    TopicFilter,
    check_config,
    load_config,
)
from pushcore.errors import ConfigError
from pushcore.webhook import Target

CONF = Path(__file__).resolve().parent.parent / "conf" / "pushcore.yaml"


@pytest.fixture
def write(tmp_path):
    def write(text, name="conf.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def load_error(path, overrides=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# --- defaults and the shipped file ------------------------------------------


def test_defaults_without_file():
    cfg = load_config()
    assert cfg.source is None
    assert cfg.to_dict() == {key: option.default for key, option in OPTIONS.items()}
    assert cfg.storage.data_dir == "./data"
    assert cfg.storage.partitions == 8
    assert cfg.storage.map_size == 1 << 30
    assert cfg.storage.durability == "fsync"
    assert cfg.storage.retention.max_age == 7 * 86400.0
    assert cfg.storage.retention.max_bytes == 0
    assert cfg.storage.retention.hard_max_bytes == 0
    assert cfg.storage.retention.overflow == "refuse"
    assert cfg.storage.retention.check_interval == 10.0
    assert cfg.storage.batch.max_messages == 8192
    assert cfg.storage.batch.max_bytes == 16 << 20
    assert cfg.dedup.window == 86400.0
    assert cfg.dedup.id_property == "id"
    assert cfg.dedup.json_field is None
    assert cfg.dedup.scope == "global"
    assert cfg.ordering.key_property == "key"
    assert cfg.mqtt.bind == ("127.0.0.1", 1883)
    assert cfg.mqtt.max_connections == 100_000
    assert cfg.mqtt.max_packet_size == 1 << 20
    assert cfg.mqtt.connect_timeout == 10.0
    assert cfg.mqtt.keepalive_max == 0
    assert cfg.mqtt.receive_maximum == 1024
    assert cfg.mqtt.topic_alias_maximum == 64
    assert cfg.mqtt.max_qos == 2
    assert cfg.mqtt.allow_zero_length_clientid is True
    assert cfg.mqtt.outbuf_high == 1 << 20
    assert cfg.mqtt.outbuf_low == 256 << 10
    assert cfg.mqtt.buffer_size == 64 << 10
    assert cfg.mqtt.subscribe_deny == ()
    assert cfg.mqtt.max_inflight_out == 32
    assert cfg.sessions.max_queued_messages == 1000
    assert cfg.sessions.max_queued_bytes == 0
    assert cfg.sessions.queue_full == "refuse"
    assert cfg.sessions.queue_qos0 is False
    assert cfg.sessions.max_expiry == 0.0
    assert cfg.log.level == "info"
    assert cfg.log.format == "text"


def test_shipped_file_loads_and_equals_defaults_except_what_it_sets():
    cfg = load_config(CONF)
    assert cfg.source == str(CONF)
    active = _active_keys(CONF.read_text())
    # The quick start sets exactly the data directory and the listener, both
    # to their defaults; everything else is documented but commented out.
    assert active == {"storage.data_dir", "mqtt.bind"}
    assert cfg.storage.data_dir == "./data"
    assert cfg.mqtt.bind == ("127.0.0.1", 1883)
    assert cfg == load_config()


def test_check_config_is_load_config(write):
    assert check_config(CONF) == load_config(CONF)
    bad = write("log:\n  level: loud\n")
    with pytest.raises(ConfigError, match="log.level"):
        check_config(bad)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "# only comments\n#storage:\n",
        "---\n",
        "~\n",
        "storage:\ndedup:\nordering:\nmqtt:\nsessions:\nlog:\n",
        "storage:\n  retention:\n  batch:\n",
    ],
)
def test_empty_file_or_sections_mean_defaults(write, text):
    assert load_config(write(text)) == load_config()


def test_file_sets_values(write):
    path = write(
        "storage:\n"
        "  data_dir: /var/lib/pushcore\n"
        "  partitions: 16\n"
        "  map_size: 64MiB\n"
        "  durability: os\n"
        "  retention:\n"
        "    max_age: 0\n"
        "    max_bytes: 10GB\n"
        "  batch:\n"
        "    max_messages: 1_000\n"
        "dedup:\n"
        "  json_field: msg_id\n"
        "  scope: client\n"
        "mqtt:\n"
        "  bind: '[::1]:8883'\n"
        "  allow_zero_length_clientid: no\n"
        "  connect_timeout: 1500ms\n"
        "log:\n"
        "  format: json\n"
    )
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.storage.data_dir == "/var/lib/pushcore"
    assert cfg.storage.partitions == 16
    assert cfg.storage.map_size == 64 << 20
    assert cfg.storage.durability == "os"
    assert cfg.storage.retention.max_age == 0.0
    assert cfg.storage.retention.max_bytes == 10 * 1000**3
    assert cfg.storage.batch.max_messages == 1000
    assert cfg.dedup.json_field == "msg_id"
    assert cfg.dedup.scope == "client"
    assert cfg.mqtt.bind == ("::1", 8883)
    assert cfg.mqtt.allow_zero_length_clientid is False
    assert cfg.mqtt.connect_timeout == 1.5
    assert cfg.log.format == "json"
    assert cfg.get("storage.retention.max_bytes") == 10 * 1000**3


def test_strings_are_taken_as_written_not_as_yaml_types(write):
    # YAML 1.1 would make these an int, a bool and null; a string option
    # keeps the text the operator wrote, and a quoted "null" is a name.
    cfg = load_config(write("storage:\n  data_dir: 2024\ndedup:\n  id_property: on\n  json_field: 'null'\n"))
    assert cfg.storage.data_dir == "2024"
    assert cfg.dedup.id_property == "on"
    assert cfg.dedup.json_field == "null"
    assert load_config(write("dedup:\n  json_field: null\n")).dedup.json_field is None
    assert load_config(write("dedup:\n  json_field: ~\n")).dedup.json_field is None


# --- errors -----------------------------------------------------------------


def test_unknown_key_names_line_and_suggests(write):
    path = write(
        "# pushcore\n"
        "\n"
        "storage:\n"
        "  data_dir: ./data\n"
        "  # how durable\n"
        "  partitions: 8\n"
        "  durabilty: os\n"
    )
    err = load_error(path)
    assert str(err) == f"{path}:7: storage.durabilty: unknown option; did you mean storage.durability?"
    assert (err.key, err.line, err.source) == ("storage.durabilty", 7, str(path))


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("storag:\n  partitions: 8\n", 1, "storag: unknown option; did you mean storage?"),
        ("mqtt:\n  max_packet: 10\n", 2, "mqtt.max_packet: unknown option; did you mean mqtt.max_packet_size?"),
        (
            "storage:\n  retention:\n    maxage: 1d\n",
            3,
            "storage.retention.maxage: unknown option; did you mean storage.retention.max_age?",
        ),
        ("log:\n  level: info\nzzz: 1\n", 3, "zzz: unknown option"),
    ],
)
def test_unknown_keys(write, text, line, message):
    path = write(text)
    err = load_error(path)
    assert str(err) == f"{path}:{line}: {message}"


@pytest.mark.parametrize(
    "line, message",
    [
        ("  partitions: many", "storage.partitions: expected an integer 1..1024, got 'many'"),
        ("  partitions: 8.0", "storage.partitions: expected an integer 1..1024, got '8.0'"),
        ("  partitions: true", "storage.partitions: expected an integer 1..1024, got 'true'"),
        ("  partitions:", "storage.partitions: expected an integer 1..1024, got null"),
        ("  partitions: [8]", "storage.partitions: expected an integer 1..1024, got a list"),
        ("  partitions: {n: 8}", "storage.partitions: expected an integer 1..1024, got a mapping"),
        ("  data_dir: ''", "storage.data_dir: expected a non-empty string, got ''"),
        ("  data_dir:", "storage.data_dir: expected a non-empty string, got null"),
    ],
)
def test_wrong_type(write, line, message):
    path = write(f"storage:\n{line}\n")
    err = load_error(path)
    assert str(err) == f"{path}:2: {message}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("storage:\n  partitions: 0\n", "storage.partitions: expected an integer 1..1024, got 0"),
        ("storage:\n  partitions: 1025\n", "storage.partitions: expected an integer 1..1024, got 1025"),
        ("mqtt:\n  max_qos: 3\n", "mqtt.max_qos: expected an integer 0..2, got 3"),
        ("mqtt:\n  receive_maximum: 65536\n", "mqtt.receive_maximum: expected an integer 1..65535, got 65536"),
        ("mqtt:\n  keepalive_max: -1\n", "mqtt.keepalive_max: expected an integer 0..65535, got -1"),
        ("mqtt:\n  max_inflight_out: 0\n", "mqtt.max_inflight_out: expected an integer 1..65535, got 0"),
        ("mqtt:\n  max_inflight_out: 65536\n", "mqtt.max_inflight_out: expected an integer 1..65535, got 65536"),
        (
            "sessions:\n  max_queued_messages: 10_000_001\n",
            "sessions.max_queued_messages: expected an integer 0..10000000, got 10000001",
        ),
        (
            "mqtt:\n  buffer_size: 32MiB\n",
            "mqtt.buffer_size: expected a size 4KiB..16MiB (bytes, or a number with a unit: "
            "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), got 32MiB (33554432 bytes)",
        ),
        (
            "mqtt:\n  max_packet_size: 268435461\n",
            "mqtt.max_packet_size: expected a size 16..268435460 (bytes, or a number with a unit: "
            "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), got 268435461 (268435461 bytes)",
        ),
        (
            "storage:\n  map_size: 512KiB\n",
            "storage.map_size: expected a size of at least 1MiB (bytes, or a number with a unit: "
            "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB), got 512KiB (524288 bytes)",
        ),
        (
            "mqtt:\n  connect_timeout: 0\n",
            "mqtt.connect_timeout: expected a duration (a number with a unit ms, s, m, h or d; "
            "a plain number is seconds) greater than 0, got '0'",
        ),
    ],
)
def test_out_of_range(write, text, message):
    path = write(text)
    err = load_error(path)
    assert str(err) == f"{path}:2: {message}"


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("storage.durability", "disk", "fsync, os"),
        ("storage.durability", "FSYNC", "fsync, os"),
        ("dedup.scope", "tenant", "global, client"),
        ("log.level", "trace", "debug, info, warning, error"),
        ("log.format", "xml", "text, json"),
        ("sessions.queue_full", "drop_newest", "refuse, drop_oldest"),
    ],
)
def test_bad_enum_lists_allowed_values(write, key, value, allowed):
    section, name = key.split(".")
    path = write(f"{section}:\n  {name}: {value}\n")
    err = load_error(path)
    assert str(err) == f"{path}:2: {key}: expected one of {allowed}; got {value!r}"


def test_bad_overflow_policy_lists_allowed_values(write):
    path = write("storage:\n  retention:\n    overflow: block\n")
    err = load_error(path)
    assert str(err) == (f"{path}:3: storage.retention.overflow: expected one of refuse, "
                        f"drop_oldest; got 'block'")


def test_bad_bool(write):
    path = write("mqtt:\n  allow_zero_length_clientid: maybe\n")
    err = load_error(path)
    assert str(err) == f"{path}:2: mqtt.allow_zero_length_clientid: expected true or false, got 'maybe'"


@pytest.mark.parametrize(
    "text, value",
    [
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("512KiB", 512 << 10),
        ("1000", 1000),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("3KB", 3000),
        ("1TiB", 1 << 40),
        ("1TB", 10**12),
        ("7B", 7),
        ("64 MiB", 64 << 20),
        ("1.5GiB", 3 << 29),
        ("0.5KiB", 512),
        (4096, 4096),
    ],
)
def test_size_values(text, value):
    assert Size().parse(text) == value


@pytest.mark.parametrize("text", ["10 parsecs", "64mib", "MiB", "-5", "1.2.3", "0.3KiB", "1e6", "", "1,000"])
def test_bad_size(write, text):
    path = write(f"storage:\n  batch:\n    max_bytes: '{text}'\n")
    err = load_error(path)
    assert err.key == "storage.batch.max_bytes"
    assert err.line == 3
    assert "expected a size" in str(err)
    assert "KiB, MiB, GiB" in str(err)
    assert repr(text) in str(err)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("90", 90.0),
        ("0.25", 0.25),
        ("1.5h", 5400.0),
        (3, 3.0),
        (2.5, 2.5),
    ],
)
def test_duration_values(text, seconds):
    value = Duration().parse(text)
    assert value == seconds
    assert isinstance(value, float)


@pytest.mark.parametrize("text", ["10y", "-1s", "1:30", "s", "10 sec", "10S", "ten", "1h30m", "1e3", "9" * 400])
def test_bad_duration(write, text):
    path = write(f"dedup:\n  window: {text}\n")
    err = load_error(path)
    assert str(err).startswith(f"{path}:2: dedup.window: expected a duration (a number with a unit ms, s, m, h or d")
    assert repr(text) in str(err)


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("[::1]:1883", ("::1", 1883)),
        ("0.0.0.0:1883", ("0.0.0.0", 1883)),
        (":1883", ("", 1883)),
        ("localhost:8883", ("localhost", 8883)),
        ("broker.example.com:1883", ("broker.example.com", 1883)),
        ("[::]:1883", ("::", 1883)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
    ],
)
def test_address_values(write, text, address):
    assert load_config(write(f"mqtt:\n  bind: '{text}'\n")).mqtt.bind == address
    assert load_config(None, {"mqtt.bind": text}).mqtt.bind == address


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        "1883",
        "::1:1883",
        "[::g]:1883",
        "1.2.3.999:1883",
        "host:65536",
        "host:port",
        "",
        "a b:1883",
        "*:1883",
        "-bad-.com:1883",
    ],
)
def test_bad_address(write, text):
    path = write(f"mqtt:\n  bind: '{text}'\n")
    err = load_error(path)
    assert str(err).startswith(f"{path}:2: mqtt.bind: expected host:port, [ipv6]:port or :port")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400, -1])
def test_duration_rejects_non_finite_and_negative(value):
    with pytest.raises(ConfigError, match="dedup.window: expected a duration"):
        load_config(None, {"dedup.window": value})


def test_duplicate_key(write):
    path = write("mqtt:\n  max_qos: 1\n  receive_maximum: 10\n  max_qos: 2\n")
    err = load_error(path)
    assert str(err) == f"{path}:4: mqtt.max_qos: duplicate key (first set on line 2)"


def test_duplicate_section(write):
    path = write("mqtt:\n  max_qos: 1\nlog:\n  level: debug\nmqtt:\n  max_qos: 0\n")
    err = load_error(path)
    assert str(err) == f"{path}:5: mqtt: duplicate key (first set on line 1)"


def test_dotted_keys_are_not_accepted_in_the_file(write):
    path = write("storage.durability: os\n")
    err = load_error(path)
    assert (err.key, err.line) == ("storage.durability", 1)
    assert "nest" in str(err)


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("mqtt:\n  bind: [1, 2\n", 3, "expected ',' or ']'"),
        ("storage:\n  partitions: 8\n bad: indent\n", 3, "expected <block end>"),
        ("log:\n\tlevel: info\n", 2, "cannot start any token"),
        ("mqtt: {a: 1\n", 2, "expected ',' or '}'"),
    ],
)
def test_invalid_yaml(write, text, line, problem):
    path = write(text)
    err = load_error(path)
    assert str(err).startswith(f"{path}:{line}: invalid YAML: ")
    assert problem in str(err)


@pytest.mark.parametrize(
    "data, line, problem",
    [
        (b"log:\n  level: \xff\n", 2, "not UTF-8 text: invalid start byte at byte 14"),
        (b"log:\n  # caf\xc3\xa9\n  level: \x07\n", 3, "character #x0007: special characters are not allowed"),
        (b"log:\n  level: info\n---\nlog:\n  level: debug\n", 3, "but found another document"),
    ],
)
def test_invalid_bytes(tmp_path, data, line, problem):
    path = tmp_path / "conf.yaml"
    path.write_bytes(data)
    err = load_error(path)
    assert str(err).startswith(f"{path}:{line}: invalid YAML: ")
    assert problem in str(err)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_bytes(b"\xef\xbb\xbflog:\n  level: debug\n")
    assert load_config(path).log.level == "debug"


def test_not_a_mapping(write):
    path = write("hello\n")
    assert str(load_error(path)) == (
        f"{path}:1: (top level): expected a mapping of options "
        "(storage, dedup, ordering, mqtt, sessions, log, sinks, routes), got 'hello'"
    )
    path = write("log: [debug]\n")
    assert str(load_error(path)) == f"{path}:1: log: expected a mapping of options (level, format), got a list"


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    err = load_error(path)
    assert err.source == str(path)
    assert "cannot read" in str(err)


@pytest.mark.parametrize(
    "text, line",
    [
        ("mqtt:\n  outbuf_low: 2MiB\n", 2),
        ("mqtt:\n  outbuf_high: 128KiB\n", 2),
        ("mqtt:\n  outbuf_high: 64KiB\n  outbuf_low: 64KiB\n", 3),
    ],
)
def test_outbuf_low_must_be_below_high(write, text, line):
    path = write(text)
    err = load_error(path)
    assert err.key == "mqtt.outbuf_low"
    assert err.line == line
    assert str(err).startswith(f"{path}:{line}: mqtt.outbuf_low: must be less than mqtt.outbuf_high")


def test_outbuf_check_applies_after_overrides(write):
    path = write("mqtt:\n  outbuf_low: 2MiB\n")
    assert load_config(path, {"mqtt.outbuf_high": "4MiB"}).mqtt.outbuf_high == 4 << 20
    err = load_error(None, {"mqtt.outbuf_low": 1 << 20})
    assert str(err) == "mqtt.outbuf_low: must be less than mqtt.outbuf_high (1MiB >= 1MiB)"


def test_sessions_section(write):
    path = write(
        "mqtt:\n"
        "  max_inflight_out: 65535\n"
        "sessions:\n"
        "  max_queued_messages: 0\n"
        "  max_queued_bytes: 64MiB\n"
        "  queue_full: drop_oldest\n"
        "  queue_qos0: true\n"
        "  max_expiry: 1d\n"
    )
    cfg = load_config(path)
    assert cfg.mqtt.max_inflight_out == 65535
    assert cfg.sessions.max_queued_messages == 0
    assert cfg.sessions.max_queued_bytes == 64 << 20
    assert cfg.sessions.queue_full == "drop_oldest"
    assert cfg.sessions.queue_qos0 is True
    assert cfg.sessions.max_expiry == 86400.0


# --- list options -------------------------------------------------------------

FILTER_EXPECTED = (
    "a topic filter ('+' and '#' only as whole levels, '#' only as the last; "
    "$share/{ShareName}/{filter} for a shared subscription)"
)


def test_list_block_style(write):
    path = write(
        "mqtt:\n"
        "  subscribe_deny:\n"
        "    # secrets\n"
        "    - secret/#\n"
        "    - '#'\n"
        "    - +/keys/+\n"
        "    - $share/workers/jobs/#\n"
        "    - ' padded '\n"
        "    - a,b\n"
        "    - 'null'\n"
    )
    deny = load_config(path).mqtt.subscribe_deny
    assert deny == ("secret/#", "#", "+/keys/+", "$share/workers/jobs/#", " padded ", "a,b", "null")
    assert isinstance(deny, tuple)


def test_list_flow_style(write):
    cfg = load_config(write("mqtt:\n  subscribe_deny: [secret/#, '#', $SYS/+/x]\n"))
    assert cfg.mqtt.subscribe_deny == ("secret/#", "#", "$SYS/+/x")
    cfg = load_config(write("mqtt:\n  subscribe_deny: [\n    a/b,\n    c/#,\n  ]\n"))
    assert cfg.mqtt.subscribe_deny == ("a/b", "c/#")
    assert load_config(write("mqtt:\n  subscribe_deny: []\n")).mqtt.subscribe_deny == ()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("secret/#", ("secret/#",)),
        ("secret/#,admin/+", ("secret/#", "admin/+")),
        (" secret/# , admin/+ ", ("secret/#", "admin/+")),
        ("[secret/#, admin/+]", ("secret/#", "admin/+")),
        ("#", ("#",)),
        ("", ()),
        ("  ", ()),
        ("[]", ()),
        ("[ ]", ()),
        (["a,b", " padded "], ("a,b", " padded ")),
        (("x/+",), ("x/+",)),
        ([], ()),
    ],
)
def test_list_overrides(value, expected):
    cfg = load_config(None, {"mqtt.subscribe_deny": value})
    assert cfg.mqtt.subscribe_deny == expected


def test_list_override_beats_file(write):
    path = write("mqtt:\n  subscribe_deny:\n    - a/#\n")
    assert load_config(path, {"mqtt.subscribe_deny": "b/#"}).mqtt.subscribe_deny == ("b/#",)
    assert load_config(path, {"mqtt.subscribe_deny": ""}).mqtt.subscribe_deny == ()


@pytest.mark.parametrize(
    "text, line, message",
    [
        (
            "mqtt:\n  subscribe_deny:\n    - ok/#\n    - a/#/b\n",
            4,
            f"item 2: expected {FILTER_EXPECTED}, got 'a/#/b' "
            "('#' must be the last level of topic filter 'a/#/b')",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - a+\n",
            3,
            f"item 1: expected {FILTER_EXPECTED}, got 'a+' ('+' must be a whole level in topic filter 'a+')",
        ),
        (
            "mqtt:\n  subscribe_deny: [\n    ok,\n    x/#y,\n  ]\n",
            4,
            f"item 2: expected {FILTER_EXPECTED}, got 'x/#y' ('#' must be a whole level in topic filter 'x/#y')",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - ''\n",
            3,
            f"item 1: expected {FILTER_EXPECTED}, got '' (topic filter is empty)",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - $share/g\n",
            3,
            f"item 1: expected {FILTER_EXPECTED}, got '$share/g' (shared subscription '$share/g' has no topic "
            "filter after its ShareName (the form is $share/{ShareName}/{filter}))",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - a\n    - #\n",
            4,
            f"item 2: expected {FILTER_EXPECTED}, got null (in YAML an unquoted # starts a comment: write '#')",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - [a, b]\n",
            3,
            f"item 1: expected {FILTER_EXPECTED}, got a list",
        ),
        (
            "mqtt:\n  subscribe_deny:\n    - {a: b}\n",
            3,
            f"item 1: expected {FILTER_EXPECTED}, got a mapping",
        ),
    ],
)
def test_list_bad_item_names_key_and_item_line(write, text, line, message):
    path = write(text)
    err = load_error(path)
    assert (err.key, err.line, err.source) == ("mqtt.subscribe_deny", line, str(path))
    assert str(err) == f"{path}:{line}: mqtt.subscribe_deny: {message}"


@pytest.mark.parametrize(
    "value, got",
    [
        ("secret/#", "'secret/#'"),
        ("a, b", "'a, b'"),
        ("", "null (in YAML an unquoted # starts a comment: write '#')"),
        ("#", "null (in YAML an unquoted # starts a comment: write '#')"),
        ("{a: b}", "a mapping"),
    ],
)
def test_list_in_file_must_be_a_sequence(write, value, got):
    path = write(f"mqtt:\n  max_qos: 1\n  subscribe_deny: {value}\n")
    err = load_error(path)
    assert str(err) == f"{path}:3: mqtt.subscribe_deny: expected a list of topic filters ([] for none), got {got}"


@pytest.mark.parametrize(
    "value, message",
    [
        ("ok,a/#/b", f"item 2: expected {FILTER_EXPECTED}, got 'a/#/b' "
                     "('#' must be the last level of topic filter 'a/#/b')"),
        ("a,,b", f"item 2: expected {FILTER_EXPECTED}, got '' (topic filter is empty)"),
        (["a", 5], f"item 2: expected {FILTER_EXPECTED}, got 5"),
        (None, "expected a list of topic filters ([] for none), got null "
               "(in YAML an unquoted # starts a comment: write '#')"),
        (7, "expected a list of topic filters ([] for none), got 7"),
    ],
)
def test_list_bad_overrides(value, message):
    err = load_error(None, {"mqtt.subscribe_deny": value})
    assert str(err) == f"mqtt.subscribe_deny: {message}"
    assert err.line is None and err.source is None


def test_list_format_round_trips():
    kind = List(TopicFilter())
    for value in [(), ("a/#",), ("secret/#", "+/keys", "$share/g/x/#")]:
        assert kind.parse(kind.format(value)) == value
    assert kind.format(("a/#", "b")) == "[a/#, b]"


# --- overrides --------------------------------------------------------------


def test_overrides_beat_the_file(write):
    path = write("storage:\n  data_dir: /srv/a\n  partitions: 4\nmqtt:\n  bind: 0.0.0.0:1883\n")
    cfg = load_config(
        path,
        {
            "storage.data_dir": "/tmp/d",
            "mqtt.bind": "127.0.0.1:1884",
            "storage.partitions": "16",
            "mqtt.allow_zero_length_clientid": "false",
            "storage.retention.max_age": "1h",
            "dedup.json_field": None,
        },
    )
    assert cfg.storage.data_dir == "/tmp/d"
    assert cfg.mqtt.bind == ("127.0.0.1", 1884)
    assert cfg.storage.partitions == 16
    assert cfg.mqtt.allow_zero_length_clientid is False
    assert cfg.storage.retention.max_age == 3600.0
    assert cfg.dedup.json_field is None


def test_typed_overrides():
    cfg = load_config(
        None,
        {
            "storage.partitions": 2,
            "storage.map_size": 1 << 24,
            "dedup.window": 30,
            "mqtt.bind": ("::1", 0),
            "mqtt.allow_zero_length_clientid": False,
        },
    )
    assert cfg.storage.partitions == 2
    assert cfg.storage.map_size == 1 << 24
    assert cfg.dedup.window == 30.0
    assert cfg.mqtt.bind == ("::1", 0)
    assert cfg.mqtt.allow_zero_length_clientid is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"storage.durabilty": "os"}, "storage.durabilty: unknown option; did you mean storage.durability?"),
        ({"storage.partitions": "many"}, "storage.partitions: expected an integer 1..1024, got 'many'"),
        ({"storage.partitions": True}, "storage.partitions: expected an integer 1..1024, got True"),
        ({"storage.durability": None}, "storage.durability: expected one of fsync, os; got null"),
        ({"mqtt.allow_zero_length_clientid": 1}, "mqtt.allow_zero_length_clientid: expected true or false, got 1"),
    ],
)
def test_bad_overrides(write, overrides, message):
    err = load_error(write("log:\n  level: debug\n"), overrides)
    assert str(err) == message
    assert err.line is None and err.source is None


# --- Config access ----------------------------------------------------------


def test_config_access():
    cfg = load_config()
    assert cfg.get("storage.durability") == cfg.storage.durability == "fsync"
    assert cfg.get("storage.retention.max_age") == cfg.storage.retention.max_age
    assert "durability" in dir(cfg.storage)
    assert "retention" in dir(cfg.storage)


def test_unknown_option_access_raises():
    cfg = load_config()
    hint = r"storage\.durabilty: not a pushcore option; did you mean storage\.durability\?"
    with pytest.raises(AttributeError, match=hint):
        cfg.storage.durabilty
    with pytest.raises(AttributeError):
        cfg.websocket
    with pytest.raises(AttributeError):
        cfg.storage.retention.max_count
    with pytest.raises(KeyError, match="mqtt.bnd"):
        cfg.get("mqtt.bnd")
    with pytest.raises(KeyError):
        cfg.get("storage")
    with pytest.raises(KeyError):
        cfg.get("storage.retention")


def test_config_is_read_only():
    cfg = load_config()
    with pytest.raises(AttributeError):
        cfg.storage.durability = "os"
    with pytest.raises(AttributeError):
        cfg.storage = None
    assert cfg.storage.durability == "fsync"


def test_config_equality():
    assert load_config() == load_config()
    assert load_config() != load_config(None, {"log.level": "debug"})
    assert isinstance(load_config(), Config)


# --- value types round-trip -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(sorted(Size.UNITS)))
def test_size_units_scale(number, unit):
    assert Size().parse(f"{number}{unit}") == number * Size.UNITS[unit]
    assert Size().parse(Size().format(number)) == number


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_units_scale(number, unit):
    kind = Duration(allow_zero=True)
    seconds = kind.parse(f"{number}{unit}")
    assert seconds == pytest.approx(number * Duration.UNITS[unit])
    assert kind.parse(kind.format(seconds)) == pytest.approx(seconds)


# --- sinks and routes ---------------------------------------------------------

FULL_DELIVERY = """\
sinks:
  orders:
    type: webhook
    url: http://127.0.0.1:8080/hook
    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
    connect_timeout: 2s
    response_timeout: 30s
    connections: 16
    batch: 100
    headers:
      - "Authorization: Bearer t0k3n"
      - "X-Tenant:acme"
    ordering: none
    concurrency: 8
    on_4xx: retry
    retry:
      base: 500ms
      factor: 1.5
      cap: 1h
      max_attempts: 20
      max_retry_after: 10m
  audit:
    type: python
    function: mypackage.hooks:handle
    threads: 4
    ordering: strict
    concurrency: 1
    retry:
      base: 2s
      factor: 3
      cap: 1m
      max_attempts: 3
routes:
  - filter: orders/#
    sink: orders
  - {filter: '+/audit/#', sink: audit}
  - filter: orders/#
    sink: audit
"""


def test_full_delivery_config(write):
    cfg = load_config(write(FULL_DELIVERY))
    assert list(cfg.sinks) == ["orders", "audit"]
    orders = cfg.sinks["orders"]
    assert isinstance(orders, Sink)
    assert orders.name == "orders"
    assert orders.to_dict() == {
        "type": "webhook",
        "url": Target("127.0.0.1", 8080, "/hook"),
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "connect_timeout": 2.0,
        "response_timeout": 30.0,
        "connections": 16,
        "batch": 100,
        "headers": (("Authorization", "Bearer t0k3n"), ("X-Tenant", "acme")),
        "on_4xx": "retry",
        "ordering": "none",
        "concurrency": 8,
        "retry.base": 0.5,
        "retry.factor": 1.5,
        "retry.cap": 3600.0,
        "retry.max_attempts": 20,
        "retry.max_retry_after": 600.0,
    }
    assert orders.type == "webhook"
    assert orders.url == Target("127.0.0.1", 8080, "/hook")
    assert orders.retry.base == 0.5
    assert orders.retry.factor == 1.5
    assert orders.get("retry.max_retry_after") == 600.0
    audit = cfg.sinks["audit"]
    assert audit.to_dict() == {
        "type": "python",
        "function": "mypackage.hooks:handle",
        "threads": 4,
        "ordering": "strict",
        "concurrency": 1,
        "retry.base": 2.0,
        "retry.factor": 3.0,
        "retry.cap": 60.0,
        "retry.max_attempts": 3,
    }
    assert cfg.routes == (
        Route("orders/#", "orders"),
        Route("+/audit/#", "audit"),
        Route("orders/#", "audit"),
    )
    assert cfg.routes[0] == ("orders/#", "orders")
    assert (cfg.routes[1].filter, cfg.routes[1].sink) == ("+/audit/#", "audit")


def test_sink_defaults(write):
    cfg = load_config(
        write(
            "sinks:\n"
            "  hook:\n"
            "    type: webhook\n"
            "    url: http://hooks.example/in\n"
            "  fn:\n"
            "    type: python\n"
            "    function: m:f\n"
        )
    )
    assert cfg.sinks["hook"].to_dict() == {
        "type": "webhook",
        "url": Target("hooks.example", 80, "/in"),
        "secret": None,
        "connect_timeout": 5.0,
        "response_timeout": 10.0,
        "connections": 4,
        "batch": 1,
        "headers": (),
        "on_4xx": "dead",
        "ordering": "strict",
        "concurrency": 4,
        "retry.base": 1.0,
        "retry.factor": 2.0,
        "retry.cap": 300.0,
        "retry.max_attempts": 10,
        "retry.max_retry_after": 3600.0,
    }
    assert cfg.sinks["fn"].to_dict() == {
        "type": "python",
        "function": "m:f",
        "threads": 1,
        "ordering": "strict",
        "concurrency": 4,
        "retry.base": 1.0,
        "retry.factor": 2.0,
        "retry.cap": 300.0,
        "retry.max_attempts": 10,
    }
    assert cfg.routes == ()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sinks:\nroutes:\n",
        "sinks: {}\nroutes: []\n",
        "# sinks:\n#   a:\n#     type: python\n",
    ],
)
def test_no_sinks_or_routes_is_empty(write, text):
    cfg = load_config(write(text))
    assert dict(cfg.sinks) == {}
    assert cfg.routes == ()
    assert cfg == load_config()
    assert dict(load_config().sinks) == {} and load_config().routes == ()


def test_routes_may_come_before_sinks_and_keep_file_order(write):
    cfg = load_config(
        write(
            "routes:\n"
            "  - {filter: b/#, sink: s}\n"
            "  - {filter: a/#, sink: s}\n"
            "  - {filter: '#', sink: t}\n"
            "sinks:\n"
            "  s: {type: python, function: m:f}\n"
            "  t: {type: python, function: m:g}\n"
        )
    )
    assert cfg.routes == (Route("b/#", "s"), Route("a/#", "s"), Route("#", "t"))
    assert list(cfg.sinks) == ["s", "t"]


def test_sink_names(write):
    names = ["a", "A-1", "orders.v2", "_x", "9", "null", "x" * 64]
    text = "sinks:\n" + "".join(f"  '{name}': {{type: python, function: m:f}}\n" for name in names)
    assert list(load_config(write(text)).sinks) == names


def test_yaml_anchors_share_a_retry_policy(write):
    cfg = load_config(
        write(
            "sinks:\n"
            "  a:\n"
            "    type: python\n"
            "    function: m:f\n"
            "    retry: &slow {base: 10s, cap: 1h}\n"
            "  b:\n"
            "    type: python\n"
            "    function: m:g\n"
            "    retry: *slow\n"
        )
    )
    assert cfg.sinks["b"].retry.base == 10.0
    assert cfg.sinks["b"].retry.cap == 3600.0


def test_sink_access_errors(write):
    cfg = load_config(write(FULL_DELIVERY))
    audit, orders = cfg.sinks["audit"], cfg.sinks["orders"]
    with pytest.raises(AttributeError) as info:
        audit.url
    assert str(info.value) == "sinks.audit.url: not an option of a python sink (webhook sinks only)"
    with pytest.raises(AttributeError) as info:
        audit.retry.max_retry_after
    assert str(info.value) == (
        "sinks.audit.retry.max_retry_after: not an option of a python sink (webhook sinks only)"
    )
    with pytest.raises(AttributeError) as info:
        orders.retry.bse
    assert str(info.value) == (
        "sinks.orders.retry.bse: unknown option of a webhook sink; did you mean sinks.orders.retry.base?"
    )
    with pytest.raises(KeyError) as info:
        orders.get("threads")
    assert info.value.args[0] == "sinks.orders.threads: not an option of a webhook sink (python sinks only)"
    with pytest.raises(KeyError) as info:
        orders.get("retry")
    assert info.value.args[0] == "sinks.orders.retry: a section, not an option; name one of its options, as retry.base"
    with pytest.raises(KeyError) as info:
        orders.get("connection")
    assert info.value.args[0] == (
        "sinks.orders.connection: unknown option of a webhook sink; did you mean sinks.orders.connections?"
    )
    assert dir(audit) == ["concurrency", "function", "ordering", "retry", "threads", "type"]
    assert dir(orders.retry) == ["base", "cap", "factor", "max_attempts", "max_retry_after"]
    with pytest.raises(KeyError):
        cfg.sinks["nope"]


def test_sinks_and_routes_are_read_only(write):
    cfg = load_config(write(FULL_DELIVERY))
    with pytest.raises(TypeError):
        cfg.sinks["new"] = cfg.sinks["orders"]
    with pytest.raises(AttributeError):
        cfg.sinks["orders"].batch = 5
    with pytest.raises(AttributeError):
        cfg.sinks["orders"].retry.base = 5
    with pytest.raises(AttributeError):
        cfg.sinks = {}
    with pytest.raises(AttributeError):
        cfg.routes = ()
    assert cfg.sinks["orders"].batch == 100


def test_sink_repr_hides_the_secret(write):
    cfg = load_config(write(FULL_DELIVERY))
    text = repr(cfg.sinks["orders"])
    assert text.startswith("<sinks.orders: type='webhook', url=Target(host='127.0.0.1', port=8080, target='/hook'), ")
    assert "secret=<secret>" in text
    assert "MfKQ9r8" not in text
    assert repr(cfg.sinks["orders"].retry) == (
        "<sinks.orders.retry: base=0.5, factor=1.5, cap=3600.0, max_attempts=20, max_retry_after=600.0>"
    )


def test_config_equality_includes_sinks_and_routes(write):
    assert load_config(write(FULL_DELIVERY)) == load_config(write(FULL_DELIVERY, "copy.yaml"))
    changed = FULL_DELIVERY.replace("threads: 4", "threads: 5")
    assert load_config(write(FULL_DELIVERY)) != load_config(write(changed, "changed.yaml"))
    reordered = FULL_DELIVERY.replace("  - filter: orders/#\n    sink: audit\n", "")
    assert load_config(write(FULL_DELIVERY)) != load_config(write(reordered, "fewer.yaml"))
    assert load_config(write(FULL_DELIVERY)) != load_config()


def _sink(options, name="orders", sink_type="webhook", url="http://127.0.0.1:8080/hook"):
    """A file with one sink (``type`` and ``url`` first, on lines 3 and 4), then ``options``."""
    head = f"sinks:\n  {name}:\n    type: {sink_type}\n"
    head += f"    url: {url}\n" if sink_type == "webhook" else "    function: m:f\n"
    return head + options


URL_EXPECTED = "an http:// URL (http://host[:port][/path][?query])"
ROUTE_FILTER_EXPECTED = "a topic filter ('+' and '#' only as whole levels, '#' only as the last; no $share/)"


@pytest.mark.parametrize(
    "text, line, message",
    [
        # unknown options, with hints among the options of the sink's type
        (
            _sink("    urll: x\n"),
            5,
            "sinks.orders.urll: unknown option of a webhook sink; did you mean sinks.orders.url?",
        ),
        (
            _sink("    retry:\n      bse: 1s\n"),
            6,
            "sinks.orders.retry.bse: unknown option of a webhook sink; did you mean sinks.orders.retry.base?",
        ),
        (_sink("    retyr: {base: 1s}\n"), 5,
         "sinks.orders.retyr: unknown option of a webhook sink; did you mean sinks.orders.retry?"),
        (_sink("    zzz: 1\n"), 5, "sinks.orders.zzz: unknown option of a webhook sink"),
        (
            _sink("    thread: 2\n", sink_type="python"),
            5,
            "sinks.orders.thread: unknown option of a python sink; did you mean sinks.orders.threads?",
        ),
        # options of the other type of sink
        (
            "sinks:\n  audit:\n    url: http://x/\n    type: python\n    function: m:f\n",
            3,
            "sinks.audit.url: not an option of a python sink (webhook sinks only)",
        ),
        (_sink("    threads: 2\n"), 5, "sinks.orders.threads: not an option of a webhook sink (python sinks only)"),
        (_sink("    function: m:f\n"), 5, "sinks.orders.function: not an option of a webhook sink (python sinks only)"),
        (
            _sink("    retry:\n      max_retry_after: 1m\n", sink_type="python"),
            6,
            "sinks.orders.retry.max_retry_after: not an option of a python sink (webhook sinks only)",
        ),
        (_sink("    on_4xx: retry\n", sink_type="python"), 5,
         "sinks.orders.on_4xx: not an option of a python sink (webhook sinks only)"),
        # missing required options name the sink's line
        ("sinks:\n  orders:\n    url: http://x/\n", 2, "sinks.orders.type: missing; every sink needs one "
         "(one of webhook, python)"),
        ("log:\n  level: info\nsinks:\n  orders:\n    type: webhook\n    batch: 2\n", 4,
         f"sinks.orders.url: missing; a webhook sink needs one ({URL_EXPECTED})"),
        ("sinks:\n  audit:\n    type: python\n", 2,
         "sinks.audit.function: missing; a python sink needs one (module:function, as mypackage.hooks:handle)"),
        ("sinks:\n  audit: {}\n", 2, "sinks.audit.type: missing; every sink needs one (one of webhook, python)"),
        # the type itself
        ("sinks:\n  a:\n    type: pyton\n", 3, "sinks.a.type: expected one of webhook, python; got 'pyton'"),
        ("sinks:\n  a:\n    type:\n", 3, "sinks.a.type: expected one of webhook, python; got null"),
        ("sinks:\n  a:\n    type: [python]\n", 3, "sinks.a.type: expected one of webhook, python, got a list"),
        # names
        ("sinks:\n  bad name:\n    type: python\n", 2,
         "sinks.bad name: bad sink name 'bad name': expected 1 to 64 letters, digits, '_', '.' or '-'"),
        ("sinks:\n  '':\n    type: python\n", 2,
         "sinks.: bad sink name '': expected 1 to 64 letters, digits, '_', '.' or '-'"),
        ("sinks:\n  " + "x" * 65 + ":\n    type: python\n", 2,
         f"sinks.{'x' * 65}: bad sink name '{'x' * 65}': expected 1 to 64 letters, digits, '_', '.' or '-'"),
        ("sinks:\n  caf\u00e9:\n    type: python\n", 2,
         "sinks.caf\u00e9: bad sink name 'caf\u00e9': expected 1 to 64 letters, digits, '_', '.' or '-'"),
        ("sinks:\n  [a]: {type: python}\n", 2, "sinks: expected a sink name, got a list"),
        # duplicates
        (
            "sinks:\n  orders:\n    type: python\n    function: m:f\n  audit:\n    type: python\n"
            "    function: m:g\n  orders:\n    type: python\n",
            8,
            "sinks.orders: duplicate sink name (first set on line 2)",
        ),
        (_sink("    batch: 2\n    batch: 3\n"), 6, "sinks.orders.batch: duplicate key (first set on line 5)"),
        (_sink("    type: python\n"), 5, "sinks.orders.type: duplicate key (first set on line 3)"),
        (
            _sink("    retry:\n      base: 1s\n      base: 2s\n"),
            7,
            "sinks.orders.retry.base: duplicate key (first set on line 6)",
        ),
        # shapes
        ("sinks:\n  - orders\n", 1, "sinks: expected a mapping of sink names to sinks, got a list"),
        ("sinks: orders\n", 1, "sinks: expected a mapping of sink names to sinks, got 'orders'"),
        ("sinks:\n  orders:\n", 2,
         "sinks.orders: expected a mapping of sink options (type: webhook, python, ...), got null"),
        ("sinks:\n  orders: webhook\n", 2,
         "sinks.orders: expected a mapping of sink options (type: webhook, python, ...), got 'webhook'"),
        (_sink("    retry: 5\n"), 5,
         "sinks.orders.retry: expected a mapping of options (base, factor, cap, max_attempts, max_retry_after), "
         "got '5'"),
        (_sink("    retry.base: 2s\n"), 5,
         "sinks.orders.retry.base: dotted keys are not accepted in the file; nest each section"),
        # values
        (_sink("    retry:\n      factor: 0.5\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got '0.5'"),
        (_sink("    retry:\n      factor: 1\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got '1'"),
        (_sink("    retry:\n      factor: 10.5\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got '10.5'"),
        (_sink("    retry:\n      factor: .inf\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got '.inf'"),
        (_sink("    retry:\n      factor: nan\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got 'nan'"),
        (_sink("    retry:\n      factor: 2e0\n"), 6,
         "sinks.orders.retry.factor: expected a number above 1 and at most 10, got '2e0'"),
        (_sink("    retry:\n      max_attempts: 0\n"), 6,
         "sinks.orders.retry.max_attempts: expected an integer 1..1000, got 0"),
        (_sink("    retry:\n      max_attempts: 1001\n"), 6,
         "sinks.orders.retry.max_attempts: expected an integer 1..1000, got 1001"),
        (_sink("    retry:\n      base: 0\n"), 6,
         "sinks.orders.retry.base: expected a duration (a number with a unit ms, s, m, h or d; "
         "a plain number is seconds) greater than 0, got '0'"),
        (_sink("    retry:\n      cap: 500ms\n"), 6, "sinks.orders.retry.cap: must be at least retry.base (0.5s < 1s)"),
        (_sink("    retry:\n      base: 10m\n"), 6, "sinks.orders.retry.cap: must be at least retry.base (5m < 10m)"),
        (_sink("    connections: 0\n"), 5, "sinks.orders.connections: expected an integer 1..256, got 0"),
        (_sink("    connections: 257\n"), 5, "sinks.orders.connections: expected an integer 1..256, got 257"),
        (_sink("    batch: 10001\n"), 5, "sinks.orders.batch: expected an integer 1..10000, got 10001"),
        (_sink("    concurrency: 1025\n"), 5, "sinks.orders.concurrency: expected an integer 1..1024, got 1025"),
        (_sink("    threads: 65\n", sink_type="python"), 5,
         "sinks.orders.threads: expected an integer 1..64, got 65"),
        (_sink("    ordering: fifo\n"), 5, "sinks.orders.ordering: expected one of strict, none; got 'fifo'"),
        (_sink("    on_4xx: drop\n"), 5, "sinks.orders.on_4xx: expected one of dead, retry; got 'drop'"),
        (_sink("    connect_timeout: 0s\n"), 5,
         "sinks.orders.connect_timeout: expected a duration (a number with a unit ms, s, m, h or d; "
         "a plain number is seconds) greater than 0, got '0s'"),
        # URLs: http:// only, and what Target.parse accepts
        (_sink("", url="https://127.0.0.1/hook"), 4,
         f"sinks.orders.url: expected {URL_EXPECTED}, got 'https://127.0.0.1/hook' "
         "(https:// is not supported yet (pushcore has no TLS client); use http://)"),
        (_sink("", url="ftp://x/"), 4,
         f"sinks.orders.url: expected {URL_EXPECTED}, got 'ftp://x/' (scheme 'ftp' is not supported; use http://)"),
        (_sink("", url="127.0.0.1:8080/hook"), 4,
         f"sinks.orders.url: expected {URL_EXPECTED}, got '127.0.0.1:8080/hook' (expected http://host[:port]/path)"),
        (_sink("", url="http://x:99999/"), 4,
         f"sinks.orders.url: expected {URL_EXPECTED}, got 'http://x:99999/' (port '99999' is not a number 1..65535)"),
        (_sink("", url="''"), 4, f"sinks.orders.url: expected {URL_EXPECTED}, got ''"),
        (_sink("", url=""), 4, f"sinks.orders.url: expected {URL_EXPECTED}, got null"),
        # extra headers: their own line, the rule they break
        ('sinks:\n  a:\n    type: webhook\n    url: http://h/\n    headers:\n'
         '      - "X-Ok: 1"\n      - "Host: evil"\n', 7,
         "sinks.a.headers: item 2: expected a header field 'Name: value', got 'Host: evil' "
         "(extra header 'Host' is set by pushcore and may not be configured)"),
        ('sinks:\n  a:\n    type: webhook\n    url: http://h/\n    headers: ["no colon"]\n', 5,
         "sinks.a.headers: item 1: expected a header field 'Name: value', got 'no colon'"),
        ('sinks:\n  a:\n    type: webhook\n    url: http://h/\n    headers: "X-A: 1"\n', 5,
         "sinks.a.headers: expected a list of header fields 'Name: value' ([] for none), "
         "got 'X-A: 1'"),
        ('sinks:\n  a:\n    type: python\n    function: m:f\n    headers: []\n', 5,
         "sinks.a.headers: not an option of a python sink (webhook sinks only)"),
        # functions
        ("sinks:\n  a:\n    type: python\n    function: mypackage.hooks\n", 4,
         "sinks.a.function: expected module:function, as mypackage.hooks:handle, got 'mypackage.hooks'"),
        ("sinks:\n  a:\n    type: python\n    function: 'm:f:g'\n", 4,
         "sinks.a.function: expected module:function, as mypackage.hooks:handle, got 'm:f:g'"),
        ("sinks:\n  a:\n    type: python\n    function: '1m:f'\n", 4,
         "sinks.a.function: expected module:function, as mypackage.hooks:handle, got '1m:f'"),
        ("sinks:\n  a:\n    type: python\n    function: 'm:'\n", 4,
         "sinks.a.function: expected module:function, as mypackage.hooks:handle, got 'm:'"),
        ("sinks:\n  a:\n    type: python\n    function: 'a..b:f'\n", 4,
         "sinks.a.function: expected module:function, as mypackage.hooks:handle, got 'a..b:f'"),
    ],
)
def test_sink_errors(write, text, line, message):
    path = write(text)
    err = load_error(path)
    assert str(err) == f"{path}:{line}: {message}"
    assert (err.line, err.source) == (line, str(path))
    assert err.key == message.split(": ", 1)[0]


def test_bad_secret_is_not_shown(write):
    path = write(_sink("    secret: whsec_not*base64\n"))
    err = load_error(path)
    assert str(err) == (
        f"{path}:5: sinks.orders.secret: expected a signing secret (whsec_ and base64, or any other non-empty text) "
        "or null, got a whsec_ secret whose key is empty or not base64 (the value is not shown)"
    )
    assert "not*base64" not in str(err)
    assert "whsec_" in str(load_error(write(_sink("    secret: whsec_\n"))))


@pytest.mark.parametrize(
    "value, secret",
    [
        ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ("plain text key", "plain text key"),
        ("on", "on"),
        ("null", None),
        ("'null'", "null"),
    ],
)
def test_secret_values(write, value, secret):
    assert load_config(write(_sink(f"    secret: {value}\n"))).sinks["orders"].secret == secret


@pytest.mark.parametrize("value", ["m:f", "pkg.mod:handle", "pkg.mod:Class.method", "_p:_f", " m:f "])
def test_python_function_values(write, value):
    cfg = load_config(write(f"sinks:\n  a:\n    type: python\n    function: '{value}'\n"))
    assert cfg.sinks["a"].function == value.strip()


@pytest.mark.parametrize(
    "url, target",
    [
        ("http://127.0.0.1:8080/hook", Target("127.0.0.1", 8080, "/hook")),
        ("http://Hooks.Example", Target("hooks.example", 80, "/")),
        ("http://[::1]:9000/in?x=1", Target("::1", 9000, "/in?x=1")),
    ],
)
def test_url_values(write, url, target):
    assert load_config(write(_sink("", url=url))).sinks["orders"].url == target


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("routes:\n  - filter: orders/#\n    sink: ordrs\n", 3,
         "routes[1].sink: no sink named 'ordrs' (no sinks are configured)"),
        (
            "sinks:\n  orders: {type: python, function: m:f}\n  audit: {type: python, function: m:g}\n"
            "routes:\n  - {filter: a/#, sink: audit}\n  - filter: orders/#\n    sink: ordrs\n",
            7,
            "routes[2].sink: no sink named 'ordrs' (sinks: orders, audit); did you mean orders?",
        ),
        (
            "sinks:\n  orders: {type: python, function: m:f}\nroutes:\n  - {filter: a/#, sink: zzz}\n",
            4,
            "routes[1].sink: no sink named 'zzz' (sinks: orders)",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a/#/b\n    sink: s\n",
            4,
            f"routes[1].filter: expected {ROUTE_FILTER_EXPECTED}, got 'a/#/b' "
            "('#' must be the last level of topic filter 'a/#/b')",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a+\n    sink: s\n",
            4,
            f"routes[1].filter: expected {ROUTE_FILTER_EXPECTED}, got 'a+' "
            "('+' must be a whole level in topic filter 'a+')",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: #\n    sink: s\n",
            4,
            f"routes[1].filter: expected {ROUTE_FILTER_EXPECTED}, got null "
            "(in YAML an unquoted # starts a comment: write '#')",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: $share/g/a/#\n    sink: s\n",
            4,
            f"routes[1].filter: expected {ROUTE_FILTER_EXPECTED}, got '$share/g/a/#' "
            "(a route matches topics; write the filter without $share/g/: 'a/#')",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: [a, b]\n    sink: s\n",
            4,
            f"routes[1].filter: expected {ROUTE_FILTER_EXPECTED}, got a list",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a\n    sink: ''\n",
            5,
            "routes[1].sink: expected a non-empty string, got ''",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a\n",
            4,
            "routes[1].sink: missing; every route needs a filter and a sink",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - {filter: a, sink: s}\n  - sink: s\n",
            5,
            "routes[2].filter: missing; every route needs a filter and a sink",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a\n    snk: s\n",
            5,
            "routes[1].snk: unknown key of a route (filter, sink); did you mean routes[1].sink?",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - filter: a\n    sink: s\n    filter: b\n",
            6,
            "routes[1].filter: duplicate key (first set on line 4)",
        ),
        (
            "sinks:\n  s: {type: python, function: m:f}\nroutes:\n  - {filter: a/#, sink: s}\n"
            "  - {filter: b, sink: s}\n  - {filter: a/#, sink: s}\n",
            6,
            "routes[3]: the same route as routes[1]",
        ),
        ("routes:\n  - a/# -> s\n", 2, "routes[1]: expected a mapping with filter and sink, got 'a/# -> s'"),
        ("routes:\n  orders/#: orders\n", 1,
         "routes: expected a list of routes (each a mapping with filter and sink), got a mapping"),
    ],
)
def test_route_errors(write, text, line, message):
    path = write(text)
    err = load_error(path)
    assert str(err) == f"{path}:{line}: {message}"
    assert err.key == message.split(": ", 1)[0]


def test_route_errors_come_after_sink_errors(write):
    # Routes are read once every sink is known, so a bad sink is reported
    # even when a route that names it comes first.
    path = write("routes:\n  - {filter: a, sink: s}\nsinks:\n  s:\n    type: webhook\n")
    assert str(load_error(path)) == f"{path}:4: sinks.s.url: missing; a webhook sink needs one ({URL_EXPECTED})"


@pytest.mark.parametrize(
    "key",
    ["sinks.orders.url", "sinks", "routes", "routes[1].sink"],
)
def test_sinks_and_routes_cannot_be_overridden(key):
    err = load_error(None, {key: "x"})
    assert str(err) == f"{key}: sinks and routes are set in the configuration file only"


def test_top_level_typo_suggests_sinks(write):
    path = write("sink:\n  a: {type: python, function: m:f}\n")
    assert str(load_error(path)) == f"{path}:1: sink: unknown option; did you mean sinks?"
    path = write("route:\n  - {filter: a, sink: s}\n")
    assert str(load_error(path)) == f"{path}:1: route: unknown option; did you mean routes?"


@settings(max_examples=200, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
def test_any_valid_sink_name_loads(tmp_path_factory, name):
    path = tmp_path_factory.mktemp("names") / "conf.yaml"
    path.write_text(
        f"sinks:\n  '{name}':\n    type: python\n    function: m:f\nroutes:\n  - {{filter: a, sink: '{name}'}}\n"
    )
    cfg = load_config(path)
    assert list(cfg.sinks) == [name]
    assert cfg.sinks[name].name == name
    assert cfg.routes == (Route("a", name),)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=70).filter(lambda s: not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s)))
def test_any_other_sink_name_is_refused(tmp_path_factory, name):
    path = tmp_path_factory.mktemp("names") / "conf.yaml"
    path.write_text(yaml.safe_dump({"sinks": {name: {"type": "python", "function": "m:f"}}}))
    err = load_error(path)
    assert str(err).endswith(": bad sink name " + repr(name) + ": expected 1 to 64 letters, digits, '_', '.' or '-'")


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1, max_value=10, exclude_min=True))
def test_number_round_trips_and_keeps_bounds(number):
    kind = Number(above=1, at_most=10)
    assert kind.parse(kind.format(number)) == number
    assert kind.parse(number) == number


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-100, 100)))
def test_number_refuses_everything_out_of_bounds(number):
    kind = Number(above=1, at_most=10)
    if isinstance(number, float) and number != number:
        inside = False
    else:
        inside = 1 < number <= 10
    if inside:
        assert kind.parse(number) == float(number)
    else:
        with pytest.raises(ValueError, match="expected a number above 1 and at most 10"):
            kind.parse(number)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_python_function_accepts_only_module_colon_function(text):
    module, colon, function = text.strip().partition(":")
    valid = bool(colon) and all(part.isidentifier() for part in [*module.split("."), *function.split(".")])
    kind = PythonFunction()
    if valid:
        assert kind.parse(text) == text.strip()
    else:
        with pytest.raises(ValueError):
            kind.parse(text)


# --- every option the code reads is documented ------------------------------
#
# conf/pushcore.yaml shows each option as an active line (`  data_dir: ./data`)
# or commented out (`  #partitions: 8`), under its section, after a comment
# paragraph.  Prose comments have a space after '#'; a commented-out option
# or list item (`  #- {filter: a/#, sink: a}`) does not, which is what tells
# the two apart.  Sinks and routes are documented by a commented-out
# example, whose options are checked against SINK_OPTIONS.

COMMENTED_OPTION = re.compile(r"^(\s*)#([A-Za-z_][A-Za-z0-9_]*:(?:\s.*)?|- .*)$")
DELIVERY_SECTIONS = ("sinks", "routes")
BANNER = re.compile(r"^# ===== .+ =====$")


def _uncomment(text):
    """The file with every commented-out option made active, and their line numbers (1-based)."""
    lines = []
    commented = set()
    for number, line in enumerate(text.splitlines(), 1):
        match = COMMENTED_OPTION.match(line)
        if match:
            commented.add(number)
            line = match.group(1) + match.group(2)
        lines.append(line)
    return "\n".join(lines) + "\n", commented


def _option_lines(text):
    """{dotted key: 1-based line} for every leaf of the YAML mapping tree in ``text``."""
    found = {}

    def walk(node, prefix):
        assert isinstance(node, yaml.MappingNode), f"line {node.start_mark.line + 1}: expected a section"
        for key_node, value_node in node.value:
            key = prefix + key_node.value
            assert key not in found, f"{key} appears twice"
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, key + ".")
            else:
                found[key] = key_node.start_mark.line + 1

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        root.value = [(k, v) for k, v in root.value if k.value not in DELIVERY_SECTIONS]
        walk(root, "")
    return found


def _active_keys(text):
    """Options set by active lines; a section whose options are all commented
    out reads as an empty leaf and is not an option."""
    sections = {key.rsplit(".", 1)[0] for key in OPTIONS} | {key.split(".", 1)[0] for key in OPTIONS}
    leaves = set(_option_lines(text))
    assert leaves - set(OPTIONS) <= sections
    return leaves & set(OPTIONS)


def _paragraph_above(lines, number):
    """The comment lines directly above 1-based line ``number``, top to bottom."""
    paragraph = []
    index = number - 2
    while index >= 0 and lines[index].lstrip().startswith("# "):
        paragraph.insert(0, lines[index].strip()[2:])
        index -= 1
    return paragraph


def test_every_option_is_documented_and_every_documented_option_exists():
    text = CONF.read_text()
    uncommented, _ = _uncomment(text)
    documented = _option_lines(uncommented)
    assert sorted(documented) == sorted(OPTIONS), (
        f"undocumented: {sorted(set(OPTIONS) - set(documented))}; "
        f"not in OPTIONS: {sorted(set(documented) - set(OPTIONS))}"
    )


def test_each_option_has_a_paragraph_stating_its_default():
    lines = CONF.read_text().splitlines()
    uncommented, _ = _uncomment(CONF.read_text())
    for key, number in _option_lines(uncommented).items():
        paragraph = _paragraph_above(lines, number)
        assert len(paragraph) >= 2, f"{key} (line {number}) has no comment paragraph above it"
        stated = [p[len("Default: "):] for p in paragraph if p.startswith("Default: ")]
        assert len(stated) == 1, f"{key} (line {number}): paragraph does not state 'Default: ...'"
        option = OPTIONS[key]
        default_text = None if stated[0] == "null" else stated[0]
        assert option.kind.parse(default_text) == option.default, f"{key}: documented default {stated[0]} is wrong"


def test_commented_out_options_show_their_default(tmp_path):
    uncommented, commented = _uncomment(CONF.read_text())
    # The fully uncommented file is itself a valid configuration (no typos,
    # no duplicates, every value allowed) ...
    path = tmp_path / "uncommented.yaml"
    path.write_text(uncommented)
    cfg = load_config(path)
    # ... and every commented-out line shows the default value.
    for key, number in _option_lines(uncommented).items():
        if number in commented:
            assert cfg.get(key) == OPTIONS[key].default, f"{key} (line {number}) does not show its default"


def test_sections_have_banners():
    lines = CONF.read_text().splitlines()
    previous = 0
    for number, line in enumerate(lines, 1):
        if re.match(r"^[a-z_]+:", line):
            banners = [n for n in range(previous, number - 1) if BANNER.match(lines[n])]
            assert banners, f"section {line!r} (line {number}) has no '# ===== Name =====' banner above it"
            previous = number


# --- sinks and routes are documented by a commented-out example ---------------

# The first sentence of a sink option's paragraph says which sinks take it.
SINK_SCOPES = {("webhook",): "Webhook sinks.", ("python",): "Python sinks.", ("webhook", "python"): "Both kinds."}


def _sink_option_lines(text):
    """``[(sink name, sink type, relative key, 1-based line)]`` for every option
    of every sink in ``text``, in file order."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sinks = next(v for k, v in root.value if k.value == "sinks")
    found = []

    def walk(node, name, sink_type, prefix):
        for key_node, value_node in node.value:
            key = prefix + key_node.value
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, name, sink_type, key + ".")
            else:
                found.append((name, sink_type, key, key_node.start_mark.line + 1))

    for name_node, sink_node in sinks.value:
        sink_type = next(v.value for k, v in sink_node.value if k.value == "type")
        walk(sink_node, name_node.value, sink_type, "")
    return found


def test_every_sink_option_is_documented_and_every_documented_one_exists():
    uncommented, _ = _uncomment(CONF.read_text())
    documented = {key for _, _, key, _ in _sink_option_lines(uncommented)}
    assert sorted(documented) == sorted(SINK_OPTIONS), (
        f"undocumented: {sorted(set(SINK_OPTIONS) - documented)}; "
        f"not in SINK_OPTIONS: {sorted(documented - set(SINK_OPTIONS))}"
    )


def test_the_delivery_example_is_commented_out_and_valid(tmp_path):
    text = CONF.read_text()
    assert "\n# ===== Delivery: sinks and routes =====\n" in text
    assert "\n#sinks:\n" in text and "\n#routes:\n" in text
    uncommented, commented = _uncomment(text)
    path = tmp_path / "uncommented.yaml"
    path.write_text(uncommented)
    cfg = load_config(path)
    # Both kinds of sink are shown, each routed to.
    assert {sink.type for sink in cfg.sinks.values()} == {"webhook", "python"}
    assert {route.sink for route in cfg.routes} == set(cfg.sinks)
    for name, _, key, number in _sink_option_lines(uncommented):
        assert number in commented, f"sinks.{name}.{key} (line {number}) is not commented out"


def test_each_sink_option_has_a_paragraph_stating_its_default_and_scope(tmp_path):
    lines = CONF.read_text().splitlines()
    uncommented, _ = _uncomment(CONF.read_text())
    path = tmp_path / "uncommented.yaml"
    path.write_text(uncommented)
    cfg = load_config(path)
    described = set()
    for name, sink_type, key, number in _sink_option_lines(uncommented):
        option = SINK_OPTIONS[key]
        # The documented value is what a loaded sink holds; for an optional
        # option, that is its default.
        if not option.required:
            assert cfg.sinks[name].get(key) == option.default, f"sinks.{name}.{key} (line {number}) is not the default"
        paragraph = _paragraph_above(lines, number)
        if key in described:
            # Repeated in a second example sink (its type): described above.
            assert not paragraph, f"sinks.{name}.{key} (line {number}) is described twice"
            continue
        described.add(key)
        assert len(paragraph) >= 2, f"sinks.{name}.{key} (line {number}) has no comment paragraph above it"
        text = " ".join(paragraph)
        if key != "type":
            assert text.startswith(SINK_SCOPES[option.types]), f"{key}: paragraph does not start with its scope"
        stated = [p[len("Default: "):] for p in paragraph if p.startswith("Default: ")]
        if option.required:
            assert not stated and text.endswith("Required."), f"{key}: a required option ends with 'Required.'"
        else:
            assert len(stated) == 1, f"{key} (line {number}): paragraph does not state 'Default: ...'"
            default_text = None if stated[0] == "null" else stated[0]
            assert option.kind.parse(default_text) == option.default, f"{key}: documented default is wrong"


def test_routes_are_documented():
    lines = CONF.read_text().splitlines()
    start = lines.index("#routes:")
    first_route = next(i for i in range(start, len(lines)) if lines[i].startswith("  #- "))
    paragraph = " ".join(_paragraph_above(lines, first_route + 1))
    for words in ("topic filter", "sink", "$share", "twice"):
        assert words in paragraph
    assert len(paragraph) > 200
