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
identically.  A list option is the one option whose value may be a YAML
sequence; each item is converted the same way and an error names the item's
line.

Delivery is configured by two sections whose keys are not fixed names:
``sinks`` maps a sink name to its options, checked against
:data:`SINK_OPTIONS` (relative key -> :class:`SinkOption`, which also says
which sink types the option applies to), and ``routes`` is a list of
``{filter, sink}`` mappings.  They are set in the file only::

    cfg.sinks["orders"].retry.base      # 1.0, defaults filled in
    cfg.sinks["orders"].url             # Target(host='127.0.0.1', port=8080, target='/hook')
    cfg.routes                          # (Route(filter='orders/#', sink='orders'),)
"""

import decimal
import difflib
import ipaddress
import math
import re
from types import MappingProxyType
from typing import NamedTuple

import yaml

from pushcore.errors import ConfigError, TopicFilterInvalid
from pushcore.topics import SHARE_PREFIX, parse_shared, validate_filter
from pushcore.webhook import Target, check_extra_header, signing_key

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
    "SINK_TYPES",
    "SINK_OPTIONS",
    "REQUIRED",
    "SinkOption",
    "Sink",
    "Route",
    "Number",
    "WebhookURL",
    "WebhookSecret",
    "PythonFunction",
    "RouteFilter",
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


def _format_number(value):
    return str(int(value)) if value.is_integer() else repr(value)


class Number:
    """A decimal number ``above < n <= at_most``, stored as a float.

    Only plain decimal text (``2``, ``1.5``) is accepted: ``float()`` would
    also take ``inf``, ``nan`` and ``1e1``, none of which an operator means.
    """

    _PATTERN = re.compile(r"[0-9]+(?:\.[0-9]+)?")

    def __init__(self, above, at_most):
        self.above = above
        self.at_most = at_most
        self.expected = f"a number above {above} and at most {at_most}"

    def parse(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and self._PATTERN.fullmatch(value.strip()):
            number = float(value.strip())
        else:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        # Written so that NaN (from a typed override) fails the test too.
        if not self.above < number <= self.at_most:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        return number

    def format(self, value):
        return _format_number(value)


class WebhookURL:
    """A webhook endpoint, parsed by :meth:`pushcore.webhook.Target.parse`
    into a ``Target``, so the file accepts exactly the URLs the sink can use."""

    expected = "an http:// URL (http://host[:port][/path][?query])"

    def parse(self, value):
        if isinstance(value, Target):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        text = value.strip()
        try:
            return Target.parse(text)
        except ValueError as exc:
            detail = str(exc).removeprefix(f"webhook URL {text!r}: ")
            raise ValueError(f"expected {self.expected}, got {_got(value)} ({detail})") from None

    def format(self, value):
        return str(value)


class WebhookSecret(String):
    """A Standard Webhooks signing secret, or null for unsigned requests.

    Checked with :func:`pushcore.webhook.signing_key` so that a mangled
    ``whsec_`` secret fails at load rather than on the first delivery.  An
    error never repeats the value: a secret must not reach a terminal or a
    log because it was mistyped.
    """

    def __init__(self):
        super().__init__(optional=True)
        self.expected = "a signing secret (whsec_ and base64, or any other non-empty text) or null"

    def parse(self, value):
        if isinstance(value, str) and value:
            try:
                signing_key(value)
            except ValueError:
                raise ValueError(
                    f"expected {self.expected}, got a whsec_ secret whose key is empty or not base64 "
                    "(the value is not shown)"
                ) from None
            return value
        return super().parse(value)


class HeaderField:
    """An extra header a webhook sends with every request: ``"Name: value"``."""

    expected = "a header field 'Name: value'"
    plural = "header fields 'Name: value'"
    null_hint = ""

    def parse(self, value):
        if not isinstance(value, str) or ":" not in value:
            raise ValueError(f"expected {self.expected}, got {_got(value)}")
        name, _, field_value = value.partition(":")
        pair = (name.strip(), field_value.strip())
        try:
            check_extra_header(*pair)
        except ValueError as exc:
            raise ValueError(f"expected {self.expected}, got {_got(value)} ({exc})") from None
        return pair

    def format(self, value):
        return f"{value[0]}: {value[1]}"


class PythonFunction:
    """``module:function`` for the Python sink, checked for form only.

    The module is not imported here: importing runs the operator's code,
    which ``pushcore check-config`` must not do; the sink imports it when it
    starts.  The part after the colon may be dotted (``mod:Class.method``).
    """

    expected = "module:function, as mypackage.hooks:handle"

    def parse(self, value):
        if isinstance(value, str):
            module, colon, function = value.strip().partition(":")
            parts = module.split(".") + function.split(".")
            if colon and all(part.isidentifier() for part in parts):
                return value.strip()
        raise ValueError(f"expected {self.expected}, got {_got(value)}")

    def format(self, value):
        return value


class RouteFilter(TopicFilter):
    """A route's topic filter: an MQTT filter matched against stored topics.

    A shared subscription (MQTT 5.0 §4.8.2, ``$share/{ShareName}/...``) is a
    way of subscribing, not a set of topics, so it is refused here.
    """

    expected = "a topic filter ('+' and '#' only as whole levels, '#' only as the last; no $share/)"

    def parse(self, value):
        value = super().parse(value)
        share_name, inner = parse_shared(value)
        if share_name is not None:
            raise ValueError(
                f"expected {self.expected}, got {_got(value)} (a route matches topics; "
                f"write the filter without {SHARE_PREFIX}/{share_name}/: {inner!r})"
            )
        return value


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
    "storage.retention.hard_max_bytes": Option(Size(), 0),
    "storage.retention.overflow": Option(Choice("refuse", "drop_oldest"), "refuse"),
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

# Top-level sections outside OPTIONS: their keys are sink names and list
# items, read by _FileReader.sinks and _FileReader.routes.
_DELIVERY_SECTIONS = ("sinks", "routes")


# --- the per-sink schema -----------------------------------------------------

SINK_TYPES = ("webhook", "python")
_WEBHOOK = ("webhook",)
_PYTHON = ("python",)

# The default of an option every sink of its types must set.
REQUIRED = object()


class SinkOption:
    """One per-sink schema entry: ``kind``, ``default`` (as for :class:`Option`,
    or :data:`REQUIRED`) and the sink ``types`` it applies to."""

    __slots__ = ("kind", "default", "types")

    def __init__(self, kind, default, types=SINK_TYPES):
        self.kind = kind
        self.default = default if default is REQUIRED else kind.parse(default)
        self.types = types

    @property
    def required(self):
        return self.default is REQUIRED

    def __repr__(self):
        default = "REQUIRED" if self.required else repr(self.kind.format(self.default))
        return f"SinkOption({type(self.kind).__name__}, {default}, {self.types})"


# Every option a sink may set, by its key relative to ``sinks.<name>``, in
# the order conf/pushcore.yaml documents them.
SINK_OPTIONS = {
    "type": SinkOption(Choice(*SINK_TYPES), REQUIRED),
    "url": SinkOption(WebhookURL(), REQUIRED, _WEBHOOK),
    "secret": SinkOption(WebhookSecret(), None, _WEBHOOK),
    "connect_timeout": SinkOption(Duration(), "5s", _WEBHOOK),
    "response_timeout": SinkOption(Duration(), "10s", _WEBHOOK),
    "connections": SinkOption(Integer(1, 256), 4, _WEBHOOK),
    "batch": SinkOption(Integer(1, 10_000), 1, _WEBHOOK),
    "headers": SinkOption(List(HeaderField()), (), _WEBHOOK),
    "on_4xx": SinkOption(Choice("dead", "retry"), "dead", _WEBHOOK),
    "function": SinkOption(PythonFunction(), REQUIRED, _PYTHON),
    "threads": SinkOption(Integer(1, 64), 1, _PYTHON),
    "ordering": SinkOption(Choice("strict", "none"), "strict"),
    # One partition is delivered by at most one worker at a time, so more
    # than the 1024 partitions storage allows could never be busy.
    "concurrency": SinkOption(Integer(1, 1024), 4),
    "retry.base": SinkOption(Duration(), "1s"),
    # A factor of 1 is a fixed delay (use cap for that); above 10 the second
    # retry already waits a hundred times the first.
    "retry.factor": SinkOption(Number(above=1, at_most=10), 2),
    "retry.cap": SinkOption(Duration(), "5m"),
    "retry.max_attempts": SinkOption(Integer(1, 1000), 10),
    # RFC 9110 §10.2.3: Retry-After, which only an HTTP receiver can send.
    "retry.max_retry_after": SinkOption(Duration(allow_zero=True), "1h", _WEBHOOK),
}

_SINK_SECTIONS = _sections(SINK_OPTIONS)

# Sink names end up in LMDB keys, metric labels and `pushcore dlq --sink`
# arguments: short, and safe in all three without quoting.
_SINK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SINK_NAME_EXPECTED = "1 to 64 letters, digits, '_', '.' or '-'"

# The keys of one route, both required.
_ROUTE_KEYS = ("filter", "sink")
_ROUTE_FILTER = RouteFilter()
_ROUTE_SINK = String()


def _sink_children(section):
    """Names of the options directly under the sink section ``section``, in schema order."""
    return [key[len(section) + 1:] for key in SINK_OPTIONS if key.startswith(section + ".")]


def _sink_options_of(sink_type):
    """Relative keys of the options a ``sink_type`` sink takes, and their sections."""
    keys = [key for key, option in SINK_OPTIONS.items() if sink_type in option.types]
    return keys, _sections(keys)


def _children(prefix):
    """Names directly under a section (``""`` is the top level), in schema order."""
    start = prefix + "." if prefix else ""
    names = []
    for key in OPTIONS:
        if key.startswith(start):
            name = key[len(start):].split(".", 1)[0]
            if name not in names:
                names.append(name)
    if not prefix:
        names.extend(_DELIVERY_SECTIONS)
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
    ``sinks`` is a read-only mapping of sink name to :class:`Sink` in file
    order, ``routes`` a tuple of :class:`Route` in file order; both are empty
    when the file sets none.
    """

    __slots__ = ("source", "sinks", "routes")

    def __init__(self, values, source=None, sinks=None, routes=()):
        super().__init__(dict(values), "")
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sinks", MappingProxyType(dict(sinks or {})))
        object.__setattr__(self, "routes", tuple(routes))

    def get(self, key):
        if key not in OPTIONS:
            raise KeyError(f"{key}: not a pushcore option{_hint(key)}")
        return self._values[key]

    def to_dict(self):
        """All options of :data:`OPTIONS` as ``{dotted key: value}`` (not sinks or routes)."""
        return dict(self._values)

    def __eq__(self, other):
        return (
            isinstance(other, Config)
            and self._values == other._values
            and self.sinks == other.sinks
            and self.routes == other.routes
        )

    __hash__ = None


class Route(NamedTuple):
    """One route: messages whose topic matches ``filter`` go to the sink named ``sink``."""

    filter: str
    sink: str


class _SinkSection:
    """Read-only attribute view of one section of a :class:`Sink`."""

    __slots__ = ("_name", "_values", "_prefix")

    def __init__(self, name, values, prefix):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, attr):
        key = f"{self._prefix}.{attr}" if self._prefix else attr
        if key in self._values:
            return self._values[key]
        if any(other.startswith(key + ".") for other in self._values):
            return _SinkSection(self._name, self._values, key)
        problem = _sink_key_problem(self._name, self._values["type"], key)
        raise AttributeError(f"sinks.{self._name}.{key}: {problem}")

    def __setattr__(self, name, value):
        raise AttributeError("configuration is read-only; load it again to change it")

    def __dir__(self):
        start = self._prefix + "." if self._prefix else ""
        names = []
        for key in self._values:
            if key.startswith(start) and key[len(start):].split(".", 1)[0] not in names:
                names.append(key[len(start):].split(".", 1)[0])
        return names

    def __repr__(self):
        start = self._prefix + "." if self._prefix else ""
        # The signing secret is never shown, as in ConfigError messages.
        inner = ", ".join(
            f"{key[len(start):]}={'<secret>' if key == 'secret' and value is not None else repr(value)}"
            for key, value in self._values.items()
            if key.startswith(start)
        )
        where = f"sinks.{self._name}.{self._prefix}" if self._prefix else f"sinks.{self._name}"
        return f"<{where}: {inner}>"


class Sink(_SinkSection):
    """One configured sink: ``sink.url``, ``sink.retry.base`` or ``sink.get("retry.base")``.

    Holds every option of its type, defaults filled in, and nothing else:
    reading an option of the other type (``url`` of a python sink) raises
    AttributeError / KeyError, as an unknown one does.
    """

    __slots__ = ()

    def __init__(self, name, values):
        super().__init__(name, dict(values), "")

    @property
    def name(self):
        return self._name

    def get(self, key):
        if key not in self._values:
            problem = _sink_key_problem(self._name, self._values["type"], key)
            raise KeyError(f"sinks.{self._name}.{key}: {problem}")
        return self._values[key]

    def to_dict(self):
        """The sink's options as ``{relative dotted key: value}``."""
        return dict(self._values)

    def __eq__(self, other):
        return isinstance(other, Sink) and (self._name, self._values) == (other._name, other._values)

    __hash__ = None


def _sink_key_problem(name, sink_type, key):
    """Why the relative ``key`` is not an option of the sink ``name`` of type ``sink_type``."""
    option = SINK_OPTIONS.get(key)
    if option is not None:
        return f"not an option of a {sink_type} sink ({' and '.join(option.types)} sinks only)"
    if key in _SINK_SECTIONS:
        return f"a section, not an option; name one of its options, as {key}.{_sink_children(key)[0]}"
    keys, sections = _sink_options_of(sink_type)
    return f"unknown option of a {sink_type} sink{_close_match(key, [*keys, *sections], f'sinks.{name}.')}"


# --- loading ----------------------------------------------------------------


def _close_match(word, candidates, prefix=""):
    """``"; did you mean <prefix><closest>?"``, or ``""`` when nothing is close."""
    matches = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {prefix}{matches[0]}?" if matches else ""


def _hint(key):
    return _close_match(key, [*OPTIONS, *_SECTIONS, *_DELIVERY_SECTIONS])


def _line(node):
    return node.start_mark.line + 1


_NULL_TAG = "tag:yaml.org,2002:null"


def _node_kind(node):
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL_TAG:
        return "null"
    return _got(node.value)


class _FileReader:
    """Walks the composed node tree of one file into ``values`` and ``lines``,
    and ``sinks`` and ``routes``."""

    def __init__(self, source, values, lines):
        self.source = source
        self.values = values
        self.lines = lines
        self.sinks = {}
        self.routes = ()
        # Routes name sinks, which may come later in the file: they are read
        # once the whole file has been walked.
        self.routes_node = None

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
        if self.routes_node is not None:
            self.routes = self.read_routes(*self.routes_node)

    def entries(self, node, prefix, noun="an option name", duplicate="key"):
        """``(name, dotted key, value node, line)`` of each entry of the mapping
        ``node``; a key that is not a scalar, or a repeated one, is an error."""
        seen = {}
        for key_node, value_node in node.value:
            line = _line(key_node)
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(prefix or "(top level)", f"expected {noun}, got {_node_kind(key_node)}", line)
            name = key_node.value
            key = f"{prefix}.{name}" if prefix else name
            if name in seen:
                raise self.error(key, f"duplicate {duplicate} (first set on line {seen[name]})", line)
            seen[name] = line
            yield name, key, value_node, line

    def no_dots(self, name, key, line):
        if "." in name:
            # One spelling per option, so a duplicate is always visible.
            raise self.error(key, "dotted keys are not accepted in the file; nest each section", line)

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
        for name, key, value_node, line in self.entries(node, prefix):
            self.no_dots(name, key, line)
            if key in _SECTIONS:
                self.section(value_node, key, line)
            elif key in OPTIONS:
                self.option(key, value_node, line)
            elif key == "sinks":
                self.read_sinks(value_node, line)
            elif key == "routes":
                self.routes_node = (value_node, line)
            else:
                raise self.error(key, f"unknown option{_hint(key)}", line)

    def scalar(self, key, kind, node, line):
        """``kind.parse`` of the scalar ``node``'s source text (None for null)."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(key, f"expected {kind.expected}, got {_node_kind(node)}", line)
        value = None if node.tag == _NULL_TAG else node.value
        try:
            return kind.parse(value)
        except ValueError as exc:
            raise self.error(key, str(exc), line) from None

    def option(self, key, node, line):
        kind = OPTIONS[key].kind
        if isinstance(kind, List):
            self.values[key] = self.sequence(key, kind, node, line)
        else:
            self.values[key] = self.scalar(key, kind, node, line)
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

    # --- sinks and routes ---

    def read_sinks(self, node, line):
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
            # Every sink commented out.
            return
        if not isinstance(node, yaml.MappingNode):
            raise self.error("sinks", f"expected a mapping of sink names to sinks, got {_node_kind(node)}", line)
        for name, key, value_node, name_line in self.entries(node, "sinks", "a sink name", "sink name"):
            if not _SINK_NAME.fullmatch(name):
                raise self.error(key, f"bad sink name {name!r}: expected {_SINK_NAME_EXPECTED}", name_line)
            self.sinks[name] = self.read_sink(name, value_node, name_line)

    def read_sink(self, name, node, line):
        prefix = f"sinks.{name}"
        if not isinstance(node, yaml.MappingNode):
            raise self.error(
                prefix, f"expected a mapping of sink options (type: {', '.join(SINK_TYPES)}, ...), "
                f"got {_node_kind(node)}", line
            )
        # Which options are allowed depends on the type, which may be written
        # after them: collect every entry first, then check each against it.
        found = {}
        self.collect_sink_entries(node, prefix, "", found)
        if "type" not in found:
            raise self.error(
                f"{prefix}.type", f"missing; every sink needs one ({SINK_OPTIONS['type'].kind.expected})", line
            )
        sink_type = self.scalar(f"{prefix}.type", SINK_OPTIONS["type"].kind, *found["type"])
        keys, _ = _sink_options_of(sink_type)
        values = {}
        for relative, (_, value_line) in found.items():
            if relative not in keys:
                raise self.error(f"{prefix}.{relative}", _sink_key_problem(name, sink_type, relative), value_line)
        for relative in keys:
            option = SINK_OPTIONS[relative]
            if relative in found:
                read = self.sequence if isinstance(option.kind, List) else self.scalar
                values[relative] = read(f"{prefix}.{relative}", option.kind, *found[relative])
            elif option.required:
                raise self.error(
                    f"{prefix}.{relative}", f"missing; a {sink_type} sink needs one ({option.kind.expected})", line
                )
            else:
                values[relative] = option.default
        if values["retry.cap"] < values["retry.base"]:
            cap_line = found.get("retry.cap", found.get("retry.base"))[1]
            raise self.error(
                f"{prefix}.retry.cap",
                f"must be at least retry.base ({_format_duration(values['retry.cap'])} < "
                f"{_format_duration(values['retry.base'])})",
                cap_line,
            )
        return Sink(name, values)

    def collect_sink_entries(self, node, prefix, relative_prefix, found):
        """``found[relative key] = (value node, line)`` for each entry of a sink,
        descending into its sections (``retry``)."""
        for name, key, value_node, line in self.entries(node, prefix):
            self.no_dots(name, key, line)
            relative = f"{relative_prefix}.{name}" if relative_prefix else name
            if relative not in _SINK_SECTIONS:
                found[relative] = (value_node, line)
            elif isinstance(value_node, yaml.MappingNode):
                self.collect_sink_entries(value_node, key, relative, found)
            elif not (isinstance(value_node, yaml.ScalarNode) and value_node.tag == _NULL_TAG):
                names = ", ".join(_sink_children(relative))
                raise self.error(key, f"expected a mapping of options ({names}), got {_node_kind(value_node)}", line)

    def read_routes(self, node, line):
        if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(
                "routes", f"expected a list of routes (each a mapping with filter and sink), got {_node_kind(node)}",
                line,
            )
        routes = []
        first = {}
        for index, item in enumerate(node.value, 1):
            # 1-based, as list items are counted in every other message.
            prefix = f"routes[{index}]"
            item_line = _line(item)
            if not isinstance(item, yaml.MappingNode):
                raise self.error(prefix, f"expected a mapping with filter and sink, got {_node_kind(item)}", item_line)
            found = {}
            for name, key, value_node, key_line in self.entries(item, prefix):
                if name not in _ROUTE_KEYS:
                    hint = _close_match(name, _ROUTE_KEYS, prefix + ".")
                    raise self.error(key, f"unknown key of a route (filter, sink){hint}", key_line)
                found[name] = (value_node, key_line)
            for name in _ROUTE_KEYS:
                if name not in found:
                    raise self.error(f"{prefix}.{name}", "missing; every route needs a filter and a sink", item_line)
            route = Route(
                self.scalar(f"{prefix}.filter", _ROUTE_FILTER, *found["filter"]),
                self.scalar(f"{prefix}.sink", _ROUTE_SINK, *found["sink"]),
            )
            if route.sink not in self.sinks:
                names = f"sinks: {', '.join(self.sinks)}" if self.sinks else "no sinks are configured"
                hint = _close_match(route.sink, list(self.sinks))
                raise self.error(f"{prefix}.sink", f"no sink named {route.sink!r} ({names}){hint}", found["sink"][1])
            if route in first:
                raise self.error(prefix, f"the same route as routes[{first[route]}]", item_line)
            first[route] = index
            routes.append(route)
        return tuple(routes)


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
    applied after the file, as command-line flags beat the file.  Sinks and
    routes are read from the file only.  Any problem raises
    :class:`pushcore.errors.ConfigError` naming the key, and for the file its
    path and line.
    """
    values = {key: option.default for key, option in OPTIONS.items()}
    # Line of each option set by the file; options set by an override are
    # removed so a later cross-check does not blame the file for them.
    lines = {}
    source = None if path is None else str(path)
    reader = _FileReader(source, values, lines)
    if path is not None:
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError("config file", f"cannot read: {exc.strerror}", source=source) from None
        reader.read(text)
    for key, value in (overrides or {}).items():
        if key not in OPTIONS:
            if re.match(r"(sinks|routes)\b", key):
                raise ConfigError(key, "sinks and routes are set in the configuration file only")
            raise ConfigError(key, f"unknown option{_hint(key)}")
        try:
            values[key] = OPTIONS[key].kind.parse(value)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        lines.pop(key, None)
    _validate(values, lines, source)
    return Config(values, source, reader.sinks, reader.routes)


def check_config(path):
    """Load and validate ``path`` for ``pushcore check-config``; raises ConfigError."""
    return load_config(path)
