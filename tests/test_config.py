"""Tests for pushcore.config and the documentation in conf/pushcore.yaml."""

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore.config import OPTIONS, Config, Duration, List, Size, TopicFilter, check_config, load_config
from pushcore.errors import ConfigError

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
        f"{path}:1: (top level): expected a mapping of options (storage, dedup, ordering, mqtt, sessions, log), "
        "got 'hello'"
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


# --- every option the code reads is documented ------------------------------
#
# conf/pushcore.yaml shows each option as an active line (`  data_dir: ./data`)
# or commented out (`  #partitions: 8`), under its section, after a comment
# paragraph.  Prose comments have a space after '#'; a commented-out option
# does not, which is what tells the two apart.

COMMENTED_OPTION = re.compile(r"^(\s*)#([A-Za-z_][A-Za-z0-9_]*:(?:\s.*)?)$")
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
