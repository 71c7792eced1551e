"""The webhook sink's protocol half, sans-IO: targets, requests, signatures,
outcomes and the retry schedule.

Nothing here touches a socket or the clock: the caller passes the time in
(``now_s``, seconds since the Unix epoch) and gets bytes or values out.  The
HTTP connection that carries the bytes lives elsewhere.

One delivery is one ``POST`` of the record's payload::

    target = Target.parse("http://hooks.example:8080/in?src=pushcore")
    request = build_request(target, Delivery(0, 42, 1700000000123, "a/b", b"id-1", b"{}"),
                            secret="whsec_...", now_s=time.time())
    outcome = classify(status, headers, now_s, policy)   # after the response head
    if outcome.kind == RETRY:
        delay = retry_delay(outcome, attempt, policy, rng)

Headers of a single-message request, in this order (RFC 9110 field names are
case-insensitive; the Standard Webhooks ones are written as that spec does):

    Host                  RFC 9110 §7.2: the target's authority, port omitted when 80
    Content-Type          the MQTT 5 Content Type property when it is a valid
                          media type (RFC 9110 §8.3.1), else application/octet-stream
    Content-Length        RFC 9110 §8.6
    Idempotency-Key       the delivery's key (below)
    X-Pushcore-Topic      the topic, percent-encoded (below)
    X-Pushcore-Partition  decimal
    X-Pushcore-Offset     decimal
    X-Pushcore-Time       the record's time, ms since the Unix epoch
    webhook-id            = Idempotency-Key          } only when a secret
    webhook-timestamp     now_s, whole seconds       } is configured
    webhook-signature     v1,<base64 HMAC-SHA256>    }
    then the configured extra headers.

The delivery key is the message id when the record has a non-empty one, else
``<partition>-<offset>``.  It is the same on every attempt, so a receiver drops
duplicates by it.  A message id that reads like such a key (``3-17``, or a
batch's ``3-17-20``) has its first character percent-encoded (``%33-17``), so
that no publisher's id can ever equal the key of a record without one.  Header values are visible ASCII, so the id and the topic are
percent-encoded (RFC 3986 §2.1, upper-case hex) wherever a byte is a control,
space, ``%`` or non-ASCII; the id also has ``.`` encoded, because Standard
Webhooks signs ``{id}.{timestamp}.{body}`` and asks that ids carry no ``.``
(a dot in the id would let one signature cover two readings of the headers).
``urllib.parse.unquote`` gives the original back, byte for byte.  A CR or LF in
a topic or id therefore can never start a header of its own.

A batch (``build_batch_request``) is one POST of NDJSON, one JSON object per
record, all-or-nothing: see its docstring for the body and its key.

Outcomes: 2xx success; 408, 429 and 5xx retry (Retry-After honoured); 3xx
dead (redirects are not followed, and the same URL will answer the same);
other 4xx dead unless ``RetryPolicy.retry_4xx``; connection errors and
timeouts retry (``classify_error``).  Retries wait ``backoff``: exponential
with full jitter.
"""

import base64
import binascii
import calendar
import hashlib
import hmac
import json
import math
import random
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from http import HTTPStatus
from ipaddress import IPv6Address

from pushcore import _frame, _http

__all__ = ["SUCCESS", "RETRY", "DEAD", "ERROR_KINDS", "Target", "Delivery", "RetryPolicy",
           "Outcome", "signing_key", "sign", "check_extra_header", "idempotency_key", "build_request",
           "build_batch_request", "request_writer", "classify", "classify_error", "parse_retry_after",
           "backoff", "retry_delay"]

SUCCESS = "success"
RETRY = "retry"
DEAD = "dead"

DEFAULT_CONTENT_TYPE = "application/octet-stream"
# NDJSON (ndjson-spec 1.0): one JSON text per line, each line ending in \n.
BATCH_CONTENT_TYPE = "application/x-ndjson"

# RFC 3986 §3.2.3 / RFC 9110 §4.2.1: an http URI without a port means 80.
HTTP_DEFAULT_PORT = 80

# Standard Webhooks §Signature scheme: symmetric secrets are serialized as
# base64 prefixed with "whsec_"; the symmetric signature identifier is "v1".
SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"

# Header-value escaping.  RFC 9110 §5.5: a field value is VCHAR / obs-text /
# SP / HTAB, and a recipient strips leading and trailing whitespace, so
# controls, space and non-ASCII are escaped; "%" too, so that decoding is exact.
_TOPIC_UNSAFE = bytes(range(0x21)) + b"%\x7f" + bytes(range(0x80, 0x100))
# Standard Webhooks §Signature scheme: a message id must not contain ".".
_ID_UNSAFE = _TOPIC_UNSAFE + b"."
# The shape of the keys pushcore makes up: "<partition>-<offset>" for a record
# without an id, "<partition>-<first>-<last>" for a batch.
_READS_AS_OFFSETS = re.compile(rb"[0-9]+(?:-[0-9]+)+")
_TOPIC_ESCAPES = tuple(f"%{b:02X}" if b in _TOPIC_UNSAFE else chr(b) for b in range(256))
_ID_ESCAPES = tuple(f"%{b:02X}" if b in _ID_UNSAFE else chr(b) for b in range(256))

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# RFC 9110 §8.3.1: media-type = type "/" subtype parameters, where
# parameters = *( OWS ";" OWS [ parameter ] ) and parameter = token "=" ( token
# / quoted-string ) (§5.6.6); quoted-string per §5.6.4, ASCII only here.
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}"
    r'|"(?:[\t !#-\[\]-~]|\\[\t -~])*"))?)*')
_HEADER_NAME = re.compile(_TOKEN)
# RFC 9110 §5.5: field-value = *field-content, without leading or trailing
# whitespace; restricted to ASCII (obs-text is obsolete).
_HEADER_VALUE = re.compile(r"(?:[!-~](?:[ \t]*[!-~])*)?")

# Header names pushcore writes itself, and the hop-by-hop and framing fields
# (RFC 9110 §7.6.1 Connection, §10.1.1 Expect, §7.8 Upgrade, RFC 9112 §6.1
# Transfer-Encoding, RFC 9110 §10.1.4 TE and §6.6.2 Trailer) that would change how
# the connection or the message is framed.  Extra headers may not set them.
_RESERVED_HEADERS = frozenset({
    "host", "content-type", "content-length", "idempotency-key", "x-pushcore-topic",
    "x-pushcore-partition", "x-pushcore-offset", "x-pushcore-time", "x-pushcore-count",
    "webhook-id", "webhook-timestamp", "webhook-signature",
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
})

# RFC 3986 §3.1 scheme, §3.2 authority (up to the first "/", "?" or "#").
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)", re.DOTALL)
# RFC 3986 §3.2.2: a DNS name or IPv4 literal (reg-name restricted to what
# resolvers accept; "_" is common in container names).
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
# RFC 3986 §3.3 and §3.4: path-abempty [ "?" query ], pchar = unreserved /
# pct-encoded / sub-delims / ":" / "@"; RFC 9112 §3.2.1 origin-form.
_PATH_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_MAX_PORT = 65535


@dataclass(slots=True, frozen=True)
class Target:
    """A webhook endpoint: where to connect and what to put in the request line.

    ``host`` is lower-case, an IPv6 address without its brackets; ``target``
    is the RFC 9112 §3.2.1 origin-form (path and query, at least "/").
    """

    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url):
        """Parse an ``http://host[:port][/path][?query]`` URL.

        Raises ValueError naming what is wrong: another scheme (``https``
        is refused until TLS lands), credentials, a fragment, a host that is
        not ASCII or not valid, a port outside 1..65535, or characters a
        request line cannot carry.
        """
        match = _URL.fullmatch(url)
        if match is None:
            raise ValueError(f"webhook URL {url!r}: expected http://host[:port]/path")
        scheme, authority, rest = match.groups()
        scheme = scheme.lower()
        if scheme == "https":
            raise ValueError(f"webhook URL {url!r}: https:// is not supported yet "
                             "(pushcore has no TLS client); use http://")
        if scheme != "http":
            raise ValueError(f"webhook URL {url!r}: scheme {scheme!r} is not supported; "
                             "use http://")
        if "#" in rest:
            raise ValueError(f"webhook URL {url!r}: a fragment (#...) is never sent to the "
                             "server; remove it")
        if "@" in authority:
            raise ValueError(f"webhook URL {url!r}: credentials in the URL (user@host) are "
                             "not supported; send them as an extra header")
        host, port = _split_authority(url, authority)
        if not rest.isascii() or not _PATH_QUERY.fullmatch(rest):
            raise ValueError(f"webhook URL {url!r}: the path and query may only hold URI "
                             "characters (RFC 3986); percent-encode the others")
        if rest.startswith("?"):
            rest = "/" + rest
        return cls(host, port, rest or "/")

    @property
    def authority(self):
        """The Host header value (RFC 9110 §7.2): port omitted when it is 80."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == HTTP_DEFAULT_PORT else f"{host}:{self.port}"

    @property
    def address(self):
        """(host, port) to resolve and connect to."""
        return self.host, self.port

    def __str__(self):
        return f"http://{self.authority}{self.target}"


def _split_authority(url, authority):
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"webhook URL {url!r}: IPv6 address has no closing ']'")
        literal, after = authority[1:end], authority[end + 1:]
        if "%" in literal:
            raise ValueError(f"webhook URL {url!r}: IPv6 zone identifiers are not supported")
        try:
            host = str(IPv6Address(literal))
        except ValueError:
            raise ValueError(f"webhook URL {url!r}: [{literal}] is not an IPv6 address") \
                from None
        if after and not after.startswith(":"):
            raise ValueError(f"webhook URL {url!r}: unexpected {after!r} after the IPv6 "
                             "address")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = authority.partition(":")
        if ":" in port_text:
            raise ValueError(f"webhook URL {url!r}: an IPv6 address must be written in "
                             "brackets, as http://[::1]:8080/")
        if not host:
            raise ValueError(f"webhook URL {url!r}: no host")
        if not host.isascii():
            raise ValueError(f"webhook URL {url!r}: host {host!r} is not ASCII; write its "
                             "IDNA form (xn--...)")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"webhook URL {url!r}: host {host!r} is not a valid host name "
                             "or IPv4 address")
        host = host.lower()
    if not port_text:
        # RFC 3986 §3.2.3: an empty port ("host:") is the scheme's default.
        return host, HTTP_DEFAULT_PORT
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            and 1 <= int(port_text) <= _MAX_PORT):
        raise ValueError(f"webhook URL {url!r}: port {port_text!r} is not a number "
                         f"1..{_MAX_PORT}")
    return host, int(port_text)


@dataclass(slots=True, frozen=True)
class Delivery:
    """One stored record on its way to a webhook.

    ``msg_id`` is the publisher's message id (bytes, usually UTF-8) or None;
    ``content_type`` the MQTT 5 Content Type property or None.
    """

    partition: int
    offset: int
    time_ms: int
    topic: str
    msg_id: bytes | None
    payload: bytes
    content_type: str | None = None

    @classmethod
    def from_record(cls, record, partition, offset):
        """The delivery of a decoded ``pushcore.record.Record``."""
        props = _frame.decode_properties(record.properties) if record.properties else None
        content_type = props.get("content_type") if props else None
        return cls(partition, offset, record.time_ms, record.topic, record.msg_id,
                   record.payload, content_type)


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """How a sink retries: the backoff schedule and what counts as retryable.

    ``backoff(attempt, base_s, factor, cap_s)`` spaces the retries;
    ``max_attempts`` counts every attempt, the first included, after which
    the record goes to the dead-letter queue.  ``retry_4xx`` retries client
    errors (4xx other than 408 and 429) instead of dead-lettering them;
    ``max_retry_after_s`` caps how long a receiver's Retry-After may hold a
    delivery back.
    """

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 3600.0
    max_attempts: int = 15
    retry_4xx: bool = False
    max_retry_after_s: float = 3600.0

    def __post_init__(self):
        if not self.base_s >= 0:
            raise ValueError(f"base_s must be >= 0, got {self.base_s!r}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if not self.cap_s >= 0:
            raise ValueError(f"cap_s must be >= 0, got {self.cap_s!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        if not self.max_retry_after_s >= 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {self.max_retry_after_s!r}")


@dataclass(slots=True, frozen=True)
class Outcome:
    """What to do after one attempt.

    ``kind`` is SUCCESS, RETRY or DEAD; ``retry_after_s`` the delay the
    receiver asked for (Retry-After, already capped) or None; ``reason`` a
    one-line explanation for logs and the dead-letter queue.
    """

    kind: str
    retry_after_s: float | None
    reason: str


# --- signing ----------------------------------------------------------------

def signing_key(secret):
    """The HMAC key of a configured secret.

    ``"whsec_<base64>"`` is base64-decoded (padding optional); any other
    string is its UTF-8 bytes; bytes are the key itself.  An empty key or bad
    base64 raises ValueError.
    """
    if isinstance(secret, bytes):
        key = secret
    elif secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX):]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("webhook secret: the text after 'whsec_' is not base64") \
                from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret, msg_id, timestamp_s, body):
    """The Standard Webhooks ``webhook-signature`` value: ``"v1,<base64>"``,
    the HMAC-SHA256 of ``f"{msg_id}.{timestamp_s}.{body}"``.

    ``secret`` as for ``signing_key``; ``msg_id`` the webhook-id header value;
    ``timestamp_s`` whole seconds; ``body`` the exact bytes sent.
    """
    mac = hmac.new(signing_key(secret), f"{msg_id}.{timestamp_s}.".encode(), hashlib.sha256)
    mac.update(body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode()}"


# --- requests ---------------------------------------------------------------

def _escape(data, unsafe, escapes):
    if len(data.translate(None, unsafe)) == len(data):
        return data.decode("ascii")
    return "".join([escapes[b] for b in data])


def idempotency_key(delivery):
    """The delivery's key: its percent-encoded message id, or
    ``"<partition>-<offset>"`` when the record has none (or an empty one,
    which would make every such record one duplicate of the next)."""
    if not delivery.msg_id:
        return f"{delivery.partition}-{delivery.offset}"
    key = _escape(delivery.msg_id, _ID_UNSAFE, _ID_ESCAPES)
    if _READS_AS_OFFSETS.fullmatch(delivery.msg_id):
        # Its first digit encoded: then it is no "<partition>-<offset>" key.
        return f"%{delivery.msg_id[0]:02X}{key[1:]}"
    return key


def _content_type(value):
    if value is not None and value.isascii() and _MEDIA_TYPE.fullmatch(value):
        return value
    return DEFAULT_CONTENT_TYPE


def check_extra_header(name, value):
    """Raise ValueError unless (name, value) may be sent as an extra header: the
    name an HTTP token pushcore does not set itself (nor one that frames the
    message or the connection), the value visible ASCII."""
    if not _HEADER_NAME.fullmatch(name) or not name.isascii():
        raise ValueError(f"extra header name {name!r} is not an HTTP token")
    if name.lower() in _RESERVED_HEADERS:
        raise ValueError(f"extra header {name!r} is set by pushcore and may not be "
                         "configured")
    if not value.isascii() or not _HEADER_VALUE.fullmatch(value):
        raise ValueError(f"extra header {name!r}: value {value!r} must be visible "
                         "ASCII without leading or trailing whitespace")


@lru_cache(maxsize=64)
def _encode_extra(pairs):
    lines = []
    for name, value in pairs:
        check_extra_header(name, value)
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def _request(target, content_type, body, key, fields, secret, now_s, extra_headers):
    extra = _encode_extra(tuple(map(tuple, extra_headers)))
    if secret is not None:
        if now_s is None:
            raise ValueError("signing needs now_s (the attempt's time)")
        timestamp = math.floor(now_s)
        signature = sign(secret, key, timestamp, body)
        signed = (f"webhook-id: {key}\r\nwebhook-timestamp: {timestamp}\r\n"
                  f"webhook-signature: {signature}\r\n")
    else:
        signed = ""
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version,
    # and §2.1: every line of the head ends in CRLF, an empty line ends it.
    head = (f"POST {target.target} HTTP/1.1\r\nHost: {target.authority}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Idempotency-Key: {key}\r\n{fields}{signed}{extra}\r\n")
    return head.encode("ascii") + body


def build_request(target, delivery, secret=None, *, now_s=None, extra_headers=()):
    """The bytes of one HTTP/1.1 POST delivering ``delivery`` to ``target``.

    ``secret`` (as for ``signing_key``) adds the Standard Webhooks headers,
    timestamped ``now_s``.  ``extra_headers`` are (name, value) string pairs
    added last; a name pushcore sets itself, a hop-by-hop name, or a value
    with controls raises ValueError.
    """
    fields = (f"X-Pushcore-Topic: "
              f"{_escape(delivery.topic.encode(), _TOPIC_UNSAFE, _TOPIC_ESCAPES)}\r\n"
              f"X-Pushcore-Partition: {delivery.partition}\r\n"
              f"X-Pushcore-Offset: {delivery.offset}\r\n"
              f"X-Pushcore-Time: {delivery.time_ms}\r\n")
    return _request(target, _content_type(delivery.content_type), delivery.payload,
                    idempotency_key(delivery), fields, secret, now_s, extra_headers)


# Encodes one str as a JSON string; the batch lines are written field by
# field (their shape is fixed), several times faster than json.dumps of a dict.
_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _batch_line(delivery):
    try:
        payload = f'"payload":{_json_string(delivery.payload.decode())}'
    except UnicodeDecodeError:
        payload = f'"payload_b64":"{base64.b64encode(delivery.payload).decode("ascii")}"'
    content_type = ("" if delivery.content_type is None
                    else f',"content_type":{_json_string(delivery.content_type)}')
    return (f'{{"id":{_json_string(idempotency_key(delivery))},'
            f'"topic":{_json_string(delivery.topic)},"partition":{delivery.partition},'
            f'"offset":{delivery.offset},"time_ms":{delivery.time_ms},'
            f'{payload}{content_type}}}\n')


def build_batch_request(target, deliveries, secret=None, *, now_s=None, extra_headers=()):
    """The bytes of one HTTP/1.1 POST delivering several records at once.

    The records must be consecutive offsets of one partition, in order (a
    sink reads a partition in order; a gap is split into two batches).  The
    body is NDJSON, one line per record::

        {"id":"<key>","topic":"a/b","partition":0,"offset":7,"time_ms":...,
         "payload":"<UTF-8 text>"}

    where ``id`` is the record's ``Idempotency-Key`` as a single delivery
    would send it, the payload is ``payload`` when it is valid UTF-8 and
    ``payload_b64`` (base64) otherwise, and ``content_type`` is added when
    the record has one.  The batch is all-or-nothing: one status for all.

    The batch's own ``Idempotency-Key`` (and ``webhook-id``) is
    ``"<partition>-<first offset>-<last offset>"``: a partition's offsets are
    never reused, so the key names exactly this set of records and a
    receiver that has processed it may drop a repeat whole.  A receiver that
    also takes single deliveries dedupes line by line with ``id`` instead.
    ``X-Pushcore-Partition`` and ``X-Pushcore-Count`` describe the batch; the
    signature covers the whole body.
    """
    if not deliveries:
        raise ValueError("a batch needs at least one record")
    first = deliveries[0]
    for before, after in zip(deliveries, deliveries[1:]):
        if after.partition != first.partition:
            raise ValueError(f"a batch holds one partition: got {first.partition} and "
                             f"{after.partition}")
        if after.offset != before.offset + 1:
            raise ValueError(f"a batch holds consecutive offsets: {after.offset} follows "
                             f"{before.offset}")
    body = "".join([_batch_line(d) for d in deliveries]).encode()
    key = f"{first.partition}-{first.offset}-{deliveries[-1].offset}"
    fields = (f"X-Pushcore-Partition: {first.partition}\r\n"
              f"X-Pushcore-Count: {len(deliveries)}\r\n")
    return _request(target, BATCH_CONTENT_TYPE, body, key, fields, secret, now_s,
                    extra_headers)


def request_writer(target, secret=None, extra_headers=()):
    """A sink's ``pushcore._http.RequestWriter``: the bytes of ``build_request``
    and ``build_batch_request``, made in C straight from stored records.

    ``writer.single(record, partition, offset, now_s)`` and
    ``writer.batch(records, partition, first_offset, now_s)`` take the record
    bytes as the log keeps them; the arguments here are those of the two
    functions above, checked the same way.
    """
    start = f"POST {target.target} HTTP/1.1\r\nHost: {target.authority}\r\n".encode("ascii")
    extra = _encode_extra(tuple(map(tuple, extra_headers))).encode("ascii")
    key = signing_key(secret) if secret is not None else None
    return _http.RequestWriter(start, extra, key, _content_types)


def _content_types(properties):
    # The Content-Type field of a single delivery, and the raw property a batch
    # line carries (Delivery.from_record and _content_type, for the C writer).
    content_type = _frame.decode_properties(properties).get("content_type")
    return _content_type(content_type), content_type


# --- outcomes ---------------------------------------------------------------

# RFC 9110 §15.5.9 408 Request Timeout, RFC 6585 §4 429 Too Many Requests:
# client-error codes that say "try again later", not "this request is wrong".
_RETRYABLE_4XX = frozenset({408, 429})

# The ways an attempt can fail before a status arrives, and what they mean.
ERROR_KINDS = {
    "resolve": "name resolution failed",
    "connect_refused": "connection refused",
    "connect_timeout": "connect timed out",
    "connection_reset": "connection closed before the response was complete",
    "response_timeout": "response timed out",
    "bad_response": "malformed HTTP response",
}


def _status_text(status):
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _header(headers, name):
    values = [value for field, value in headers if field == name]
    return values[0] if len(values) == 1 else None


_SUCCESSES = {}


def classify(status, headers, now_s, policy):
    """The Outcome of a response with ``status`` and ``headers`` (a list of
    (lower-case name, value) bytes pairs), received at ``now_s``.

    Retry-After (RFC 9110 §10.2.3) is read on retryable answers only; one
    that is missing, repeated or invalid is ignored.
    """
    if 200 <= status <= 299:
        # The common answer, once per delivery: one shared Outcome per status.
        outcome = _SUCCESSES.get(status)
        if outcome is None:
            outcome = _SUCCESSES[status] = Outcome(SUCCESS, None, _status_text(status))
        return outcome
    text = _status_text(status)
    if 300 <= status <= 399:
        location = _header(headers, b"location")
        where = f" to {location.decode('ascii', 'backslashreplace')}" if location else ""
        return Outcome(DEAD, None, f"{text}: redirect{where} not followed")
    if 400 <= status <= 499 and status not in _RETRYABLE_4XX and not policy.retry_4xx:
        return Outcome(DEAD, None, f"{text}: client errors are not retried")
    if not 400 <= status <= 599:
        text = f"{text}: unexpected status"
    value = _header(headers, b"retry-after")
    delay = parse_retry_after(value, now_s) if value is not None else None
    if delay is not None:
        delay = min(delay, policy.max_retry_after_s)
    return Outcome(RETRY, delay, text)


def classify_error(kind, detail=""):
    """The Outcome of an attempt that failed without a status: always RETRY.

    ``kind`` is a key of ERROR_KINDS; ``detail`` (e.g. the OS error) is
    appended to the reason.
    """
    try:
        reason = ERROR_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown delivery error kind {kind!r}; "
                         f"expected one of {sorted(ERROR_KINDS)}") from None
    return Outcome(RETRY, None, f"{reason}: {detail}" if detail else reason)


_DAY_NAMES = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY_NAMES = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_MONTH = rb"(" + b"|".join(_MONTHS) + rb")"
_TIME_OF_DAY = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7: IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT".
_IMF_FIXDATE = re.compile(_DAY_NAMES + rb", ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) "
                          + _TIME_OF_DAY + rb" GMT")
# RFC 9110 §5.6.7: obsolete rfc850-date, e.g. "Sunday, 06-Nov-94 08:49:37 GMT".
_RFC850_DATE = re.compile(_LONG_DAY_NAMES + rb", ([0-9]{2})-" + _MONTH + rb"-([0-9]{2}) "
                          + _TIME_OF_DAY + rb" GMT")
# RFC 9110 §5.6.7: obsolete asctime-date, e.g. "Sun Nov  6 08:49:37 1994".
_ASCTIME_DATE = re.compile(_DAY_NAMES + rb" " + _MONTH + rb" ([0-9]{2}| [0-9]) "
                           + _TIME_OF_DAY + rb" ([0-9]{4})")
# RFC 9110 §10.2.3: delay-seconds = 1*DIGIT.
_DELAY_SECONDS = re.compile(rb"[0-9]+")
# Past this many digits a delay is longer than any cap (and too long to convert).
_MAX_DELAY_DIGITS = 15
# RFC 9110 §5.6.7: a two-digit year more than 50 years in the future means
# the most recent past year with the same last two digits.
_RFC850_WINDOW_YEARS = 50


def parse_retry_after(value, now_s):
    """Seconds to wait from a Retry-After field value (bytes), or None.

    RFC 9110 §10.2.3: delay-seconds, or an HTTP-date in any of the three
    forms of §5.6.7 (case-sensitive); a date in the past means 0.  Anything
    else, including an impossible date, is None.
    """
    value = value.strip(b" \t")
    if _DELAY_SECONDS.fullmatch(value):
        digits = value.lstrip(b"0")
        return float(int(digits or b"0")) if len(digits) <= _MAX_DELAY_DIGITS else math.inf
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _ASCTIME_DATE.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    elif match := _RFC850_DATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
        year = _rfc850_year(int(year), now_s)
    else:
        return None
    year, day, hour, minute, second = map(int, (year, day, hour, minute, second))
    month = _MONTHS.index(month) + 1
    if not (year >= 1 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour <= 23 and minute <= 59 and second <= 60):
        return None
    when = calendar.timegm((year, month, day, hour, minute, second))
    return float(max(0, when - now_s))


def _rfc850_year(two_digits, now_s):
    # The one year with these last two digits in [this year - 49, this year + 50].
    earliest = time.gmtime(now_s).tm_year - (100 - _RFC850_WINDOW_YEARS - 1)
    return earliest + (two_digits - earliest) % 100


# --- retry schedule ---------------------------------------------------------

def backoff(attempt, base_s, factor, cap_s, rng=random):
    """Seconds to wait before retry number ``attempt`` (0-based): exponential
    backoff with full jitter, ``rng.uniform(0, min(cap_s, base_s * factor ** attempt))``
    (AWS Architecture Blog, "Exponential Backoff And Jitter", 2015).

    Full jitter spreads the retries of many records that failed together
    over the whole window instead of sending them back in lockstep.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    try:
        ceiling = min(cap_s, base_s * factor ** attempt)
    except OverflowError:
        ceiling = cap_s
    return rng.uniform(0.0, ceiling)


def retry_delay(outcome, attempt, policy, rng=random):
    """Seconds until the next attempt after a RETRY ``outcome``: the backoff
    for ``attempt``, or the receiver's Retry-After when that is longer."""
    delay = backoff(attempt, policy.base_s, policy.factor, policy.cap_s, rng)
    if outcome.retry_after_s is not None:
        return max(delay, outcome.retry_after_s)
    return delay
