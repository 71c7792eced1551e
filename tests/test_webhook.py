"""The webhook sink's sans-IO half (pushcore.webhook): exact request bytes,
Standard Webhooks signatures, header injection, NDJSON batches, outcome
classes, Retry-After and the backoff schedule.

None of the parsers here is a stream parser (a URL, a Retry-After value: each
arrives whole), so there is no split-at-every-offset test; each has exact
single-input tests, failure tests asserting the error, and hypothesis tests.
"""

import base64
import email.utils
import hashlib
import hmac
import http.server
import json
import random
import re
import socket
import threading
from datetime import datetime, timezone
from urllib.parse import unquote, unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore import _frame
from pushcore.record import decode_record, encode_record
from pushcore.webhook import (DEAD, ERROR_KINDS, RETRY, SUCCESS, Delivery, Outcome, RetryPolicy,
                              Target, backoff, build_batch_request, build_request, classify,
                              classify_error, idempotency_key, parse_retry_after, request_writer,
                              retry_delay, sign, signing_key)

# The Standard Webhooks reference test vector: standard-webhooks/standard-webhooks,
# libraries/go/webhook_test.go, TestWebhookSign (the same values are used by the
# spec's other reference libraries and by Svix, whose scheme it standardises).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_PAYLOAD = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

TARGET = Target.parse("http://hooks.example:8080/in?src=pushcore")
SAMPLE = Delivery(partition=3, offset=42, time_ms=1700000000123, topic="sensors/t1",
                  msg_id=VECTOR_ID.encode(), payload=VECTOR_PAYLOAD,
                  content_type="application/json")

SAMPLE_HEAD = (
    b"POST /in?src=pushcore HTTP/1.1\r\n"
    b"Host: hooks.example:8080\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 20\r\n"
    b"Idempotency-Key: msg_p5jXN8AQM9LWM0D4loKWxJek\r\n"
    b"X-Pushcore-Topic: sensors/t1\r\n"
    b"X-Pushcore-Partition: 3\r\n"
    b"X-Pushcore-Offset: 42\r\n"
    b"X-Pushcore-Time: 1700000000123\r\n")

TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
FIELD_VALUE = re.compile(rb"(?:[!-~](?:[ \t]*[!-~])*)?")


def parse_request(data):
    """A strict RFC 9112 request parser for the tests: returns
    ((method, target, version), [(lower-case name, value)], body) and fails on
    anything a lenient server might read differently (bare CR or LF, a line
    that is not a field, whitespace before the colon, a short body)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep
    lines = head.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    method, target, version = lines[0].split(b" ")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and TOKEN.fullmatch(name), line
        value = value.strip(b" \t")
        assert FIELD_VALUE.fullmatch(value), line
        fields.append((name.lower().decode(), value.decode("ascii")))
    lengths = [value for name, value in fields if name == "content-length"]
    assert lengths == [str(len(body))]
    return (method, target, version), fields, body


def header(fields, name):
    (value,) = [v for n, v in fields if n == name]
    return value


def verify(secret, fields, body):
    """What a receiver does (Standard Webhooks §Verifying), written out."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{header(fields, 'webhook-id')}.{header(fields, 'webhook-timestamp')}.".encode()
    mac = hmac.new(key, content + body, hashlib.sha256).digest()
    version, _, sent = header(fields, "webhook-signature").partition(",")
    return version == "v1" and hmac.compare_digest(base64.b64decode(sent), mac)


# -- Target --------------------------------------------------------------------

@pytest.mark.parametrize("url, host, port, target, authority", [
    ("http://example.com", "example.com", 80, "/", "example.com"),
    ("http://example.com/", "example.com", 80, "/", "example.com"),
    ("HTTP://Example.COM:80/Hook", "example.com", 80, "/Hook", "example.com"),
    ("http://example.com:/x", "example.com", 80, "/x", "example.com"),
    ("http://10.0.0.7:8080/a/b?c=d&e=%2F", "10.0.0.7", 8080, "/a/b?c=d&e=%2F", "10.0.0.7:8080"),
    ("http://example.com?q=1", "example.com", 80, "/?q=1", "example.com"),
    ("http://[::1]:9000/in", "::1", 9000, "/in", "[::1]:9000"),
    ("http://[2001:DB8:0:0::1]/", "2001:db8::1", 80, "/", "[2001:db8::1]"),
    ("http://recv_1.local.:65535/", "recv_1.local.", 65535, "/", "recv_1.local.:65535"),
    ("http://h/~a-b._!$&'()*+,;=:@/", "h", 80, "/~a-b._!$&'()*+,;=:@/", "h"),
])
def test_target_parse(url, host, port, target, authority):
    parsed = Target.parse(url)
    assert parsed == Target(host, port, target)
    assert parsed.authority == authority
    assert parsed.address == (host, port)
    assert str(parsed) == f"http://{authority}{target}"


@pytest.mark.parametrize("url, message", [
    ("https://example.com/", "https:// is not supported yet (pushcore has no TLS client)"),
    ("HTTPS://example.com/", "https:// is not supported yet"),
    ("ftp://example.com/", "scheme 'ftp' is not supported; use http://"),
    ("example.com/hook", "expected http://host[:port]/path"),
    ("http:/example.com", "expected http://host[:port]/path"),
    ("http://user:pw@example.com/", "credentials in the URL (user@host) are not supported"),
    ("http://example.com/a#frag", "a fragment (#...) is never sent"),
    ("http://example.com#", "a fragment (#...) is never sent"),
    ("http:///path", "no host"),
    ("http://:80/", "no host"),
    ("http://bücher.example/", "host 'bücher.example' is not ASCII; write its IDNA form"),
    ("http://exa mple.com/", "host 'exa mple.com' is not a valid host name"),
    ("http://a..b/", "host 'a..b' is not a valid host name"),
    ("http://a%2eb/", "host 'a%2eb' is not a valid host name"),
    ("http://example.com:0/", "port '0' is not a number 1..65535"),
    ("http://example.com:65536/", "port '65536' is not a number 1..65535"),
    ("http://example.com:8o/", "port '8o' is not a number"),
    ("http://example.com:-1/", "port '-1' is not a number"),
    ("http://example.com:0000080/", "port '0000080' is not a number"),
    ("http://example.com:" + "9" * 5000 + "/", "is not a number 1..65535"),
    ("http://example.com:\u0661\u0662/", "port '\u0661\u0662' is not a number"),
    ("http://::1/", "an IPv6 address must be written in brackets"),
    ("http://[::1/", "IPv6 address has no closing ']'"),
    ("http://[::g]/", "[::g] is not an IPv6 address"),
    ("http://[fe80::1%25eth0]/", "IPv6 zone identifiers are not supported"),
    ("http://[::1]x/", "unexpected 'x' after the IPv6 address"),
    ("http://example.com/a b", "the path and query may only hold URI characters"),
    ("http://example.com/caf\u00e9", "the path and query may only hold URI characters"),
    ("http://example.com/%zz", "the path and query may only hold URI characters"),
    ("http://example.com/\r\nX-Evil: 1", "the path and query may only hold URI characters"),
    ("http://example.com\r\n/", "is not a valid host name"),
])
def test_target_parse_refuses(url, message):
    with pytest.raises(ValueError) as info:
        Target.parse(url)
    assert str(info.value).startswith(f"webhook URL {url!r}: ")
    assert message in str(info.value)


host_names = st.from_regex(r"[a-z0-9_-]{1,10}(\.[a-z0-9_-]{1,10}){0,3}", fullmatch=True)
path_chars = st.sampled_from(list("abcXYZ019-._~!$&'()*+,;=:@/?") + ["%2F", "%e9"])


@settings(max_examples=200, deadline=None)
@given(host=st.one_of(host_names, st.ip_addresses().map(str)),
       port=st.integers(1, 65535),
       path=st.lists(path_chars, max_size=20).map(lambda parts: "/" + "".join(parts)))
def test_target_round_trip(host, port, path):
    written = f"[{host}]" if ":" in host else host
    target = Target.parse(f"http://{written}:{port}{path}")
    assert target == Target(host, port, path)
    assert Target.parse(str(target)) == target


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_target_parse_only_raises_value_error(text):
    for url in (text, "http://" + text, "http://h/" + text):
        try:
            target = Target.parse(url)
        except ValueError:
            continue
        assert target.port >= 1 and target.target.startswith("/")
        request = build_request(target, SAMPLE)
        assert parse_request(request)[0][1] == target.target.encode()


# -- signing ---------------------------------------------------------------------

def test_signature_test_vector():
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD) == VECTOR_SIGNATURE


def test_signing_key_forms():
    raw = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    assert signing_key(VECTOR_SECRET) == raw
    assert signing_key(raw) == raw
    assert signing_key("plain secret") == b"plain secret"
    # A string without the prefix is its UTF-8 bytes, not base64.
    assert signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert signing_key("whsec_AAE") == b"\x00\x01"      # unpadded base64
    assert signing_key("whsec_AAE=") == b"\x00\x01"
    assert sign(raw, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD) == VECTOR_SIGNATURE


@pytest.mark.parametrize("secret, message", [
    ("", "webhook secret is empty"),
    (b"", "webhook secret is empty"),
    ("whsec_", "webhook secret is empty"),
    ("whsec_not base64!", "the text after 'whsec_' is not base64"),
    ("whsec_A", "the text after 'whsec_' is not base64"),
])
def test_signing_key_refuses(secret, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        signing_key(secret)


def test_signature_changes_with_every_signed_part():
    base = sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD)
    assert sign(VECTOR_SECRET, VECTOR_ID + "x", VECTOR_TIMESTAMP, VECTOR_PAYLOAD) != base
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP + 1, VECTOR_PAYLOAD) != base
    assert sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD + b" ") != base
    assert sign("whsec_AAE", VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD) != base


# -- single requests ---------------------------------------------------------------

def test_request_bytes_without_secret():
    assert build_request(TARGET, SAMPLE) == SAMPLE_HEAD + b"\r\n" + VECTOR_PAYLOAD


def test_request_bytes_with_secret():
    # The sample carries the test vector's id and body, so at the vector's
    # second the signature is the vector's (the fraction is dropped).
    request = build_request(TARGET, SAMPLE, VECTOR_SECRET, now_s=VECTOR_TIMESTAMP + 0.9)
    assert request == (SAMPLE_HEAD
                       + b"webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\r\n"
                       + b"webhook-timestamp: 1614265330\r\n"
                       + b"webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\r\n"
                       + b"\r\n" + VECTOR_PAYLOAD)


def test_request_extra_headers_come_last():
    request = build_request(TARGET, SAMPLE, extra_headers=[("Authorization", "Bearer t0k"),
                                                           ("X-Env", "a  b")])
    assert request == (SAMPLE_HEAD + b"Authorization: Bearer t0k\r\nX-Env: a  b\r\n"
                       + b"\r\n" + VECTOR_PAYLOAD)


def test_request_minimal_record():
    delivery = Delivery(0, 0, 0, "t", None, b"")
    assert build_request(Target.parse("http://[::1]/"), delivery) == (
        b"POST / HTTP/1.1\r\n"
        b"Host: [::1]\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: 0\r\n"
        b"Idempotency-Key: 0-0\r\n"
        b"X-Pushcore-Topic: t\r\n"
        b"X-Pushcore-Partition: 0\r\n"
        b"X-Pushcore-Offset: 0\r\n"
        b"X-Pushcore-Time: 0\r\n"
        b"\r\n")


def test_signing_needs_now():
    with pytest.raises(ValueError, match=r"signing needs now_s \(the attempt's time\)"):
        build_request(TARGET, SAMPLE, VECTOR_SECRET)


@pytest.mark.parametrize("msg_id, key", [
    (None, "3-42"),
    (b"", "3-42"),
    (b"order-17", "order-17"),
    (b"order.17", "order%2E17"),
    (b"50%", "50%25"),
    (b"a b", "a%20b"),
    (b"caf\xc3\xa9", "caf%C3%A9"),
    (b"\xff\x00\x7f\t", "%FF%00%7F%09"),
    (b"~!#$&'()*+,/:;=?@[]^_`{|}\"<>\\", "~!#$&'()*+,/:;=?@[]^_`{|}\"<>\\"),
    # Ids that read like the keys pushcore makes up get their first digit encoded.
    (b"3-42", "%33-42"),
    (b"0-5-9", "%30-5-9"),
    (b"3-42-", "3-42-"),
    (b"-3-42", "-3-42"),
    (b"3--42", "3--42"),
    (b"342", "342"),
    (b"3-x", "3-x"),
])
def test_idempotency_key(msg_id, key):
    assert idempotency_key(Delivery(3, 42, 0, "t", msg_id, b"")) == key


@pytest.mark.parametrize("content_type, sent", [
    (None, "application/octet-stream"),
    ("", "application/octet-stream"),
    ("text/plain", "text/plain"),
    ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
    ('application/json;profile="a b;c";v=1', 'application/json;profile="a b;c";v=1'),
    ("text/plain;", "text/plain;"),
    ("json", "application/octet-stream"),
    ("text/plain ", "application/octet-stream"),
    ("text/pl\u00e4in", "application/octet-stream"),
    ("text/plain\r\nX-Evil: 1", "application/octet-stream"),
    ("text/plain; charset=\"utf-8", "application/octet-stream"),
])
def test_content_type_property(content_type, sent):
    delivery = Delivery(0, 0, 0, "t", None, b"", content_type)
    _, fields, _ = parse_request(build_request(TARGET, delivery))
    assert header(fields, "content-type") == sent


def test_delivery_from_record():
    props = _frame.encode_properties({"content_type": "text/csv",
                                      "user_property": [("id", "m-1")]})
    record = decode_record(encode_record(1700000000123, "a/b", b"x,y", qos=1, msg_id=b"m-1",
                                         client_id="dev", properties=props))
    assert Delivery.from_record(record, 2, 9) == Delivery(2, 9, 1700000000123, "a/b", b"m-1",
                                                         b"x,y", "text/csv")
    bare = decode_record(encode_record(5, "t", b""))
    assert Delivery.from_record(bare, 0, 1) == Delivery(0, 1, 5, "t", None, b"", None)


# -- header injection ---------------------------------------------------------------

HEADER_NAMES = ["host", "content-type", "content-length", "idempotency-key", "x-pushcore-topic",
                "x-pushcore-partition", "x-pushcore-offset", "x-pushcore-time"]
SIGNED_NAMES = HEADER_NAMES + ["webhook-id", "webhook-timestamp", "webhook-signature"]


def test_topic_and_id_with_crlf_are_encoded():
    evil = Delivery(1, 2, 3, "a\r\nX-Evil: 1\r\n\r\nGET / HTTP/1.1", b"id\r\nX-Evil: 2", b"body",
                    "text/plain\r\nX-Evil: 3")
    request = build_request(TARGET, evil, "k", now_s=10)
    assert request.count(b"\r\n") == 13       # request line, 11 fields, blank line
    _, fields, body = parse_request(request)
    assert [name for name, _ in fields] == SIGNED_NAMES
    assert header(fields, "x-pushcore-topic") == "a%0D%0AX-Evil:%201%0D%0A%0D%0AGET%20/%20HTTP/1.1"
    assert header(fields, "idempotency-key") == "id%0D%0AX-Evil:%202"
    assert header(fields, "webhook-id") == "id%0D%0AX-Evil:%202"
    assert header(fields, "content-type") == "application/octet-stream"
    assert body == b"body"


@pytest.mark.parametrize("extra, message", [
    ([("X-A", "1\r\nX-Evil: 1")], "extra header 'X-A': value '1\\r\\nX-Evil: 1' must be visible"),
    ([("X-A", "1\n")], "must be visible ASCII"),
    ([("X-A", "\x00")], "must be visible ASCII"),
    ([("X-A", " padded")], "must be visible ASCII without leading or trailing whitespace"),
    ([("X-A", "caf\u00e9")], "must be visible ASCII"),
    ([("X-A: 1\r\nX-B", "2")], "extra header name 'X-A: 1\\r\\nX-B' is not an HTTP token"),
    ([("", "v")], "extra header name '' is not an HTTP token"),
    ([("X A", "v")], "is not an HTTP token"),
    ([("Content-Length", "0")], "extra header 'Content-Length' is set by pushcore"),
    ([("host", "evil")], "extra header 'host' is set by pushcore"),
    ([("Transfer-Encoding", "chunked")], "is set by pushcore"),
    ([("Connection", "close")], "is set by pushcore"),
    ([("Expect", "100-continue")], "is set by pushcore"),
    ([("Webhook-Signature", "v1,x")], "is set by pushcore"),
    ([("X-Pushcore-Offset", "1")], "is set by pushcore"),
])
def test_extra_headers_refused(extra, message):
    with pytest.raises(ValueError) as info:
        build_request(TARGET, SAMPLE, extra_headers=extra)
    assert message in str(info.value)


deliveries = st.builds(
    Delivery,
    partition=st.integers(0, 1023),
    offset=st.integers(0, 2**64 - 1),
    time_ms=st.integers(0, 2**64 - 1),
    topic=st.text(max_size=30),
    msg_id=st.none() | st.binary(max_size=30),
    payload=st.binary(max_size=100),
    content_type=st.none() | st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(delivery=deliveries, secret=st.none() | st.binary(min_size=1, max_size=40))
def test_any_record_makes_one_well_formed_request(delivery, secret):
    request = build_request(TARGET, delivery, secret, now_s=1700000000)
    (method, target, version), fields, body = parse_request(request)
    assert (method, target, version) == (b"POST", b"/in?src=pushcore", b"HTTP/1.1")
    assert [name for name, _ in fields] == (SIGNED_NAMES if secret else HEADER_NAMES)
    assert body == delivery.payload
    assert unquote(header(fields, "x-pushcore-topic"), errors="strict") == delivery.topic
    key = header(fields, "idempotency-key")
    if not delivery.msg_id:
        assert key == f"{delivery.partition}-{delivery.offset}"
    else:
        assert "." not in key
        assert unquote_to_bytes(key) == delivery.msg_id
    assert header(fields, "x-pushcore-offset") == str(delivery.offset)
    if secret:
        assert header(fields, "webhook-id") == key
        key_text = "whsec_" + base64.b64encode(secret).decode()
        assert verify(key_text, fields, body)


# -- batches -------------------------------------------------------------------------

def test_batch_request_bytes():
    batch = [Delivery(3, 7, 1000, "a/b", b"m.1", b'{"v":1}', "application/json"),
             Delivery(3, 8, 1001, "a/\u00e9", None, b"\xff\x00")]
    body = (b'{"id":"m%2E1","topic":"a/b","partition":3,"offset":7,"time_ms":1000,'
            b'"payload":"{\\"v\\":1}","content_type":"application/json"}\n'
            b'{"id":"3-8","topic":"a/\xc3\xa9","partition":3,"offset":8,"time_ms":1001,'
            b'"payload_b64":"/wA="}\n')
    signature = sign(VECTOR_SECRET, "3-7-8", 1700000000, body)
    assert build_batch_request(TARGET, batch, VECTOR_SECRET, now_s=1700000000.5) == (
        b"POST /in?src=pushcore HTTP/1.1\r\n"
        b"Host: hooks.example:8080\r\n"
        b"Content-Type: application/x-ndjson\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Idempotency-Key: 3-7-8\r\n"
        b"X-Pushcore-Partition: 3\r\n"
        b"X-Pushcore-Count: 2\r\n"
        b"webhook-id: 3-7-8\r\n"
        b"webhook-timestamp: 1700000000\r\n"
        + f"webhook-signature: {signature}\r\n".encode()
        + b"\r\n" + body)


@pytest.mark.parametrize("batch, message", [
    ([], "a batch needs at least one record"),
    ([Delivery(0, 1, 0, "t", None, b""), Delivery(1, 2, 0, "t", None, b"")],
     "a batch holds one partition: got 0 and 1"),
    ([Delivery(0, 1, 0, "t", None, b""), Delivery(0, 3, 0, "t", None, b"")],
     "a batch holds consecutive offsets: 3 follows 1"),
    ([Delivery(0, 2, 0, "t", None, b""), Delivery(0, 1, 0, "t", None, b"")],
     "a batch holds consecutive offsets: 1 follows 2"),
])
def test_batch_refused(batch, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_batch_request(TARGET, batch)


@st.composite
def batches(draw):
    partition = draw(st.integers(0, 1023))
    first = draw(st.integers(0, 2**63))
    items = draw(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.text(max_size=20),
                                    st.none() | st.binary(max_size=20),
                                    st.binary(max_size=40) | st.text(max_size=40).map(str.encode),
                                    st.none() | st.text(max_size=10)),
                          min_size=1, max_size=8))
    return [Delivery(partition, first + i, time_ms, topic, msg_id, payload, content_type)
            for i, (time_ms, topic, msg_id, payload, content_type) in enumerate(items)]


@settings(max_examples=300, deadline=None)
@given(batch=batches(), secret=st.none() | st.binary(min_size=1, max_size=40))
def test_batch_round_trip(batch, secret):
    request = build_batch_request(TARGET, batch, secret, now_s=1700000000)
    _, fields, body = parse_request(request)
    key = f"{batch[0].partition}-{batch[0].offset}-{batch[-1].offset}"
    assert header(fields, "idempotency-key") == key
    assert header(fields, "content-type") == "application/x-ndjson"
    assert header(fields, "x-pushcore-count") == str(len(batch))
    assert body.endswith(b"\n") and body.count(b"\n") == len(batch)
    for line, delivery in zip(body.split(b"\n"), batch):
        item = json.loads(line)
        payload = (item["payload"].encode() if "payload" in item
                   else base64.b64decode(item["payload_b64"]))
        assert (item["partition"], item["offset"], item["time_ms"], item["topic"], payload,
                item.get("content_type")) == (delivery.partition, delivery.offset,
                                              delivery.time_ms, delivery.topic,
                                              delivery.payload, delivery.content_type)
        if not delivery.msg_id:
            assert item["id"] == f"{delivery.partition}-{delivery.offset}"
        else:
            assert unquote_to_bytes(item["id"]) == delivery.msg_id
        assert item["id"] == idempotency_key(delivery)
    if secret:
        assert verify("whsec_" + base64.b64encode(secret).decode(), fields, body)


# -- outcomes --------------------------------------------------------------------------

POLICY = RetryPolicy()


@pytest.mark.parametrize("status, outcome", [
    (200, Outcome(SUCCESS, None, "200 OK")),
    (204, Outcome(SUCCESS, None, "204 No Content")),
    (299, Outcome(SUCCESS, None, "299")),
    (301, Outcome(DEAD, None, "301 Moved Permanently: redirect not followed")),
    (307, Outcome(DEAD, None, "307 Temporary Redirect: redirect not followed")),
    (400, Outcome(DEAD, None, "400 Bad Request: client errors are not retried")),
    (401, Outcome(DEAD, None, "401 Unauthorized: client errors are not retried")),
    (404, Outcome(DEAD, None, "404 Not Found: client errors are not retried")),
    (410, Outcome(DEAD, None, "410 Gone: client errors are not retried")),
    (499, Outcome(DEAD, None, "499: client errors are not retried")),
    (408, Outcome(RETRY, None, "408 Request Timeout")),
    (429, Outcome(RETRY, None, "429 Too Many Requests")),
    (500, Outcome(RETRY, None, "500 Internal Server Error")),
    (502, Outcome(RETRY, None, "502 Bad Gateway")),
    (503, Outcome(RETRY, None, "503 Service Unavailable")),
    (599, Outcome(RETRY, None, "599")),
    (100, Outcome(RETRY, None, "100 Continue: unexpected status")),
    (600, Outcome(RETRY, None, "600: unexpected status")),
])
def test_classify_table(status, outcome):
    assert classify(status, [], 0, POLICY) == outcome


def test_classify_retry_4xx_policy():
    policy = RetryPolicy(retry_4xx=True)
    assert classify(404, [], 0, policy) == Outcome(RETRY, None, "404 Not Found")
    assert classify(400, [(b"retry-after", b"5")], 0, policy) == Outcome(RETRY, 5.0,
                                                                          "400 Bad Request")
    assert classify(301, [], 0, policy).kind == DEAD
    assert classify(204, [], 0, policy).kind == SUCCESS


def test_classify_redirect_names_location():
    outcome = classify(302, [(b"location", b"http://elsewhere/\xff")], 0, POLICY)
    assert outcome == Outcome(DEAD, None,
                              "302 Found: redirect to http://elsewhere/\\xff not followed")


NOW = 784111777.0   # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.mark.parametrize("headers, delay", [
    ([(b"retry-after", b"120")], 120.0),
    ([(b"retry-after", b"  7\t")], 7.0),
    ([(b"retry-after", b"0")], 0.0),
    ([(b"retry-after", b"Sun, 06 Nov 1994 08:50:37 GMT")], 60.0),
    ([(b"retry-after", b"Sunday, 06-Nov-94 08:50:37 GMT")], 60.0),
    ([(b"retry-after", b"Sun Nov  6 08:50:37 1994")], 60.0),
    ([(b"retry-after", b"Sun, 06 Nov 1994 08:00:00 GMT")], 0.0),     # past: now
    ([(b"retry-after", b"999999")], 3600.0),                           # capped
    ([(b"retry-after", b"9" * 5000)], 3600.0),
    ([(b"retry-after", b"Mon, 06 Nov 2094 08:49:37 GMT")], 3600.0),
    ([], None),
    ([(b"retry-after", b"")], None),
    ([(b"retry-after", b"-5")], None),
    ([(b"retry-after", b"1.5")], None),
    ([(b"retry-after", b"+5")], None),
    ([(b"retry-after", b"5 s")], None),
    ([(b"retry-after", b"\xd9\xa1")], None),                          # Arabic-Indic 1
    ([(b"retry-after", b"sun, 06 nov 1994 08:50:37 gmt")], None),     # case-sensitive
    ([(b"retry-after", b"Sun, 6 Nov 1994 08:50:37 GMT")], None),
    ([(b"retry-after", b"Sun, 06 Nov 1994 08:50:37 UTC")], None),
    ([(b"retry-after", b"Sun, 31 Nov 1994 08:50:37 GMT")], None),
    ([(b"retry-after", b"Sun, 29 Feb 1995 08:50:37 GMT")], None),
    ([(b"retry-after", b"Sun, 06 Nov 1994 24:00:00 GMT")], None),
    ([(b"retry-after", b"Sun, 06 Nov 1994 08:60:00 GMT")], None),
    ([(b"retry-after", b"Sun, 06 Nov 0000 08:50:37 GMT")], None),
    ([(b"retry-after", b"Sun, 06 Nov 1994 08:50:37 GMT, 5")], None),
    ([(b"retry-after", b"5"), (b"retry-after", b"6")], None),          # repeated
])
def test_classify_retry_after(headers, delay):
    assert classify(503, headers, NOW, POLICY) == Outcome(RETRY, delay,
                                                         "503 Service Unavailable")


def test_retry_after_ignored_when_not_retrying():
    headers = [(b"retry-after", b"60")]
    assert classify(200, headers, NOW, POLICY).retry_after_s is None
    assert classify(404, headers, NOW, POLICY).retry_after_s is None
    assert classify(429, headers, NOW, POLICY).retry_after_s == 60.0


def test_retry_after_leap_second_and_fraction():
    assert parse_retry_after(b"Sun, 06 Nov 1994 08:49:60 GMT", NOW) == 23.0
    assert parse_retry_after(b"Sun, 06 Nov 1994 08:49:38 GMT", NOW - 0.25) == 1.25


@pytest.mark.parametrize("year_digits, now_year, year", [
    (b"94", 2025, 1994),
    (b"75", 2025, 2075),      # 50 years ahead: still the future
    (b"76", 2025, 1976),      # more than 50 years ahead: the past century
    (b"00", 2025, 2000),
    (b"99", 2060, 2099),
    (b"10", 2060, 2110),      # exactly 50 years ahead
    (b"11", 2060, 2011),
    (b"30", 2080, 2130),
    (b"31", 2080, 2031),
])
def test_rfc850_two_digit_year(year_digits, now_year, year):
    now = datetime(now_year, 1, 1, tzinfo=timezone.utc).timestamp()
    # The day name is not checked against the date.
    value = b"Monday, 01-Jan-" + year_digits + b" 00:00:00 GMT"
    expected = datetime(year, 1, 1, tzinfo=timezone.utc).timestamp() - now
    assert parse_retry_after(value, now) == max(0.0, expected)


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


@settings(max_examples=300, deadline=None)
@given(when=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2999, 12, 31))
       .map(lambda d: d.replace(microsecond=0, tzinfo=timezone.utc)),
       ahead=st.integers(0, 10**6))
def test_http_dates_round_trip(when, ahead):
    now = when.timestamp() - ahead
    imf = email.utils.format_datetime(when, usegmt=True).encode()
    day, month = DAYS[when.weekday()], MONTHS[when.month - 1]
    asctime = f"{day[:3]} {month} {when.day:2d} {when:%H:%M:%S} {when.year}".encode()
    assert parse_retry_after(imf, now) == ahead
    assert parse_retry_after(asctime, now) == ahead
    if ahead <= 50 * 365 * 86400:
        rfc850 = f"{day}, {when.day:02d}-{month}-{when.year % 100:02d} {when:%H:%M:%S} GMT"
        assert parse_retry_after(rfc850.encode(), now) == ahead


@settings(max_examples=500, deadline=None)
@given(value=st.binary(max_size=40), now=st.floats(0, 4e9))
def test_retry_after_any_bytes(value, now):
    delay = parse_retry_after(value, now)
    assert delay is None or delay >= 0.0


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_classify_error(kind):
    assert classify_error(kind) == Outcome(RETRY, None, ERROR_KINDS[kind])
    assert classify_error(kind, "errno 111") == Outcome(RETRY, None,
                                                        f"{ERROR_KINDS[kind]}: errno 111")


def test_classify_error_table():
    assert classify_error("connect_refused", "[Errno 111]") == Outcome(
        RETRY, None, "connection refused: [Errno 111]")
    assert classify_error("response_timeout").reason == "response timed out"
    with pytest.raises(ValueError, match="unknown delivery error kind 'oops'; expected one of"):
        classify_error("oops")


# -- retry schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"base_s": -1}, "base_s must be >= 0, got -1"),
    ({"factor": 0.5}, "factor must be >= 1, got 0.5"),
    ({"cap_s": float("nan")}, "cap_s must be >= 0, got nan"),
    ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
    ({"max_retry_after_s": -0.1}, "max_retry_after_s must be >= 0, got -0.1"),
])
def test_retry_policy_refuses(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RetryPolicy(**kwargs)


def test_backoff_is_full_jitter_over_capped_exponential():
    rng, twin = random.Random(7), random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 3 ** attempt)
        assert backoff(attempt, 0.5, 3, 30.0, rng) == twin.uniform(0.0, ceiling)


def test_backoff_edges():
    assert 0.0 <= backoff(10**6, 1.0, 2.5, 60.0, random.Random(1)) <= 60.0
    assert 0.0 <= backoff(10**6, 1.0, 2, 60.0, random.Random(1)) <= 60.0
    assert backoff(5, 0.0, 2, 60.0, random.Random(1)) == 0.0
    assert backoff(3, 1.0, 1, 60.0, random.Random(1)) <= 1.0
    with pytest.raises(ValueError, match="attempt must be >= 0, got -1"):
        backoff(-1, 1.0, 2, 60.0)


def bound(attempt, base, factor, cap):
    try:
        return min(cap, base * factor ** attempt)
    except OverflowError:
        return cap


@settings(max_examples=300, deadline=None)
@given(attempt=st.integers(0, 2000), base=st.floats(0.0, 100.0), factor=st.floats(1.0, 10.0),
       cap=st.floats(0.0, 1e6), seed=st.integers(0, 2**32))
def test_backoff_bounds(attempt, base, factor, cap, seed):
    delay = backoff(attempt, base, factor, cap, random.Random(seed))
    assert 0.0 <= delay <= bound(attempt, base, factor, cap)


@settings(max_examples=50, deadline=None)
@given(attempt=st.integers(0, 40), base=st.floats(0.01, 10.0), factor=st.floats(1.0, 4.0),
       cap=st.floats(0.1, 3600.0), seed=st.integers(0, 2**32))
def test_backoff_mean_is_half_the_bound(attempt, base, factor, cap, seed):
    rng = random.Random(seed)
    draws = 4000
    mean = sum(backoff(attempt, base, factor, cap, rng) for _ in range(draws)) / draws
    # Uniform on [0, b]: mean b/2, standard error b/sqrt(12 * draws) < 0.005 b.
    assert abs(mean - bound(attempt, base, factor, cap) / 2) <= 0.03 * bound(attempt, base,
                                                                              factor, cap)


def test_retry_delay_honours_retry_after():
    policy = RetryPolicy(base_s=1.0, factor=2.0, cap_s=8.0)
    rng, twin = random.Random(3), random.Random(3)
    plain = Outcome(RETRY, None, "503 Service Unavailable")
    assert retry_delay(plain, 2, policy, rng) == twin.uniform(0.0, 4.0)
    assert retry_delay(Outcome(RETRY, 100.0, "429"), 2, policy, rng) == 100.0
    twin.uniform(0.0, 4.0)
    assert retry_delay(Outcome(RETRY, 0.0, "429"), 2, policy, rng) == twin.uniform(0.0, 4.0)


# -- a real receiver -------------------------------------------------------------------------

def test_stdlib_server_receives_signed_request():
    seen = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = Target.parse(f"http://127.0.0.1:{server.server_address[1]}/hook?x=1")
        evil = Delivery(1, 5, 99, "a/\u00e9\r\nX-Evil: 1", b"i.d\n", b"\x00payload")
        with socket.create_connection(target.address, timeout=5) as conn:
            for delivery in (evil, SAMPLE):
                conn.sendall(build_request(target, delivery, VECTOR_SECRET, now_s=1700000000))
                reply = b""
                while b"\r\n\r\n" not in reply:
                    chunk = conn.recv(4096)
                    assert chunk
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 204 ")
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 2
    path, headers, body = seen[0]
    assert path == "/hook?x=1"
    assert body == b"\x00payload"
    assert "X-Evil" not in headers
    assert headers["X-Pushcore-Topic"] == "a/%C3%A9%0D%0AX-Evil:%201"
    assert headers["Idempotency-Key"] == headers["webhook-id"] == "i%2Ed%0A"
    fields = [(name.lower(), value) for name, value in headers.items()]
    assert verify(VECTOR_SECRET, fields, body)
    assert seen[1][2] == VECTOR_PAYLOAD


# -- the C request writer against the reference --------------------------------------

@st.composite
def stored_records(draw):
    """(record bytes, the Delivery it stands for minus partition and offset)."""
    time_ms = draw(st.integers(0, 2**64 - 1))
    topic = draw(st.text(max_size=30))
    msg_id = draw(st.none() | st.binary(max_size=20) | st.from_regex(rb"[0-9]{1,3}(-[0-9]{1,3}){1,2}",
                                                                      fullmatch=True))
    payload = draw(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
    props = {}
    # MQTT 5.0 §1.5.4: no control characters in a property string.
    mqtt_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
    if draw(st.booleans()):
        props["content_type"] = draw(st.sampled_from(["application/json", "text/plain; a=b"])
                                     | mqtt_text)
    if draw(st.booleans()):
        props["user_property"] = [("k", draw(mqtt_text))]
    properties = _frame.encode_properties(props) if props else b""
    record = encode_record(time_ms, topic, payload, qos=draw(st.integers(0, 2)), msg_id=msg_id,
                           key=draw(st.none() | st.binary(max_size=5)),
                           client_id=draw(st.text(max_size=5)), properties=properties)
    return record


WRITER_EXTRA = (("Authorization", "Bearer t0k3n"), ("X-Env", "test"))


@settings(max_examples=400, deadline=None)
@given(record=stored_records(), partition=st.integers(0, 1023),
       offset=st.integers(0, 2**64 - 1), secret=st.none() | st.binary(min_size=1, max_size=40),
       now_s=st.floats(0, 2e9), extra=st.sampled_from([(), WRITER_EXTRA]))
def test_request_writer_single_is_build_request(record, partition, offset, secret, now_s, extra):
    delivery = Delivery.from_record(decode_record(record), partition, offset)
    writer = request_writer(TARGET, secret, extra)
    assert writer.single(record, partition, offset, now_s) == build_request(
        TARGET, delivery, secret, now_s=now_s, extra_headers=extra)


@settings(max_examples=300, deadline=None)
@given(records=st.lists(stored_records(), min_size=1, max_size=6),
       partition=st.integers(0, 1023), first=st.integers(0, 2**63),
       secret=st.none() | st.binary(min_size=1, max_size=40), now_s=st.floats(0, 2e9),
       extra=st.sampled_from([(), WRITER_EXTRA]))
def test_request_writer_batch_is_build_batch_request(records, partition, first, secret, now_s,
                                                     extra):
    deliveries = [Delivery.from_record(decode_record(r), partition, first + i)
                  for i, r in enumerate(records)]
    writer = request_writer(TARGET, secret, extra)
    assert writer.batch(records, partition, first, now_s) == build_batch_request(
        TARGET, deliveries, secret, now_s=now_s, extra_headers=extra)


def test_request_writer_reuses_its_buffers_between_sizes():
    writer = request_writer(TARGET)
    big = encode_record(1, "t", b"x" * 100_000)
    small = encode_record(2, "t", b"y")
    for record in (big, small, big):
        assert writer.single(record, 0, 1, 0.0) == build_request(
            TARGET, Delivery.from_record(decode_record(record), 0, 1))
    assert writer.batch([small, big, small], 0, 5, 0.0) == build_batch_request(
        TARGET, [Delivery.from_record(decode_record(r), 0, 5 + i)
                 for i, r in enumerate((small, big, small))])


@pytest.mark.parametrize("record, message", [
    (b"", "not a version 1 record"),
    (b"\x02" + bytes(13), "not a version 1 record"),
    (encode_record(1, "topic", b"")[:13], "not a version 1 record"),
    (encode_record(1, "topic/long", b"")[:14], "truncated record"),
    (encode_record(1, "t", b"", msg_id=b"abc")[:17], "truncated record"),
])
def test_request_writer_refuses_a_broken_record(record, message):
    with pytest.raises(ValueError, match=message):
        request_writer(TARGET).single(record, 0, 0, 0.0)
    with pytest.raises(ValueError, match=message):
        request_writer(TARGET).batch([record], 0, 0, 0.0)
