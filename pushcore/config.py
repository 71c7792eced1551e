"""pushcore configuration: one YAML file, one schema table, exact errors.

The schema is the single table :data:`OPTIONS` (dotted key -> :class:`Option`).
``conf/pushcore.yaml`` documents every option in it, mosquitto.conf-style, and
``tests/test_config.py`` checks that the two agree, so the code can only read
options an operator can find documented.

::

    cfg = load_config("conf/pushcore.yaml", {"mqtt.bind": "127.0.0.1:1884"})
    cfg.storage.durability          # 'fsync'
    cfg.mqtt.bind                   # ('127.0.0.1', 1884)
    cfg.get("storage.retention.max_age")   # 604800.0 (seconds)

The file is walked as a YAML node tree (``yaml.compose`` with the safe loader)
rather than loaded into dicts, because only the nodes keep their marks: every
error names the dotted key, the 1-based line and what is allowed, e.g.
``conf.yaml:9: storage.partitions: expected an integer 1..1024, got 'many'``.

Scalars are converted from their source text by the option's own type, not by
YAML's implicit typing, so YAML 1.1 surprises (``1:30`` read as 5400, ``on``
read as true for a string option) cannot reach the server.  A value typed in
the file and the same value given as a command-line string therefore convert
identically.  A list option is the one place a YAML sequence is accepted;
each item is converted the same way and an error names the item's line.
"""

import decimal
import difflib
import ipaddress
import math
import re

import yaml

from pushcore.errors import ConfigError, TopicFilterInvalid
from pushcore.topics import validate_filter

__all__ = [
    "OPTIONS",
    "Option",
    "Config",
    "load_config",
    "check_config",
    "Integer",
    "Boolean",
    "String",
    "Choice",
    "Size",
    "Duration",
    "Address",
    "TopicFilter",
    "List",
]


# --- value types -----------------------------------------------------------
#
# Each type turns a value -- the source text of a YAML scalar, a command-line
# string, or an already typed Python value from an override -- into the typed
# value the server reads, or raises ValueError whose message is the complete
# "expected ..., got ..." text.  ``expected`` alone is used when the YAML node
# is not a scalar at all.


def _got(value):
    if value is None:
        return "null"
    return repr(value)


def _format_size(n):
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def _format_duration(seconds):
    if seconds == 0:
        return "0"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    # Decimal of the float's repr: the shortest exact text, never an exponent
    # (which the duration syntax does not accept).
    return f"{decimal.Decimal(repr(float(seconds))):f}s"


class Integer:
    def __init__(self, low, high):
        self.low = low
        self.high = high
        self.expected = f"an integer {low}..{high}"

    def parse(self, value):
        # bool is a subclass of int; true must not pass as 1.
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"expected {self.expected}, got {_got(value)}") from None
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        if not self.low <= number <= self.high:
            raise ValueError(f"expected {self.expected}, got {number}")
        return number

    def format(self, value):
        return str(value)


class Boolean:
    expected = "true or false"
    _WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}

    def parse(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in self._WORDS:
            return self._WORDS[value.strip().lower()]
        raise ValueError(f"expected {self.expected}, got {_got(value)}")

    def format(self, value):
        return "true" if value else "false"


class String:
    """A string; with ``optional=True`` null is allowed and means "off"."""

    def __init__(self, optional=False):
        self.optional = optional
        self.expected = "a non-empty string or null" if optional else "a non-empty string"

    def parse(self, value):
        if value is None and self.optional:
            return None
        # An empty data directory or property name is always a mistake.
        if isinstance(value, str) and value:
            return value
        raise ValueError(f"expected {self.expected}, got {_got(value)}")

    def format(self, value):
        return "null" if value is None else value


class Choice:
    def __init__(self, *choices):
        self.choices = choices
        self.expected = "one of " + ", ".join(choices)

    def parse(self, value):
        if isinstance(value, str) and value.strip() in self.choices:
            return value.strip()
        raise ValueError(f"expected {self.expected}; got {_got(value)}")

    def format(self, value):
        return value


class Size:
    """A byte count: a plain integer is bytes, or a number with a unit."""

    UNITS = {
        "B": 1,
        "KiB": 1 << 10,
        "MiB": 1 << 20,
        "GiB": 1 << 30,
        "TiB": 1 << 40,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
    }
    _PATTERN = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")

    def __init__(self, low=0, high=None):
        self.low = low
        self.high = high
        if high is not None:
            bounds = f" {_format_size(low)}..{_format_size(high)}"
        elif low:
            bounds = f" of at least {_format_size(low)}"
        else:
            bounds = ""
        self.expected = f"a size{bounds} (bytes, or a number with a unit: {', '.join(self.UNITS)})"

    def parse(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            number = self._parse_text(value)
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        if number < self.low or (self.high is not None and number > self.high):
            raise ValueError(f"expected {self.expected}, got {_format_size(number)} ({number} bytes)")
        return number

    def _parse_text(self, text):
        match = self._PATTERN.fullmatch(text.strip())
        if match is None or (match.group(2) and match.group(2) not in self.UNITS):
            raise ValueError(f"expected {self.expected}, got {_got(text)}")
        digits, unit = match.groups()
        factor = self.UNITS[unit or "B"]
        whole, _, fraction = digits.partition(".")
        # Exact integer arithmetic: "1.5GiB" is 1610612736 bytes, not a float
        # rounded to it; a fraction of a byte is an error, not a truncation.
        scale = 10 ** len(fraction)
        numerator = int(whole + fraction) * factor
        if numerator % scale:
            raise ValueError(f"expected {self.expected}, got {_got(text)} (not a whole number of bytes)")
        return numerator // scale

    def format(self, value):
        return _format_size(value)


class Duration:
    """A time span, stored as float seconds; a plain number is seconds."""

    UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    _PATTERN = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)")

    def __init__(self, allow_zero=False):
        self.allow_zero = allow_zero
        self.expected = (
            "a duration (a number with a unit ms, s, m, h or d; a plain number is seconds)"
            + ("" if allow_zero else " greater than 0")
        )

    def parse(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number, factor = value, 1
        elif isinstance(value, str):
            match = self._PATTERN.fullmatch(value.strip())
            if match is None or (match.group(2) and match.group(2) not in self.UNITS):
                raise ValueError(f"expected {self.expected}, got {_got(value)}")
            number, factor = match.group(1), self.UNITS[match.group(2) or "s"]
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        try:
            seconds = float(number) * factor
        except OverflowError:
            seconds = math.inf
        # Infinity (a 400-digit number, or inf itself) would overflow the
        # millisecond timestamps it is added to; NaN compares false to all.
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not self.allow_zero):
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        return seconds

    def format(self, value):
        return _format_duration(value)


class Address:
    """A listening address ``host:port`` -> ``(host, port)``.

    ``[::1]:1883`` for IPv6, ``:1883`` for all interfaces (host ``""``, as
    ``socket.bind`` takes it).  Port 0 asks the kernel for a free port, which
    the end-to-end tests use.
    """

    expected = "host:port, [ipv6]:port or :port (all interfaces), port 0..65535"
    _HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

    def parse(self, value):
        if isinstance(value, tuple) and len(value) == 2:
            host, port = value
            if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
                raise ValueError(f"expected {self.expected}, got {_got(value)}")
            text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        elif isinstance(value, str):
            text = value.strip()
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit() or not port_text.isascii():
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"expected {self.expected}, got port {port}")
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise ValueError(f"expected {self.expected}, got {_got(value)} (bad IPv6 address)") from None
            return (host[1:-1], port)
        if ":" in host:
            raise ValueError(f"expected {self.expected}, got {_got(value)} (put an IPv6 address in brackets)")
        if host and not self._valid_host(host):
            raise ValueError(f"expected {self.expected}, got {_got(value)} (bad host)")
        return (host, port)

    def _valid_host(self, host):
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return False
            return True
        return self._HOSTNAME.fullmatch(host) is not None

    def format(self, value):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TopicFilter:
    """An MQTT topic filter, taken exactly as written (no stripping)."""

    expected = (
        "a topic filter ('+' and '#' only as whole levels, '#' only as the last; "
        "$share/{ShareName}/{filter} for a shared subscription)"
    )
    plural = "topic filters"
    # The usual way an item ends up null: YAML reads an unquoted '#' after a
    # space ("- #", "[a, #]") as the start of a comment.
    null_hint = " (in YAML an unquoted # starts a comment: write '#')"

    def parse(self, value):
        if value is None:
            raise ValueError(f"expected {self.expected}, got null{self.null_hint}")
        if not isinstance(value, str):
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        try:
            validate_filter(value)
        except TopicFilterInvalid as exc:
            raise ValueError(f"expected {self.expected}, got {_got(value)} ({exc})") from None
        return value

    def format(self, value):
        return value


class List:
    """A list of ``item`` values, stored as a tuple so the config stays immutable.

    In the file it is a YAML sequence, block or flow style, and nothing else:
    ``_FileReader`` parses each item with ``item`` and blames the item's own
    line.  As an override it is a Python list or tuple, or a string of items
    separated by commas, optionally in brackets (``"a/#, b"``, ``"[a/#, b]"``;
    ``""`` and ``"[]"`` are the empty list), so a flow list copied from the
    file works too as long as it has no quoted items: quotes are not special
    here and stay part of the item.  The string form strips spaces around
    items and cannot express an item containing a comma; the file can.
    """

    def __init__(self, item):
        self.item = item
        self.expected = f"a list of {item.plural} ([] for none)"

    def parse(self, value):
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [part.strip() for part in text.split(",")] if text.strip() else []
        elif isinstance(value, (list, tuple)):
            items = value
        elif value is None:
            # A list key with every item commented out, or "key: #".
            raise ValueError(f"expected {self.expected}, got null{self.item.null_hint}")
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        return tuple(self.parse_item(index, item) for index, item in enumerate(items, 1))

    def parse_item(self, index, value):
        """``item.parse(value)``, its error naming the 1-based ``index``."""
        try:
            return self.item.parse(value)
        except ValueError as exc:
            raise ValueError(f"item {index}: {exc}") from None

    def format(self, value):
        return "[" + ", ".join(self.item.format(item) for item in value) + "]"


class Option:
    """One schema entry.  ``default`` is written as an operator would write it
    and parsed by ``kind`` at import, so a bad default fails at once."""

    __slots__ = ("kind", "default")

    def __init__(self, kind, default):
        self.kind = kind
        self.default = kind.parse(default)

    def __repr__(self):
        return f"Option({type(self.kind).__name__}, {self.kind.format(self.default)!r})"


# --- the schema ------------------------------------------------------------
#
# Every option the server may read, and nothing else.  Each one is documented
# in conf/pushcore.yaml (tests/test_config.py enforces it).

# MQTT 5.0 §1.5.5 / §2.1.4: Remaining Length is at most 268,435,455, plus at
# most 5 bytes of fixed header (1 type byte + 4 length bytes).
_MQTT_MAX_PACKET = 268_435_455 + 5
# MQTT 5.0 §3.1.2.10 (Keep Alive) and §3.2.2.3.3 (Receive Maximum),
# §3.2.2.3.8 (Topic Alias Maximum): Two Byte Integers.
_TWO_BYTE_MAX = 65535

OPTIONS = {
    "storage.data_dir": Option(String(), "./data"),
    "storage.partitions": Option(Integer(1, 1024), 8),
    # LMDB needs room for its meta pages and one page per named database;
    # a budget below 1MiB is a typo, not a configuration.
    "storage.map_size": Option(Size(low=1 << 20), "1GiB"),
    "storage.durability": Option(Choice("fsync", "os"), "fsync"),
    "storage.retention.max_age": Option(Duration(allow_zero=True), "7d"),
    "storage.retention.max_bytes": Option(Size(), 0),
    "storage.retention.check_interval": Option(Duration(), "10s"),
    "storage.batch.max_messages": Option(Integer(1, 1_000_000), 8192),
    "storage.batch.max_bytes": Option(Size(low=1), "16MiB"),
    "dedup.window": Option(Duration(), "24h"),
    "dedup.id_property": Option(String(), "id"),
    "dedup.json_field": Option(String(optional=True), None),
    "dedup.scope": Option(Choice("global", "client"), "global"),
    "ordering.key_property": Option(String(), "key"),
    "mqtt.bind": Option(Address(), "127.0.0.1:1883"),
    "mqtt.max_connections": Option(Integer(1, 1_000_000), 100_000),
    "mqtt.max_packet_size": Option(Size(16, _MQTT_MAX_PACKET), "1MiB"),
    "mqtt.connect_timeout": Option(Duration(), "10s"),
    "mqtt.keepalive_max": Option(Integer(0, _TWO_BYTE_MAX), 0),
    "mqtt.receive_maximum": Option(Integer(1, _TWO_BYTE_MAX), 1024),
    "mqtt.topic_alias_maximum": Option(Integer(0, _TWO_BYTE_MAX), 64),
    "mqtt.max_qos": Option(Integer(0, 2), 2),
    "mqtt.allow_zero_length_clientid": Option(Boolean(), True),
    "mqtt.outbuf_high": Option(Size(low=1), "1MiB"),
    "mqtt.outbuf_low": Option(Size(), "256KiB"),
    "mqtt.buffer_size": Option(Size(4 << 10, 16 << 20), "64KiB"),
    "mqtt.subscribe_deny": Option(List(TopicFilter()), []),
    # MQTT 5.0 §3.1.2.11.3: an MQTT 5 client states its own Receive Maximum,
    # a Two Byte Integer; this is the 3.1.1 stand-in for it.
    "mqtt.max_inflight_out": Option(Integer(1, _TWO_BYTE_MAX), 32),
    "sessions.max_queued_messages": Option(Integer(0, 10_000_000), 1000),
    "sessions.max_queued_bytes": Option(Size(), 0),
    "sessions.queue_full": Option(Choice("refuse", "drop_oldest"), "refuse"),
    "sessions.queue_qos0": Option(Boolean(), False),
    "sessions.max_expiry": Option(Duration(allow_zero=True), 0),
    "log.level": Option(Choice("debug", "info", "warning", "error"), "info"),
    "log.format": Option(Choice("text", "json"), "text"),
}


def _sections(keys):
    """Every dotted prefix that names a section: 'storage', 'storage.retention', ..."""
    prefixes = set()
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefixes.add(".".join(parts[:i]))
    return prefixes


_SECTIONS = _sections(OPTIONS)


def _children(prefix):
    """Names directly under a section (``""`` is the top level), in schema order."""
    start = prefix + "." if prefix else ""
    names = []
    for key in OPTIONS:
        if key.startswith(start):
            name = key[len(start):].split(".", 1)[0]
            if name not in names:
                names.append(name)
    return names


# --- the loaded configuration ----------------------------------------------


class _Section:
    """Read-only attribute view of one section of a :class:`Config`."""

    __slots__ = ("_values", "_prefix")

    def __init__(self, values, prefix):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name):
        key = f"{self._prefix}.{name}" if self._prefix else name
        if key in OPTIONS:
            return self._values[key]
        if key in _SECTIONS:
            return _Section(self._values, key)
        raise AttributeError(f"{key}: not a pushcore option{_hint(key)}")

    def __setattr__(self, name, value):
        raise AttributeError("configuration is read-only; load it again to change it")

    def __dir__(self):
        return _children(self._prefix)

    def __repr__(self):
        start = self._prefix + "." if self._prefix else ""
        inner = ", ".join(f"{k[len(start):]}={v!r}" for k, v in self._values.items() if k.startswith(start))
        return f"<{self._prefix or 'config'}: {inner}>"


class Config(_Section):
    """A loaded, validated configuration.

    ``cfg.storage.durability`` or ``cfg.get("storage.durability")``; an option
    not in :data:`OPTIONS` raises AttributeError / KeyError, so code can only
    read documented options.  ``source`` is the file it came from, or None.
    """

    __slots__ = ("source",)

    def __init__(self, values, source=None):
        super().__init__(dict(values), "")
        object.__setattr__(self, "source", source)

    def get(self, key):
        if key not in OPTIONS:
            raise KeyError(f"{key}: not a pushcore option{_hint(key)}")
        return self._values[key]

    def to_dict(self):
        """All options as ``{dotted key: value}``."""
        return dict(self._values)

    def __eq__(self, other):
        return isinstance(other, Config) and self._values == other._values

    __hash__ = None


# --- loading ----------------------------------------------------------------


def _hint(key):
    matches = difflib.get_close_matches(key, [*OPTIONS, *_SECTIONS], n=1)
    return f"; did you mean {matches[0]}?" if matches else ""


def _line(node):
    return node.start_mark.line + 1


_NULL_TAG = "tag:yaml.org,2002:null"


def _node_kind(node):
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return _got(node.value)


class _FileReader:
    """Walks the composed node tree of one file into ``values`` and ``lines``."""

    def __init__(self, source, values, lines):
        self.source = source
        self.values = values
        self.lines = lines

    def error(self, key, message, line):
        return ConfigError(key, message, line=line, source=self.source)

    def read(self, data):
        # Decoded here, not by yaml, so that a bad byte gets a line number.
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise self.error("invalid YAML", f"not UTF-8 text: {exc.reason} at byte {exc.start}", line) from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = ": ".join(p for p in (exc.context, exc.problem) if p)
            raise self.error("invalid YAML", problem, mark.line + 1 if mark else None) from None
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            raise self.error("invalid YAML", f"character #x{exc.character:04x}: {exc.reason}", line) from None
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG):
            return
        self.section(root, "")

    def section(self, node, prefix, key_line=None):
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
            # A section whose options are all commented out reads as null.
            return
        if not isinstance(node, yaml.MappingNode):
            names = ", ".join(_children(prefix))
            raise self.error(
                prefix or "(top level)",
                f"expected a mapping of options ({names}), got {_node_kind(node)}",
                key_line or _line(node),
            )
        seen = {}
        for key_node, value_node in node.value:
            line = _line(key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(prefix or "(top level)", f"expected an option name, got {_node_kind(key_node)}", line)
            name = key_node.value
            key = f"{prefix}.{name}" if prefix else name
            if name in seen:
                raise self.error(key, f"duplicate key (first set on line {seen[name]})", line)
            seen[name] = line
            if "." in name:
                # One spelling per option, so a duplicate is always visible.
                raise self.error(key, "dotted keys are not accepted in the file; nest each section", line)
            if key in _SECTIONS:
                self.section(value_node, key, line)
            elif key in OPTIONS:
                self.option(key, value_node, line)
            else:
                raise self.error(key, f"unknown option{_hint(key)}", line)

    def option(self, key, node, line):
        kind = OPTIONS[key].kind
        if isinstance(kind, List):
            self.values[key] = self.sequence(key, kind, node, line)
            self.lines[key] = line
            return
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(key, f"expected {kind.expected}, got {_node_kind(node)}", line)
        value = None if node.tag == _NULL_TAG else node.value
        try:
            self.values[key] = kind.parse(value)
        except ValueError as exc:
            raise self.error(key, str(exc), line) from None
        self.lines[key] = line

    def sequence(self, key, kind, node, line):
        # Only a YAML sequence: a scalar would need the comma syntax of the
        # command line, which YAML's own comment and quoting rules make easy
        # to misread ("key: #" is null, not a filter).
        if not isinstance(node, yaml.SequenceNode):
            if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
                got = "null" + kind.item.null_hint
            else:
                got = _node_kind(node)
            raise self.error(key, f"expected {kind.expected}, got {got}", line)
        items = []
        for index, item_node in enumerate(node.value, 1):
            item_line = _line(item_node)
            if not isinstance(item_node, yaml.ScalarNode):
                raise self.error(
                    key, f"item {index}: expected {kind.item.expected}, got {_node_kind(item_node)}", item_line
                )
            value = None if item_node.tag == _NULL_TAG else item_node.value
            try:
                items.append(kind.parse_item(index, value))
            except ValueError as exc:
                raise self.error(key, str(exc), item_line) from None
        return tuple(items)


def _validate(values, lines, source):
    if values["mqtt.outbuf_low"] >= values["mqtt.outbuf_high"]:
        line = lines.get("mqtt.outbuf_low") or lines.get("mqtt.outbuf_high")
        low = _format_size(values["mqtt.outbuf_low"])
        high = _format_size(values["mqtt.outbuf_high"])
        raise ConfigError(
            "mqtt.outbuf_low",
            f"must be less than mqtt.outbuf_high ({low} >= {high})",
            line=line,
            source=source if line is not None else None,
        )


def load_config(path=None, overrides=None):
    """Load the UTF-8 YAML file ``path`` (None: all defaults), then apply ``overrides``.

    ``overrides`` maps dotted keys to values, typed or as strings
    (``{"mqtt.bind": "127.0.0.1:1884", "storage.partitions": "16"}``); they are
    applied after the file, as command-line flags beat the file.  Any problem
    raises :class:`pushcore.errors.ConfigError` naming the key, and for the
    file its path and line.
    """
    values = {key: option.default for key, option in OPTIONS.items()}
    # Line of each option set by the file; options set by an override are
    # removed so a later cross-check does not blame the file for them.
    lines = {}
    source = None if path is None else str(path)
    if path is not None:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError("config file", f"cannot read: {exc.strerror}", source=source) from None
        _FileReader(source, values, lines).read(text)
    for key, value in (overrides or {}).items():
        if key not in OPTIONS:
            raise ConfigError(key, f"unknown option{_hint(key)}")
        try:
            values[key] = OPTIONS[key].kind.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        lines.pop(key, None)
    _validate(values, lines, source)
    return Config(values, source)


def check_config(path):
    """Load and validate ``path`` for ``pushcore check-config``; raises ConfigError."""
    return load_config(path)
