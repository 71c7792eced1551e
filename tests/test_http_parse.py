"""HTTP/1.1 response parser (pushcore._http): events, framing, splits, errors.

Single responses of each framing (RFC 9112 §6.3), splits at every byte
offset, many responses in one buffer, every error with its reason, and
hypothesis round trips of responses built by a reference encoder.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushcore._http import Data, EndOfMessage, Response, ResponseParser
from pushcore.errors import HTTPParseError

END = EndOfMessage()


def resp(status=200, reason="OK", headers=(), version=(1, 1), keep_alive=True,
         content_length=0, chunked=False):
    return Response(status, reason, list(headers), version, keep_alive, content_length, chunked)


def merge(events):
    """Join adjacent Data events: how a body is cut into Data depends on the feeds."""
    out = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def parse(data, **kwargs):
    """Feed data in one call to a fresh parser; everything must be consumed."""
    parser = ResponseParser(**kwargs)
    events, consumed = parser.feed(data, 0, len(data))
    assert consumed == len(data)
    return events


def feed_compacting(parser, chunks):
    """Feed chunks as a receive buffer does: append, feed, drop what was consumed."""
    buf = bytearray()
    events = []
    for chunk in chunks:
        buf += chunk
        got, consumed = parser.feed(buf, 0, len(buf))
        events.extend(got)
        del buf[:consumed]
    return events, bytes(buf)


def feed_sliding(parser, chunks):
    """Feed chunks into one growing buffer, moving the window start instead."""
    buf = bytearray()
    start = 0
    events = []
    for chunk in chunks:
        buf += chunk
        got, consumed = parser.feed(memoryview(buf), start, len(buf))
        events.extend(got)
        start += consumed
    return events, bytes(buf[start:])


def split_at(data, cuts):
    cuts = sorted(set(cuts))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def assert_every_split(data, expected, **kwargs):
    """Both feeding styles, cut at every offset, give the expected events."""
    for i in range(len(data) + 1):
        for feed in (feed_compacting, feed_sliding):
            events, rest = feed(ResponseParser(**kwargs), [data[:i], data[i:]])
            assert merge(events) == expected, (i, feed.__name__)
            assert rest == b""


def parse_error(data, **kwargs):
    """The reason a fresh parser fails with on data fed in one call."""
    parser = ResponseParser(**kwargs)
    with pytest.raises(HTTPParseError) as info:
        events, consumed = parser.feed(data, 0, len(data))
        parser.feed(data, consumed, consumed)
    return info.value.reason


def split_errors(data, **kwargs):
    """The reasons raised with data cut at every offset (a deferred error is
    collected by one more, empty, feed)."""
    reasons = set()
    for i in range(len(data) + 1):
        parser = ResponseParser(**kwargs)
        with pytest.raises(HTTPParseError) as info:
            _, rest = feed_compacting(parser, [data[:i], data[i:]])
            parser.feed(rest, 0, 0)
        reasons.add(info.value.reason)
    return reasons


# ---------------------------------------------------------------------------
# One response of each framing

CL_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
               b"hello")
CL_EVENTS = [resp(headers=[(b"content-type", b"text/plain"), (b"content-length", b"5")],
                  content_length=5), Data(b"hello"), END]

CHUNKED_RESPONSE = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;name=value\r\nhello\r\n"
                    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
                    b"0\r\nExpires: never\r\nX-Checksum: 1\r\n\r\n")
CHUNKED_EVENTS = [resp(headers=[(b"transfer-encoding", b"chunked")], content_length=None,
                       chunked=True),
                  Data(b"helloabcdefghijklmnopqrstuvwxyz"), END]

CLOSE_RESPONSE = b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nthe body runs to the close"
CLOSE_EVENTS = [resp(headers=[(b"server", b"old")], version=(1, 0), keep_alive=False,
                     content_length=None), Data(b"the body runs to the close")]


def test_content_length_response():
    assert parse(CL_RESPONSE) == CL_EVENTS


def test_content_length_response_every_split():
    assert_every_split(CL_RESPONSE, CL_EVENTS)


def test_chunked_response():
    assert merge(parse(CHUNKED_RESPONSE)) == CHUNKED_EVENTS


def test_chunked_response_every_split():
    assert_every_split(CHUNKED_RESPONSE, CHUNKED_EVENTS)


def test_chunked_response_emits_each_chunk_as_it_is_parsed():
    assert parse(CHUNKED_RESPONSE)[1:] == [
        Data(b"hello"), Data(b"abcdefghijklmnopqrstuvwxyz"), END]


def test_chunked_response_without_trailers_or_extensions():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert parse(data) == [
        resp(headers=[(b"transfer-encoding", b"chunked")], content_length=None, chunked=True),
        Data(b"abc"), END]


def test_chunk_extensions_with_whitespace_and_quoted_values_are_ignored():
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3 ; a=1 ;b=\"x y\"\r\nabc\r\n0;last\r\n\r\n")
    assert parse(data)[1:] == [Data(b"abc"), END]


def test_chunk_size_is_hex_in_either_case_with_leading_zeros():
    body = bytes(range(256)) * 2
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"00fF\r\n" + body[:255] + b"\r\n101\r\n" + body[255:] + b"\r\n000\r\n\r\n")
    assert merge(parse(data))[1:] == [Data(body), END]


def test_read_until_close_response_ends_at_eof():
    parser = ResponseParser()
    events, consumed = parser.feed(CLOSE_RESPONSE, 0, len(CLOSE_RESPONSE))
    assert (events, consumed) == (CLOSE_EVENTS, len(CLOSE_RESPONSE))
    assert parser.eof() == END


def test_read_until_close_response_every_split():
    for i in range(len(CLOSE_RESPONSE) + 1):
        parser = ResponseParser()
        events, rest = feed_compacting(parser, [CLOSE_RESPONSE[:i], CLOSE_RESPONSE[i:]])
        assert rest == b""
        assert merge(events + [parser.eof()]) == CLOSE_EVENTS + [END]


def test_read_until_close_in_http_11():
    data = b"HTTP/1.1 200 OK\r\n\r\nxyz"
    parser = ResponseParser()
    assert parser.feed(data, 0, len(data)) == (
        [resp(keep_alive=False, content_length=None), Data(b"xyz")], len(data))
    assert parser.eof() == END


def test_content_length_zero_ends_at_the_head():
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == [
        resp(headers=[(b"content-length", b"0")], content_length=0), END]


@pytest.mark.parametrize("status, reason", [(204, "No Content"), (304, "Not Modified")])
def test_204_and_304_have_no_body_whatever_the_headers_say(status, reason):
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: 7\r\n\r\n".encode()
    data = head + CL_RESPONSE
    assert parse(data) == [
        resp(status, reason, [(b"content-length", b"7")], content_length=0), END] + CL_EVENTS


def test_response_to_head_has_no_body_and_the_flag_lasts_one_response():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    parser = ResponseParser(expect_body=False)
    assert parser.expect_body is False
    events, consumed = parser.feed(head + head + b"hello", 0, len(head) * 2 + 5)
    assert consumed == len(head) * 2 + 5
    cl5 = resp(headers=[(b"content-length", b"5")], content_length=0)
    assert events == [cl5, END, resp(headers=[(b"content-length", b"5")], content_length=5),
                      Data(b"hello"), END]
    assert parser.expect_body is True


def test_expect_body_setter_applies_to_the_next_response():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    parser = ResponseParser()
    assert parser.feed(head + b"hello", 0, len(head) + 5)[1] == len(head) + 5
    parser.expect_body = False
    assert parser.feed(head, 0, len(head)) == (
        [resp(headers=[(b"content-length", b"5")], content_length=0), END], len(head))


def test_interim_100_then_final_response():
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + \
        CL_RESPONSE
    expected = [resp(100, "Continue"), resp(103, "Early Hints", [(b"link", b"</a>")])] + \
        CL_EVENTS
    assert parse(data) == expected
    assert_every_split(data, expected)


def test_interim_response_keeps_expect_body_for_the_final_one():
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    assert parse(data, expect_body=False) == [
        resp(100, "Continue"), resp(headers=[(b"content-length", b"3")]), END]


def test_101_ends_http_on_the_connection():
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    parser = ResponseParser()
    events, consumed = parser.feed(data, 0, len(data))
    assert events == [resp(101, "Switching Protocols", [(b"upgrade", b"websocket")],
                           keep_alive=False), END]
    assert consumed == len(data) - 2
    assert parser.feed(data, consumed, consumed) == ([], 0)
    with pytest.raises(HTTPParseError) as info:
        parser.feed(data, consumed, len(data))
    assert info.value.reason == "switched protocols"


# ---------------------------------------------------------------------------
# Status line and headers

@pytest.mark.parametrize("line, status, reason, version", [
    (b"HTTP/1.1 204 No Content", 204, "No Content", (1, 1)),
    (b"HTTP/1.0 200 OK", 200, "OK", (1, 0)),
    (b"HTTP/1.1 200 ", 200, "", (1, 1)),
    (b"HTTP/1.1 200", 200, "", (1, 1)),
    (b"HTTP/1.1 599 What \t ever  ", 599, "What \t ever  ", (1, 1)),
    (b"HTTP/1.1 100 Continue", 100, "Continue", (1, 1)),
    (b"HTTP/1.1 404 Nicht gef\xfcnden", 404, "Nicht gef\xfcnden", (1, 1)),
])
def test_status_lines(line, status, reason, version):
    events = parse(line + b"\r\nContent-Length: 0\r\n\r\n")
    assert (events[0].status, events[0].reason, events[0].version) == (status, reason, version)


def test_headers_are_lower_cased_trimmed_and_kept_in_order():
    data = (b"HTTP/1.1 200 OK\r\n"
            b"X-Empty:\r\n"
            b"Set-Cookie: a=1\r\n"
            b"SET-COOKIE:\t b=2 \t\r\n"
            b"X-Inner:  one  two\tthree \r\n"
            b"X-Tok!#$%&'*+-.^_`|~09: \x80\xff obs-text\r\n"
            b"Content-Length: 0\r\n\r\n")
    assert parse(data)[0].headers == [
        (b"x-empty", b""),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"x-inner", b"one  two\tthree"),
        (b"x-tok!#$%&'*+-.^_`|~09", b"\x80\xff obs-text"),
        (b"content-length", b"0"),
    ]


def test_bare_lf_line_endings_are_accepted():
    data = (b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nhi"
            b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\n2\nhi\n0\nT: 1\n\n")
    expected = [resp(headers=[(b"content-length", b"2"), (b"x-a", b"b")], content_length=2),
                Data(b"hi"), END,
                resp(headers=[(b"transfer-encoding", b"chunked")], content_length=None,
                     chunked=True), Data(b"hi"), END]
    assert parse(data) == expected
    assert_every_split(data, expected)


@pytest.mark.parametrize("version, connection, keep_alive", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive, CLOSE", False),
    (b"1.1", b"keep-alive", True),
    (b"1.1", b"upgrade", True),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b" , KEEP-ALIVE ,", True),
    (b"1.0", b"keep-alive, close", False),
    (b"1.0", b"keep-alive-x", False),
])
def test_connection_persistence(version, connection, keep_alive):
    head = b"HTTP/" + version + b" 200 OK\r\nContent-Length: 0\r\n"
    if connection is not None:
        head += b"Connection: " + connection + b"\r\n"
    assert parse(head + b"\r\n")[0].keep_alive is keep_alive


def test_connection_close_in_a_second_field():
    data = b"HTTP/1.1 200 OK\r\nConnection: te\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert parse(data)[0].keep_alive is False


@pytest.mark.parametrize("fields", [
    [b"Content-Length: 5, 5"],
    [b"Content-Length: 5", b"content-length: 5"],
    [b"Content-Length:5 ,\t05"],
])
def test_duplicate_content_lengths_that_agree(fields):
    data = b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\nhello"
    events = parse(data)
    assert events[0].content_length == 5
    assert events[1:] == [Data(b"hello"), END]


def test_largest_content_length():
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999999999\r\n\r\nab"
    assert parse(data)[0].content_length == 999999999999999999


@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b"gzip, chunked",
                                    b"gzip;q=1 , CHUNKED", b", chunked,"])
def test_transfer_codings_ending_in_chunked(coding):
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n")
    events = parse(data)
    assert (events[0].chunked, events[0].content_length) == (True, None)
    assert events[1:] == [Data(b"hi"), END]


def test_transfer_codings_across_two_fields():
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n")
    assert parse(data)[0].chunked is True


def test_transfer_encoding_overrides_content_length_and_closes():
    data = (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n")
    events = parse(data)
    assert (events[0].chunked, events[0].content_length, events[0].keep_alive) == (
        True, None, False)
    assert events[1:] == [Data(b"hi"), END]


def test_head_of_exactly_max_header_bytes_parses():
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100 + b"\r\nContent-Length: 0\r\n\r\n"
    assert parse(head, max_header_bytes=len(head))[0].headers[0] == (b"x-pad", b"a" * 100)
    assert parse_error(head, max_header_bytes=len(head) - 1) == "head too large"


def test_head_too_large_is_raised_before_its_end_arrives():
    parser = ResponseParser(max_header_bytes=64)
    data = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100
    assert parser.feed(data, 0, 63) == ([], 0)
    with pytest.raises(HTTPParseError) as info:
        parser.feed(data, 0, 64)
    assert info.value.reason == "head too large"


def test_default_max_header_bytes_is_64_kib():
    assert ResponseParser().max_header_bytes == 65536
    head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 65536
    assert parse_error(head) == "head too large"


def test_one_hundred_fields_are_allowed():
    fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(99))
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"
    assert len(parse(data)[0].headers) == 100
    assert parse_error(b"HTTP/1.1 200 OK\r\nX: y\r\n" + fields + b"Content-Length: 0\r\n\r\n") \
        == "too many headers"


# ---------------------------------------------------------------------------
# Buffers, consumption and streams

def test_partial_head_stays_unconsumed():
    parser = ResponseParser()
    for i in range(CL_RESPONSE.index(b"\r\n\r\n") + 4):
        assert parser.feed(CL_RESPONSE, 0, i) == ([], 0)


def test_body_bytes_are_consumed_as_they_arrive():
    parser = ResponseParser()
    head_end = CL_RESPONSE.index(b"\r\n\r\n") + 4
    events, consumed = parser.feed(CL_RESPONSE, 0, head_end + 2)
    assert (events, consumed) == ([CL_EVENTS[0], Data(b"he")], head_end + 2)
    assert parser.feed(CL_RESPONSE, head_end + 2, len(CL_RESPONSE)) == (
        [Data(b"llo"), END], 3)


def test_chunk_line_and_crlf_wait_for_their_ends():
    parser = ResponseParser()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert parser.feed(head + b"a;ext", 0, len(head) + 5) == ([CHUNKED_EVENTS[0]], len(head))
    assert parser.feed(b"a;ext\r\n0123456789\r", 0, 18) == ([Data(b"0123456789")], 17)
    assert parser.feed(b"\r\n0\r\nT: 1\r", 0, 10) == ([], 5)
    assert parser.feed(b"T: 1\r\n\r\n", 0, 8) == ([END], 8)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_takes_a_window_of_any_buffer(kind):
    data = b"junk" + CL_RESPONSE + b"HTTP/1.1"
    parser = ResponseParser()
    assert parser.feed(kind(data), 4, len(data)) == (CL_EVENTS, len(CL_RESPONSE))


@pytest.mark.parametrize("start, end", [(-1, 3), (3, 2), (0, 11)])
def test_feed_rejects_a_bad_window(start, end):
    with pytest.raises(ValueError):
        ResponseParser().feed(b"0123456789", start, end)


def test_empty_feed():
    assert ResponseParser().feed(b"", 0, 0) == ([], 0)


def test_many_responses_back_to_back():
    one_each = (CL_RESPONSE + CHUNKED_RESPONSE + b"HTTP/1.1 204 No Content\r\n\r\n"
                + b"HTTP/1.1 100 Continue\r\n\r\n" + CL_RESPONSE)
    expected_each = (CL_EVENTS + CHUNKED_EVENTS + [resp(204, "No Content"), END]
                     + [resp(100, "Continue")] + CL_EVENTS)
    data = one_each * 40 + CLOSE_RESPONSE
    expected = expected_each * 40 + CLOSE_EVENTS
    parser = ResponseParser()
    events, consumed = parser.feed(data, 0, len(data))
    assert consumed == len(data)
    assert merge(events) == expected
    assert parser.eof() == END
    events, rest = feed_compacting(ResponseParser(), split_at(data, range(0, len(data), 7)))
    assert (merge(events), rest) == (expected, b"")


def test_pipelined_leftover_belongs_to_the_next_response():
    data = CL_RESPONSE + CL_RESPONSE[:20]
    parser = ResponseParser()
    assert parser.feed(data, 0, len(data)) == (CL_EVENTS, len(CL_RESPONSE))
    assert parser.feed(CL_RESPONSE, 0, len(CL_RESPONSE)) == (CL_EVENTS, len(CL_RESPONSE))


def test_a_complete_response_before_bad_bytes_is_returned_and_the_next_feed_raises():
    data = CL_RESPONSE + b"garbage\r\n\r\n"
    parser = ResponseParser()
    assert parser.feed(data, 0, len(data)) == (CL_EVENTS, len(CL_RESPONSE))
    with pytest.raises(HTTPParseError) as info:
        parser.feed(data, len(CL_RESPONSE), len(data))
    assert info.value.reason == "bad status line"
    with pytest.raises(HTTPParseError):
        parser.eof()


def test_the_parser_stays_failed():
    parser = ResponseParser()
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"
    for _ in range(2):
        with pytest.raises(HTTPParseError) as info:
            parser.feed(bad, 0, len(bad))
        assert info.value.reason == "bad content-length"
    with pytest.raises(HTTPParseError) as info:
        parser.feed(CL_RESPONSE, 0, len(CL_RESPONSE))
    assert info.value.reason == "bad content-length"


# ---------------------------------------------------------------------------
# eof()

def test_eof_between_responses_is_clean():
    parser = ResponseParser()
    assert parser.eof() is None
    parser = ResponseParser()
    parser.feed(CL_RESPONSE, 0, len(CL_RESPONSE))
    assert parser.eof() is None
    assert parser.eof() is None


@pytest.mark.parametrize("data, reason", [
    (CL_RESPONSE[:-1], "truncated body"),
    (CL_RESPONSE[:CL_RESPONSE.index(b"\r\n\r\n") + 4], "truncated body"),
    (CHUNKED_RESPONSE[:-2], "truncated body"),
    (CHUNKED_RESPONSE[:-20], "truncated body"),
    (CL_RESPONSE[:10], "truncated head"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "truncated head"),
])
def test_eof_inside_a_response_raises(data, reason):
    parser = ResponseParser()
    parser.feed(data, 0, len(data))
    with pytest.raises(HTTPParseError) as info:
        parser.eof()
    assert info.value.reason == reason
    with pytest.raises(HTTPParseError):
        parser.feed(CL_RESPONSE, 0, len(CL_RESPONSE))


def test_eof_after_101_is_clean():
    data = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    parser = ResponseParser()
    parser.feed(data, 0, len(data))
    assert parser.eof() is None


def test_feeding_after_eof_raises():
    parser = ResponseParser()
    parser.feed(CLOSE_RESPONSE, 0, len(CLOSE_RESPONSE))
    assert parser.eof() == END
    assert parser.feed(b"", 0, 0) == ([], 0)
    with pytest.raises(HTTPParseError) as info:
        parser.feed(b"x", 0, 1)
    assert info.value.reason == "connection closed"


# ---------------------------------------------------------------------------
# Errors: each one with its reason, in one feed and split at every offset

def head(*fields, status=b"HTTP/1.1 200 OK"):
    return status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


CHUNKED_HEAD = head(b"Transfer-Encoding: chunked")

FAILURES = [
    # RFC 9112 §4 status-line
    (b"HTTP/1.1 20 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200XOK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "bad status line"),
    (b"http/1.1 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1  200 OK\r\n\r\n", "bad status line"),
    (b"ICY 200 OK\r\n\r\n", "bad status line"),
    (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 O\x00K\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 O\rK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 O\x7fK\r\n\r\n", "bad status line"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "unsupported version"),
    (b"HTTP/1.2 200 OK\r\n\r\n", "unsupported version"),
    (b"HTTP/0.9 200 OK\r\n\r\n", "unsupported version"),
    (b"HTTP/1.1 099 Low\r\n\r\n", "bad status code"),
    (b"HTTP/1.1 600 High\r\n\r\n", "bad status code"),
    # RFC 9110 §8.6 / RFC 9112 §6.3 rule 5
    (head(b"Content-Length: abc"), "bad content-length"),
    (head(b"Content-Length: -1"), "bad content-length"),
    (head(b"Content-Length: +5"), "bad content-length"),
    (head(b"Content-Length:"), "bad content-length"),
    (head(b"Content-Length: 1 2"), "bad content-length"),
    (head(b"Content-Length: 5,"), "bad content-length"),
    (head(b"Content-Length: 0x10"), "bad content-length"),
    (head(b"Content-Length: 1000000000000000000"), "bad content-length"),
    (head(b"Content-Length: 5, 6"), "conflicting content-length"),
    (head(b"Content-Length: 5", b"Content-Length: 6"), "conflicting content-length"),
    # RFC 9112 §6.1 / §7
    (head(b"Transfer-Encoding: gzip"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding: chunked, gzip"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding: chunked, chunked"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding:"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding: ch unked"), "bad transfer-encoding"),
    (head(b"Transfer-Encoding: chunked", status=b"HTTP/1.0 200 OK"), "bad transfer-encoding"),
    # RFC 9112 §7.1 chunks
    (CHUNKED_HEAD + b"zz\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b";ext\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"-1\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"5 x\r\nhello\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"0x5\r\nhello\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"5;a\x00\r\nhello\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"1" * 16 + b"\r\n", "bad chunk size"),
    (CHUNKED_HEAD + b"5\r\nhelloX\r\n", "bad chunk"),
    (CHUNKED_HEAD + b"5\r\nhello\rX", "bad chunk"),
    (CHUNKED_HEAD + b"0\r\n bad: trailer\r\n\r\n", "obs-fold"),
    (CHUNKED_HEAD + b"0\r\nbad trailer\r\n\r\n", "bad header name"),
    # RFC 9112 §5 field lines
    (head(b"X-A: b", b" folded"), "obs-fold"),
    (head(b"X-A: b", b"\tfolded"), "obs-fold"),
    (head(b" X-A: b"), "obs-fold"),
    (head(b"X-A : b"), "bad header name"),
    (head(b": b"), "bad header name"),
    (head(b"X-A b"), "bad header name"),
    (head(b"X[A]: b"), "bad header name"),
    (head(b"X\x00A: b"), "bad header name"),
    (head(b"X-A\r: b"), "bad header name"),
    (head(b"X-A: b\x00c"), "bad header value"),
    (head(b"X-A: b\rc"), "bad header value"),
    (head(b"X-A: b\x7f"), "bad header value"),
    (head(b"X-A: b\x01"), "bad header value"),
    (head(b"X-A: b\r"), "bad header value"),
]


@pytest.mark.parametrize("data, reason", FAILURES)
def test_failure(data, reason):
    assert parse_error(data) == reason


@pytest.mark.parametrize("data, reason", FAILURES)
def test_failure_every_split(data, reason):
    assert split_errors(data) == {reason}


def test_failure_messages_name_the_problem():
    with pytest.raises(HTTPParseError) as info:
        parse(head(b"Content-Length: 5", b"Content-Length: 6"))
    assert str(info.value) == "conflicting content-length: 5 and 6"
    with pytest.raises(HTTPParseError) as info:
        parse(b"HTTP/1.1 600 High\r\n\r\n")
    assert str(info.value) == "bad status code: 600"


@pytest.mark.parametrize("data, reason, limit", [
    (b"HTTP/1.1 200 OK\r\nX-A: " + b"b" * 60 + b"\r\n\r\n", "head too large", 64),
    (CHUNKED_HEAD + b"5;" + b"e" * 80 + b"\r\nhello\r\n0\r\n\r\n", "chunk line too long", 64),
    (CHUNKED_HEAD + b"0\r\nT: " + b"t" * 80 + b"\r\n\r\n", "trailers too large", 64),
])
def test_size_limits(data, reason, limit):
    assert parse_error(data, max_header_bytes=limit) == reason
    assert split_errors(data, max_header_bytes=limit) == {reason}


def test_trailers_and_chunk_lines_within_the_limit():
    data = CHUNKED_HEAD + b"5;" + b"e" * 50 + b"\r\nhello\r\n0\r\nT: " + b"t" * 50 + b"\r\n\r\n"
    assert parse(data, max_header_bytes=64)[1:] == [Data(b"hello"), END]


def test_bad_max_header_bytes():
    with pytest.raises(ValueError):
        ResponseParser(max_header_bytes=0)


# ---------------------------------------------------------------------------
# Property tests: a reference encoder, any split

SETTINGS = settings(max_examples=300, deadline=None)

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING_NAMES = {b"content-length", b"transfer-encoding", b"connection"}

field_names = st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode).filter(
    lambda name: name.lower() not in FRAMING_NAMES)
# RFC 9110 §5.5: field-vchar *( SP / HTAB / field-vchar ), without edge whitespace.
field_char = st.sampled_from([c for c in range(256) if c == 9 or 32 <= c <= 126 or c >= 128])
field_values = st.lists(field_char, max_size=16).map(bytes).map(lambda v: v.strip(b" \t"))
ows = st.sampled_from([b"", b" ", b"\t", b"  \t"])
eols = st.sampled_from([b"\r\n", b"\n"])
reasons = st.lists(field_char, max_size=12).map(bytes)
bodies = st.binary(max_size=80)


@st.composite
def field_lines(draw):
    """(wire line without EOL, expected (name, value))."""
    name = draw(field_names)
    value = draw(field_values)
    return name + b":" + draw(ows) + value + draw(ows), (name.lower(), value)


@st.composite
def responses(draw, last):
    """One response, as (wire bytes, expected events, until_close).

    Framings: Content-Length, chunked (random chunk cuts, extensions,
    trailers), no body (204/304), interim 1xx before it, and — only for the
    last response of a stream — a body delimited by the close.
    """
    eol = draw(eols)
    framings = ["length", "chunked", "none"] + (["close"] if last else [])
    framing = draw(st.sampled_from(framings))
    minor = draw(st.sampled_from([0, 1])) if framing != "chunked" else 1
    connection = draw(st.sampled_from([None, b"close", b"keep-alive"]))
    body = draw(bodies) if framing != "none" else b""
    if framing == "none":
        status = draw(st.sampled_from([204, 304]))
    else:
        status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    reason = draw(reasons)
    fields = draw(st.lists(field_lines(), max_size=6))
    wire = b""
    events = []
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.sampled_from([100, 102, 103]))
        wire += b"HTTP/1.1 %d Info" % code + eol + eol
        events.append(resp(code, "Info"))
    wire += b"HTTP/1.%d %d " % (minor, status) + reason + eol
    lines = [line for line, _ in fields]
    headers = [pair for _, pair in fields]
    keep_alive = connection != b"close" and (minor == 1 or connection == b"keep-alive")
    if connection is not None:
        lines.append(b"Connection: " + connection)
        headers.append((b"connection", connection))
    content_length = 0
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        headers.append((b"content-length", b"%d" % len(body)))
        content_length = len(body)
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        headers.append((b"transfer-encoding", b"chunked"))
        content_length = None
    elif framing == "close":
        keep_alive = False
        content_length = None
    order = draw(st.permutations(range(len(lines))))
    wire += b"".join(lines[i] + eol for i in order) + eol
    events.append(resp(status, reason.decode("latin-1"), [headers[i] for i in order],
                       (1, minor), keep_alive, content_length, framing == "chunked"))
    if framing == "chunked":
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body))), max_size=4))))
        for piece in split_at(body, cuts):
            if piece:
                ext = draw(st.sampled_from([b"", b";a", b" ; b=c", b';q="x y"']))
                digits = draw(st.sampled_from(["%x", "%X", "0%x"])) % len(piece)
                wire += digits.encode() + ext + eol + piece + eol
        wire += b"0" + eol
        for line, _ in draw(st.lists(field_lines(), max_size=2)):
            wire += line + eol
        wire += eol
    else:
        wire += body
    if body:
        events.append(Data(body))
    if framing != "close":
        events.append(END)
    return wire, events, framing == "close"


@st.composite
def streams(draw):
    count = draw(st.integers(1, 4))
    parts = [draw(responses(last=i == count - 1)) for i in range(count)]
    wire = b"".join(part[0] for part in parts)
    events = [event for part in parts for event in part[1]]
    return wire, events, parts[-1][2]


@SETTINGS
@given(streams(), st.data())
def test_any_split_of_valid_responses_round_trips(stream, data):
    wire, expected, until_close = stream
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    for feed in (feed_compacting, feed_sliding):
        parser = ResponseParser()
        events, rest = feed(parser, split_at(wire, cuts))
        assert rest == b""
        if until_close:
            events.append(parser.eof())
            expected_all = expected + [END]
        else:
            assert parser.eof() is None
            expected_all = expected
        assert merge(events) == expected_all


@SETTINGS
@given(streams())
def test_valid_responses_fed_byte_by_byte(stream):
    wire, expected, until_close = stream
    parser = ResponseParser()
    events, rest = feed_compacting(parser, [wire[i:i + 1] for i in range(len(wire))])
    assert rest == b""
    assert merge(events) == expected


@SETTINGS
@given(streams(), st.data())
def test_corrupted_responses_parse_or_raise_http_parse_error(stream, data):
    wire = bytearray(stream[0])
    for _ in range(data.draw(st.integers(1, 3))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=4))
    parser = ResponseParser(max_header_bytes=256)
    try:
        feed_compacting(parser, split_at(bytes(wire), cuts))
        parser.eof()
    except HTTPParseError as exc:
        assert exc.reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_http_parse_error(data):
    parser = ResponseParser(max_header_bytes=128)
    try:
        parser.feed(b"HTTP/1.1 200 OK\r\n" + data, 0, 17 + len(data))
        parser.eof()
    except HTTPParseError as exc:
        assert exc.reason
