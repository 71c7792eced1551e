"""HTTP/1.1 for the webhook sink's client: the response parser (RFC 9112), and
the requests built from stored records (``RequestWriter``, at the end).

Sans-IO, like httptools: ``feed(buf, start, end)`` parses every complete
event in a caller-owned buffer window and returns them with the number of
bytes it consumed.  A head, chunk-size line or trailer section that is not
complete yet is left unconsumed, for the caller to feed again with the bytes
that follow; body bytes are consumed, and returned as Data, as they arrive.
Per response the events are

    Response(1xx)* Response [Data*] EndOfMessage

and the next response on a keep-alive connection starts right after the
EndOfMessage, in the same buffer if it is already there.  An error raises
HTTPParseError and leaves the parser unusable.  A call that has produced
events before reaching bad bytes returns those events (consumed stops at the
bad bytes) and the next call raises, so garbage behind a complete response
never hides the response.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_DecodeLatin1, PyUnicode_DecodeUTF8
from libc.math cimport floor
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, strlen

from pushcore._ingest cimport RecordView, parse_record

import hmac

from pushcore.errors import HTTPParseError

cdef enum:
    # RFC 9110 §15: "All valid status codes are within the range of 100 to 599".
    MIN_STATUS = 100
    MAX_STATUS = 599
    # RFC 9110 §5.4 leaves the limit on header fields to the recipient.
    MAX_FIELDS = 100
    # RFC 9110 §8.6: recipients must prevent integer overflow of large
    # Content-Length numerals; 18 decimal digits stay below 2**63.
    MAX_LENGTH_DIGITS = 18
    # RFC 9112 §7.1: the same for chunk sizes; 15 hex digits stay below 2**60.
    MAX_CHUNK_SIZE_DIGITS = 15
    # Far above any real response head, small enough to bound what one
    # connection buffers before its response starts.
    DEFAULT_MAX_HEADER_BYTES = 65536

cdef enum:
    HTAB = 0x09
    LF = 0x0A
    CR = 0x0D
    SP = 0x20
    COMMA = 0x2C
    COLON = 0x3A
    SEMICOLON = 0x3B

# RFC 9110 §5.6.2: tchar, the characters of a token (field names, codings).
cdef unsigned char _is_tchar[256]
# RFC 9110 §5.5: field-vchar, SP and HTAB, the characters of a field value;
# RFC 9112 §4: the reason-phrase is made of the same set.
cdef unsigned char _is_field_char[256]
cdef unsigned char _to_lower[256]


cdef void _init_tables():
    cdef int c
    for c in range(256):
        _to_lower[c] = c + 32 if 0x41 <= c <= 0x5A else c
        _is_tchar[c] = (0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A
                        or chr(c) in "!#$%&'*+-.^_`|~")
        _is_field_char[c] = c == HTAB or 0x20 <= c <= 0x7E or c >= 0x80


_init_tables()

cdef tuple _HTTP_10 = (1, 0)
cdef tuple _HTTP_11 = (1, 1)


# ---------------------------------------------------------------------------
# Events

cdef class Response:
    """A response head: an interim 1xx response or the final one.

    ``headers`` keeps every field line in order, names lower-cased and values
    stripped of surrounding whitespace.  ``content_length`` is the number of
    body bytes that follow (0 for a response without a body) or None when the
    body is chunked or delimited by the connection closing.  ``keep_alive``
    says whether the connection can carry another request after this response.
    """

    def __init__(self, int status, str reason, list headers, tuple version, bint keep_alive,
                 content_length, bint chunked):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked

    def _values(self):
        return (self.status, self.reason, self.headers, self.version, self.keep_alive,
                self.content_length, self.chunked)

    def __eq__(self, other):
        if type(other) is not Response:
            return NotImplemented
        return self._values() == (<Response>other)._values()

    def __repr__(self):
        return ("Response(status={!r}, reason={!r}, headers={!r}, version={!r}, "
                "keep_alive={!r}, content_length={!r}, chunked={!r})").format(*self._values())


cdef class Data:
    """Body bytes, de-chunked; a body may come in any number of Data events."""

    def __init__(self, bytes data):
        self.data = data

    def __eq__(self, other):
        if type(other) is not Data:
            return NotImplemented
        return self.data == (<Data>other).data

    def __repr__(self):
        if len(self.data) > 64:
            return f"Data({self.data[:64]!r}...({len(self.data)} bytes))"
        return f"Data({self.data!r})"


cdef class EndOfMessage:
    """The end of a final response; the next bytes belong to the next response."""

    def __eq__(self, other):
        if type(other) is not EndOfMessage:
            return NotImplemented
        return True

    def __repr__(self):
        return "EndOfMessage()"


cdef EndOfMessage _END_OF_MESSAGE = EndOfMessage()


cdef inline Data _data(const unsigned char* p, Py_ssize_t pos, Py_ssize_t n):
    cdef Data event = Data.__new__(Data)
    event.data = PyBytes_FromStringAndSize(<char*>(p + pos), n)
    return event


# ---------------------------------------------------------------------------
# Lines and lists

cdef inline Py_ssize_t _find_lf(const unsigned char* p, Py_ssize_t pos,
                                Py_ssize_t end) noexcept nogil:
    if pos >= end:
        return -1
    cdef const void* hit = memchr(p + pos, LF, end - pos)
    if hit == NULL:
        return -1
    return <const unsigned char*>hit - p


cdef inline Py_ssize_t _line_end(const unsigned char* p, Py_ssize_t ls,
                                 Py_ssize_t lf) noexcept nogil:
    # RFC 9112 §2.2: a recipient MAY take a bare LF as the line terminator and
    # ignore a CR before it.  A CR anywhere else is then a bad character.
    if lf > ls and p[lf - 1] == CR:
        return lf - 1
    return lf


cdef inline bint _is_ows(unsigned char c) noexcept nogil:
    # RFC 9110 §5.6.3: OWS = *( SP / HTAB )
    return c == SP or c == HTAB


cdef inline bint _next_element(const unsigned char* p, Py_ssize_t* i, Py_ssize_t end,
                               Py_ssize_t* es, Py_ssize_t* ee) noexcept nogil:
    # RFC 9110 §5.6.1: list elements are separated by commas with OWS around
    # them.  Sets [es, ee) to the next element, trimmed, and moves i past it.
    cdef Py_ssize_t s = i[0]
    cdef Py_ssize_t e
    if s > end:
        return False
    e = s
    while e < end and p[e] != COMMA:
        e += 1
    i[0] = e + 1
    while s < e and _is_ows(p[s]):
        s += 1
    while e > s and _is_ows(p[e - 1]):
        e -= 1
    es[0] = s
    ee[0] = e
    return True


cdef inline bint _iequals(const unsigned char* p, Py_ssize_t start, Py_ssize_t end,
                          const char* lower) noexcept nogil:
    """Whether p[start:end] equals the lower-case ASCII string ``lower``, ignoring case."""
    cdef Py_ssize_t i
    for i in range(end - start):
        if lower[i] == 0 or _to_lower[p[start + i]] != <unsigned char>lower[i]:
            return False
    return lower[end - start] == 0


cdef bytes _snippet(const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    """The start of a bad line, for an error message."""
    return PyBytes_FromStringAndSize(<char*>(p + start), min(end - start, 60))


# ---------------------------------------------------------------------------
# Heads

# What the header section says about framing and persistence.
cdef struct Framing:
    Py_ssize_t content_length    # -1 when absent
    bint te_seen
    bint te_chunked_last         # the last transfer coding so far is chunked
    bint connection_close
    bint connection_keep_alive


cdef int _parse_status_line(const unsigned char* p, Py_ssize_t ls, Py_ssize_t le,
                            int* minor, int* status, Py_ssize_t* reason_start) except -1:
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
    # RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
    cdef Py_ssize_t i
    if (le - ls < 12 or memcmp(p + ls, b"HTTP/", 5) != 0
            or not (0x30 <= p[ls + 5] <= 0x39) or p[ls + 6] != b'.'
            or not (0x30 <= p[ls + 7] <= 0x39) or p[ls + 8] != SP):
        raise HTTPParseError("bad status line", repr(_snippet(p, ls, le)))
    if p[ls + 5] != b'1' or (p[ls + 7] != b'0' and p[ls + 7] != b'1'):
        raise HTTPParseError("unsupported version", repr(_snippet(p, ls, ls + 8)))
    minor[0] = p[ls + 7] - 0x30
    status[0] = 0
    for i in range(ls + 9, ls + 12):
        if not (0x30 <= p[i] <= 0x39):
            raise HTTPParseError("bad status line", repr(_snippet(p, ls, le)))
        status[0] = status[0] * 10 + (p[i] - 0x30)
    if status[0] < MIN_STATUS or status[0] > MAX_STATUS:
        raise HTTPParseError("bad status code", str(status[0]))
    # The SP before an empty reason-phrase is required by the grammar but left
    # out by some servers; a client ignores the phrase anyway (RFC 9112 §4).
    if le == ls + 12:
        reason_start[0] = le
        return 0
    if p[ls + 12] != SP:
        raise HTTPParseError("bad status line", repr(_snippet(p, ls, le)))
    for i in range(ls + 13, le):
        if not _is_field_char[p[i]]:
            raise HTTPParseError("bad status line", "control character in the reason phrase")
    reason_start[0] = ls + 13
    return 0


cdef int _parse_content_length(Framing* framing, const unsigned char* p, Py_ssize_t vs,
                               Py_ssize_t ve) except -1:
    # RFC 9110 §8.6: Content-Length = 1*DIGIT.  A list of identical values (a
    # duplicated field, "42, 42") may be taken as that one value; different
    # values make the framing invalid (RFC 9112 §6.3 rule 5).
    cdef Py_ssize_t i = vs
    cdef Py_ssize_t es, ee, k
    cdef Py_ssize_t value
    while _next_element(p, &i, ve, &es, &ee):
        if ee == es or ee - es > MAX_LENGTH_DIGITS:
            raise HTTPParseError("bad content-length", repr(_snippet(p, vs, ve)))
        value = 0
        for k in range(es, ee):
            if not (0x30 <= p[k] <= 0x39):
                raise HTTPParseError("bad content-length", repr(_snippet(p, vs, ve)))
            value = value * 10 + (p[k] - 0x30)
        if framing.content_length >= 0 and framing.content_length != value:
            raise HTTPParseError("conflicting content-length",
                                 f"{framing.content_length} and {value}")
        framing.content_length = value
    return 0


cdef int _parse_transfer_encoding(Framing* framing, const unsigned char* p, Py_ssize_t vs,
                                  Py_ssize_t ve) except -1:
    # RFC 9112 §6.1 / §7: transfer-coding = token *( OWS ";" OWS transfer-parameter ),
    # codings listed in the order applied; chunked is applied once, last.
    # Parameters are skipped: no coding we accept has any.
    cdef Py_ssize_t i = vs
    cdef Py_ssize_t es, ee, ne, k
    framing.te_seen = True
    while _next_element(p, &i, ve, &es, &ee):
        if es == ee:
            continue
        ne = es
        while ne < ee and _is_tchar[p[ne]]:
            ne += 1
        k = ne
        while k < ee and _is_ows(p[k]):
            k += 1
        if ne == es or (k < ee and p[k] != SEMICOLON):
            raise HTTPParseError("bad transfer-encoding", repr(_snippet(p, vs, ve)))
        if framing.te_chunked_last:
            raise HTTPParseError("bad transfer-encoding", "chunked is not the final coding")
        framing.te_chunked_last = _iequals(p, es, ne, b"chunked")
    return 0


cdef void _parse_connection(Framing* framing, const unsigned char* p, Py_ssize_t vs,
                            Py_ssize_t ve) noexcept:
    # RFC 9110 §7.6.1: Connection = #connection-option, case-insensitive.
    cdef Py_ssize_t i = vs
    cdef Py_ssize_t es, ee
    while _next_element(p, &i, ve, &es, &ee):
        if _iequals(p, es, ee, b"close"):
            framing.connection_close = True
        elif _iequals(p, es, ee, b"keep-alive"):
            framing.connection_keep_alive = True


cdef int _parse_fields(const unsigned char* p, Py_ssize_t pos, Py_ssize_t stop, list headers,
                       Framing* framing) except -1:
    """Check the field lines from pos to the empty line that ends at stop.

    Appends (lower-cased name, value) to ``headers`` and notes the framing
    fields in ``framing``, unless they are None/NULL (trailers are dropped).
    """
    # RFC 9112 §5: field-line = field-name ":" OWS field-value OWS
    cdef Py_ssize_t ls = pos
    cdef Py_ssize_t lf, le, ne, vs, ve, i
    cdef Py_ssize_t count = 0
    cdef bytes name
    cdef char* q
    while True:
        lf = _find_lf(p, ls, stop)
        le = _line_end(p, ls, lf)
        if le == ls:
            return 0
        # RFC 9112 §5.2 lets a user agent unfold obs-fold, and §2.2 lets it skip
        # whitespace-led lines after the status line; we reject both, as
        # modern receivers never send them and they have served to smuggle.
        if _is_ows(p[ls]):
            raise HTTPParseError("obs-fold", repr(_snippet(p, ls, le)))
        ne = ls
        while ne < le and _is_tchar[p[ne]]:
            ne += 1
        # RFC 9112 §5.1: no whitespace between the field name and the colon.
        if ne == ls or ne == le or p[ne] != COLON:
            raise HTTPParseError("bad header name", repr(_snippet(p, ls, le)))
        vs = ne + 1
        while vs < le and _is_ows(p[vs]):
            vs += 1
        ve = le
        while ve > vs and _is_ows(p[ve - 1]):
            ve -= 1
        # RFC 9110 §5.5: CR, LF and NUL in a value are dangerous; other CTLs
        # are invalid too.
        for i in range(vs, ve):
            if not _is_field_char[p[i]]:
                raise HTTPParseError("bad header value", repr(_snippet(p, ls, le)))
        count += 1
        if count > MAX_FIELDS:
            raise HTTPParseError("too many headers", f"more than {MAX_FIELDS} fields")
        if headers is not None:
            name = PyBytes_FromStringAndSize(NULL, ne - ls)
            q = PyBytes_AS_STRING(name)
            for i in range(ne - ls):
                q[i] = _to_lower[p[ls + i]]
            headers.append((name, PyBytes_FromStringAndSize(<char*>(p + vs), ve - vs)))
        if framing != NULL:
            if _iequals(p, ls, ne, b"content-length"):
                _parse_content_length(framing, p, vs, ve)
            elif _iequals(p, ls, ne, b"transfer-encoding"):
                _parse_transfer_encoding(framing, p, vs, ve)
            elif _iequals(p, ls, ne, b"connection"):
                _parse_connection(framing, p, vs, ve)
        ls = lf + 1


# ---------------------------------------------------------------------------
# The parser

cdef class ResponseParser:
    """Parses the responses arriving on one client connection.

    ``max_header_bytes`` bounds a head (status line, fields and the empty line
    after them), a trailer section and a chunk-size line.  ``expect_body``
    False says the next final response answers a HEAD request and so has no
    body (RFC 9112 §6.3 rule 1); it goes back to True once that response's
    head is parsed.
    """

    def __init__(self, Py_ssize_t max_header_bytes=DEFAULT_MAX_HEADER_BYTES,
                 bint expect_body=True):
        if max_header_bytes < 1:
            raise ValueError(f"max_header_bytes must be positive, not {max_header_bytes}")
        self.max_header_bytes = max_header_bytes
        self._expect_body = expect_body
        self._state = ST_HEAD

    @property
    def expect_body(self):
        return self._expect_body

    @expect_body.setter
    def expect_body(self, bint value):
        self._expect_body = value

    def feed(self, buf, Py_ssize_t start, Py_ssize_t end):
        """Parse buf[start:end]; return (events, bytes consumed from start)."""
        cdef const unsigned char[:] view = buf
        if start < 0 or start > end or end > view.shape[0]:
            raise ValueError(f"bad window [{start}, {end}) for a buffer of {view.shape[0]}")
        if start == end:
            return self.feed_ptr(NULL, start, end)
        return self.feed_ptr(&view[0], start, end)

    def eof(self):
        """The server closed the connection: end a body delimited by the close.

        Returns EndOfMessage for such a body, None when no response was in
        progress, and raises HTTPParseError when a head or body is cut short.
        """
        if self._state == ST_FAILED:
            raise self._error
        if self._state == ST_UNTIL_CLOSE:
            self._state = ST_CLOSED
            return _END_OF_MESSAGE
        try:
            if self._state == ST_HEAD and self._partial:
                raise HTTPParseError("truncated head", "connection closed inside a response head")
            if self._state == ST_HEAD and self._interim:
                raise HTTPParseError("truncated head",
                                     "connection closed before the final response")
            if self._state != ST_HEAD and self._state != ST_SWITCHED and self._state != ST_CLOSED:
                raise HTTPParseError("truncated body", "connection closed inside a response body")
        except HTTPParseError as exc:
            self._state = ST_FAILED
            self._error = exc
            raise
        self._state = ST_CLOSED
        return None

    cdef tuple feed_ptr(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
        cdef list events = []
        cdef Py_ssize_t pos = start
        cdef Py_ssize_t stop, n
        cdef ParserState state
        if self._state == ST_FAILED:
            raise self._error
        try:
            while pos < end:
                state = self._state
                if state == ST_HEAD:
                    stop = self._find_block(p, pos, end, "head too large")
                    if stop < 0:
                        break
                    self._on_head(events, p, pos, stop)
                    pos = stop
                elif state == ST_LENGTH_BODY or state == ST_CHUNK_DATA:
                    n = min(self._remaining, end - pos)
                    events.append(_data(p, pos, n))
                    pos += n
                    self._remaining -= n
                    if self._remaining == 0:
                        if state == ST_CHUNK_DATA:
                            self._state = ST_CHUNK_END
                        else:
                            self._end_message(events)
                elif state == ST_CHUNK_LINE:
                    stop = self._find_line(p, pos, end)
                    if stop < 0:
                        break
                    self._on_chunk_line(p, pos, stop)
                    pos = stop
                elif state == ST_CHUNK_END:
                    # RFC 9112 §7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
                    if p[pos] == LF:
                        pos += 1
                    elif p[pos] != CR or (pos + 1 < end and p[pos + 1] != LF):
                        raise HTTPParseError("bad chunk", "chunk data not followed by CRLF")
                    elif pos + 1 == end:
                        break
                    else:
                        pos += 2
                    self._state = ST_CHUNK_LINE
                elif state == ST_TRAILERS:
                    # RFC 9112 §7.1.2: trailer fields are parsed like header
                    # fields; we have no use for them and drop them.
                    stop = self._find_block(p, pos, end, "trailers too large")
                    if stop < 0:
                        break
                    _parse_fields(p, pos, stop, None, NULL)
                    pos = stop
                    self._end_message(events)
                elif state == ST_UNTIL_CLOSE:
                    events.append(_data(p, pos, end - pos))
                    pos = end
                elif state == ST_SWITCHED:
                    # The bytes after a 101 parsed in this call are left for
                    # the new protocol; fed again, they are an error.
                    if pos > start:
                        break
                    raise HTTPParseError("switched protocols",
                                         "bytes after a 101 response belong to another protocol")
                else:
                    raise HTTPParseError("connection closed", "bytes fed after eof()")
        except HTTPParseError as exc:
            self._state = ST_FAILED
            self._error = exc
            if not events:
                raise
        self._partial = self._state == ST_HEAD and pos < end
        return events, pos - start

    cdef Py_ssize_t _find_block(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                str too_large) except -2:
        """The end of the lines from pos up to and including an empty line, or -1.

        The end is sought only within max_header_bytes of pos; a block longer
        than that raises without waiting for its end.
        """
        cdef Py_ssize_t limit = end
        cdef Py_ssize_t ls, scan, lf
        if end - pos > self.max_header_bytes:
            limit = pos + self.max_header_bytes
        if self._scan_off > limit - pos:
            self._line_off = self._scan_off = 0
        ls = pos + self._line_off
        scan = pos + self._scan_off
        while True:
            lf = _find_lf(p, scan, limit)
            if lf < 0:
                break
            if _line_end(p, ls, lf) == ls:
                self._line_off = self._scan_off = 0
                return lf + 1
            ls = scan = lf + 1
        if end - pos >= self.max_header_bytes:
            raise HTTPParseError(too_large, f"no end within {self.max_header_bytes} bytes")
        self._line_off = ls - pos
        self._scan_off = limit - pos
        return -1

    cdef Py_ssize_t _find_line(self, const unsigned char* p, Py_ssize_t pos,
                               Py_ssize_t end) except -2:
        """The end of the line at pos (after its LF), or -1; bounded like a block."""
        cdef Py_ssize_t limit = end
        cdef Py_ssize_t lf
        if end - pos > self.max_header_bytes:
            limit = pos + self.max_header_bytes
        if self._scan_off > limit - pos:
            self._scan_off = 0
        lf = _find_lf(p, pos + self._scan_off, limit)
        if lf >= 0:
            self._scan_off = 0
            return lf + 1
        if end - pos >= self.max_header_bytes:
            raise HTTPParseError("chunk line too long",
                                 f"no end within {self.max_header_bytes} bytes")
        self._scan_off = limit - pos
        return -1

    cdef int _on_head(self, list events, const unsigned char* p, Py_ssize_t pos,
                      Py_ssize_t stop) except -1:
        cdef Py_ssize_t lf = _find_lf(p, pos, stop)
        cdef Py_ssize_t le = _line_end(p, pos, lf)
        cdef int minor, status
        cdef Py_ssize_t reason_start
        cdef Framing framing
        cdef Response response
        cdef bint expect_body
        _parse_status_line(p, pos, le, &minor, &status, &reason_start)
        framing.content_length = -1
        framing.te_seen = False
        framing.te_chunked_last = False
        framing.connection_close = False
        framing.connection_keep_alive = False
        response = Response.__new__(Response)
        response.status = status
        response.reason = PyUnicode_DecodeLatin1(<char*>(p + reason_start), le - reason_start,
                                                 NULL)
        response.headers = []
        _parse_fields(p, lf + 1, stop, response.headers, &framing)
        if framing.te_seen:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means
            # faulty framing.
            if minor == 0:
                raise HTTPParseError("bad transfer-encoding", "in an HTTP/1.0 response")
            if not framing.te_chunked_last:
                raise HTTPParseError("bad transfer-encoding", "chunked is not the final coding")
        response.version = _HTTP_11 if minor == 1 else _HTTP_10
        # RFC 9112 §9.3: HTTP/1.1 connections persist unless "close" is sent;
        # an HTTP/1.0 one only with "keep-alive" (RFC 9112 Appendix C.2.2).
        response.keep_alive = not framing.connection_close and (
            minor == 1 or framing.connection_keep_alive)
        response.content_length = 0
        response.chunked = False
        events.append(response)
        # RFC 9110 §15.2: a 1xx is interim and has no body; the final response follows.
        if status < 200 and status != 101:
            self._interim = True
            return 0
        self._interim = False
        expect_body = self._expect_body
        self._expect_body = True
        if status == 101:
            # RFC 9110 §15.2.2: the connection now speaks another protocol.
            response.keep_alive = False
            events.append(_END_OF_MESSAGE)
            self._state = ST_SWITCHED
        # RFC 9112 §6.3 rule 1: no body after a HEAD request, 204 or 304.
        elif not expect_body or status == 204 or status == 304:
            self._end_message(events)
        # RFC 9112 §6.3 rule 4 (the last coding is chunked, checked above).
        elif framing.te_seen:
            response.content_length = None
            response.chunked = True
            # RFC 9112 §6.3 rule 3: Transfer-Encoding overrides Content-Length,
            # but the pair hints at smuggling, so the connection is not reused.
            if framing.content_length >= 0:
                response.keep_alive = False
            self._state = ST_CHUNK_LINE
        # RFC 9112 §6.3 rule 6.
        elif framing.content_length >= 0:
            response.content_length = framing.content_length
            if framing.content_length == 0:
                self._end_message(events)
            else:
                self._remaining = framing.content_length
                self._state = ST_LENGTH_BODY
        # RFC 9112 §6.3 rule 8: the body runs until the server closes.
        else:
            response.content_length = None
            response.keep_alive = False
            self._state = ST_UNTIL_CLOSE
        return 0

    cdef int _on_chunk_line(self, const unsigned char* p, Py_ssize_t pos,
                            Py_ssize_t stop) except -1:
        # RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, chunk-size = 1*HEXDIG;
        # §7.1.1: chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS
        # chunk-ext-val ] ), and unrecognized extensions are ignored.
        cdef Py_ssize_t le = _line_end(p, pos, stop - 1)
        cdef Py_ssize_t i = pos
        cdef Py_ssize_t size = 0
        cdef int digit
        cdef unsigned char c
        while i < le:
            c = p[i]
            if 0x30 <= c <= 0x39:
                digit = c - 0x30
            elif 0x61 <= _to_lower[c] <= 0x66:
                digit = _to_lower[c] - 0x61 + 10
            else:
                break
            if i - pos == MAX_CHUNK_SIZE_DIGITS:
                raise HTTPParseError("bad chunk size", repr(_snippet(p, pos, le)))
            size = size * 16 + digit
            i += 1
        if i == pos:
            raise HTTPParseError("bad chunk size", repr(_snippet(p, pos, le)))
        while i < le and _is_ows(p[i]):
            i += 1
        if i < le and p[i] != SEMICOLON:
            raise HTTPParseError("bad chunk size", repr(_snippet(p, pos, le)))
        while i < le:
            if not _is_field_char[p[i]]:
                raise HTTPParseError("bad chunk size", "control character in a chunk extension")
            i += 1
        if size == 0:
            self._state = ST_TRAILERS
        else:
            self._remaining = size
            self._state = ST_CHUNK_DATA
        return 0

    cdef void _end_message(self, list events):
        events.append(_END_OF_MESSAGE)
        self._state = ST_HEAD


# ---------------------------------------------------------------------------
# Requests
#
# pushcore/webhook.py describes a webhook request and builds it from a Delivery
# (build_request, build_batch_request): that is the readable reference.  A sink
# builds the same bytes here, straight from the stored records, in one call per
# request; tests/test_webhook.py checks the two against each other.

cdef bytes _DEFAULT_CONTENT_TYPE = b"application/octet-stream"
# NDJSON (ndjson-spec 1.0), as webhook.BATCH_CONTENT_TYPE.
cdef bytes _BATCH_CONTENT_TYPE = b"application/x-ndjson"
cdef const char* _HEX_UPPER = b"0123456789ABCDEF"
cdef const char* _HEX_LOWER = b"0123456789abcdef"
# RFC 4648 §4: the base64 alphabet.
cdef const char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

# webhook._TOPIC_UNSAFE and _ID_UNSAFE: bytes a header value carries percent-encoded.
cdef unsigned char _topic_unsafe[256]
cdef unsigned char _id_unsafe[256]


cdef void _init_request_tables():
    cdef int c
    for c in range(256):
        # RFC 9110 §5.5: controls, space and non-ASCII; "%" so that decoding is exact.
        _topic_unsafe[c] = c <= 0x20 or c == 0x25 or c >= 0x7F
        # Standard Webhooks: a message id without ".".
        _id_unsafe[c] = _topic_unsafe[c] or c == 0x2E


_init_request_tables()

cdef object _hmac_digest = hmac.digest


cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef int _reserve(Buf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap
    cdef char* data
    if b.len + need <= b.cap:
        return 0
    cap = max(b.cap * 2, b.len + need, 4096)
    data = <char*>PyMem_Realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline int _put(Buf* b, const void* s, Py_ssize_t n) except -1:
    _reserve(b, n)
    memcpy(b.data + b.len, s, n)
    b.len += n
    return 0


cdef inline int _put_bytes(Buf* b, bytes s) except -1:
    return _put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef inline int _put_str(Buf* b, const char* s) except -1:
    return _put(b, s, strlen(s))


cdef int _put_uint(Buf* b, uint64_t v) except -1:
    cdef char digits[20]
    cdef int i = 20
    while True:
        i -= 1
        digits[i] = <char>(0x30 + v % 10)
        v //= 10
        if v == 0:
            break
    return _put(b, digits + i, 20 - i)


cdef int _put_percent(Buf* b, const unsigned char* s, Py_ssize_t n,
                      const unsigned char* unsafe) except -1:
    # RFC 3986 §2.1: upper-case hex, as webhook._escape.
    cdef Py_ssize_t i
    cdef unsigned char c
    cdef char* w
    _reserve(b, 3 * n)
    w = b.data + b.len
    for i in range(n):
        c = s[i]
        if unsafe[c]:
            w[0] = 0x25
            w[1] = _HEX_UPPER[c >> 4]
            w[2] = _HEX_UPPER[c & 15]
            w += 3
        else:
            w[0] = <char>c
            w += 1
    b.len = w - b.data
    return 0


cdef bint _reads_as_offsets(const unsigned char* s, Py_ssize_t n) noexcept:
    # webhook._READS_AS_OFFSETS: [0-9]+(-[0-9]+)+
    cdef Py_ssize_t i
    cdef bint dash = False
    if n == 0 or not (0x30 <= s[0] <= 0x39) or not (0x30 <= s[n - 1] <= 0x39):
        return False
    for i in range(1, n - 1):
        if s[i] == 0x2D:
            if s[i - 1] == 0x2D:
                return False
            dash = True
        elif not (0x30 <= s[i] <= 0x39):
            return False
    return dash


cdef int _put_key(Buf* b, RecordView* v, int partition, uint64_t offset) except -1:
    # webhook.idempotency_key.
    if v.msg_id_len == 0:
        _put_uint(b, partition)
        _put(b, b"-", 1)
        return _put_uint(b, offset)
    if _reads_as_offsets(v.msg_id, v.msg_id_len):
        _put(b, b"%3", 2)
        _put(b, _HEX_UPPER + (v.msg_id[0] & 15), 1)
        return _put_percent(b, v.msg_id + 1, v.msg_id_len - 1, _id_unsafe)
    return _put_percent(b, v.msg_id, v.msg_id_len, _id_unsafe)


cdef int _put_json(Buf* b, const unsigned char* s, Py_ssize_t n) except -1:
    # A JSON string of UTF-8 text, as json.JSONEncoder(ensure_ascii=False): '"'
    # and '\' escaped, the short escapes of RFC 8259 §7 where there is one,
    # other controls as \u00xx; everything else as it is.
    cdef Py_ssize_t i
    cdef unsigned char c
    cdef char* w
    _reserve(b, 6 * n + 2)
    w = b.data + b.len
    w[0] = 0x22
    w += 1
    for i in range(n):
        c = s[i]
        if c >= 0x20 and c != 0x22 and c != 0x5C:
            w[0] = <char>c
            w += 1
            continue
        w[0] = 0x5C
        if c == 0x22 or c == 0x5C:
            w[1] = <char>c
        elif c == 0x0A:
            w[1] = 0x6E
        elif c == 0x0D:
            w[1] = 0x72
        elif c == 0x09:
            w[1] = 0x74
        elif c == 0x08:
            w[1] = 0x62
        elif c == 0x0C:
            w[1] = 0x66
        else:
            memcpy(w + 1, b"u00", 3)
            w[4] = _HEX_LOWER[c >> 4]
            w[5] = _HEX_LOWER[c & 15]
            w += 6
            continue
        w += 2
    w[0] = 0x22
    b.len = w + 1 - b.data
    return 0


cdef int _put_base64(Buf* b, const unsigned char* s, Py_ssize_t n) except -1:
    # RFC 4648 §4, with padding.
    cdef Py_ssize_t i = 0
    cdef uint32_t v
    cdef char* w
    _reserve(b, (n + 2) // 3 * 4)
    w = b.data + b.len
    while i + 3 <= n:
        v = (<uint32_t>s[i] << 16) | (<uint32_t>s[i + 1] << 8) | s[i + 2]
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = _B64[(v >> 6) & 63]
        w[3] = _B64[v & 63]
        w += 4
        i += 3
    if n - i == 1:
        v = <uint32_t>s[i] << 16
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = 0x3D
        w[3] = 0x3D
        w += 4
    elif n - i == 2:
        v = (<uint32_t>s[i] << 16) | (<uint32_t>s[i + 1] << 8)
        w[0] = _B64[v >> 18]
        w[1] = _B64[(v >> 12) & 63]
        w[2] = _B64[(v >> 6) & 63]
        w[3] = 0x3D
        w += 4
    b.len = w - b.data
    return 0


cdef bint _is_utf8(const unsigned char* s, Py_ssize_t n):
    # What bytes.decode() accepts (strict: no surrogates, no overlong forms);
    # ASCII, the common case, without building a str.
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] >= 0x80:
            break
    else:
        return True
    try:
        PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    except UnicodeDecodeError:
        return False
    return True


cdef class RequestWriter:
    """The webhook requests of one sink, built from stored records.

    ``start`` is the request line and Host field, ``extra`` the configured
    extra header lines, both encoded; ``signing_key`` the HMAC key, or None
    for unsigned requests; ``content_types(properties)`` returns, for a
    record's MQTT 5 property section, the Content-Type field value and the
    raw Content Type property (str or None) a batch line carries.  Build it
    with ``pushcore.webhook.request_writer``.
    """

    cdef bytes _start
    cdef bytes _extra
    cdef object _signing_key
    cdef object _content_types
    # Reused between requests: the head, and a batch body.
    cdef Buf _head
    cdef Buf _body

    def __cinit__(self):
        self._head.data = self._body.data = NULL
        self._head.len = self._head.cap = self._body.len = self._body.cap = 0

    def __init__(self, bytes start not None, bytes extra not None, signing_key,
                 content_types):
        self._start = start
        self._extra = extra
        self._signing_key = signing_key
        self._content_types = content_types

    def __dealloc__(self):
        PyMem_Free(self._head.data)
        PyMem_Free(self._body.data)

    def single(self, bytes record not None, int partition, uint64_t offset, double now_s):
        """One POST of the record's payload: ``webhook.build_request``'s bytes."""
        cdef RecordView v
        cdef Buf* h = &self._head
        cdef Py_ssize_t key_at, key_len
        parse_record(<const unsigned char*>PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record),
                     &v)
        h.len = 0
        _put_bytes(h, self._start)
        _put_str(h, "Content-Type: ")
        if v.properties_len:
            _put_bytes(h, self._content_types(
                PyBytes_FromStringAndSize(<const char*>v.properties, v.properties_len))[0]
                .encode("ascii"))
        else:
            _put_bytes(h, _DEFAULT_CONTENT_TYPE)
        _put_str(h, "\r\nContent-Length: ")
        _put_uint(h, v.payload_len)
        _put_str(h, "\r\nIdempotency-Key: ")
        key_at = h.len
        _put_key(h, &v, partition, offset)
        key_len = h.len - key_at
        _put_str(h, "\r\nX-Pushcore-Topic: ")
        _put_percent(h, v.topic, v.topic_len, _topic_unsafe)
        _put_str(h, "\r\nX-Pushcore-Partition: ")
        _put_uint(h, partition)
        _put_str(h, "\r\nX-Pushcore-Offset: ")
        _put_uint(h, offset)
        _put_str(h, "\r\nX-Pushcore-Time: ")
        _put_uint(h, v.time_ms)
        _put_str(h, "\r\n")
        self._sign(key_at, key_len, v.payload, v.payload_len, now_s)
        _put_bytes(h, self._extra)
        _put_str(h, "\r\n")
        _put(h, v.payload, v.payload_len)
        return PyBytes_FromStringAndSize(h.data, h.len)

    def batch(self, list records not None, int partition, uint64_t first_offset, double now_s):
        """One POST of NDJSON, a line per record: ``webhook.build_batch_request``'s bytes.

        The records are consecutive offsets of one partition from ``first_offset``.
        """
        cdef RecordView v
        cdef Buf* h = &self._head
        cdef Buf* body = &self._body
        cdef Py_ssize_t i, n = len(records)
        cdef Py_ssize_t key_at, key_len
        cdef uint64_t offset
        if n == 0:
            raise ValueError("a batch needs at least one record")
        body.len = 0
        for i in range(n):
            record = records[i]
            if type(record) is not bytes:
                raise TypeError("a record is bytes")
            offset = first_offset + <uint64_t>i
            parse_record(<const unsigned char*>PyBytes_AS_STRING(record),
                         PyBytes_GET_SIZE(record), &v)
            # The key goes into the head buffer first, to be written as JSON.
            h.len = 0
            _put_key(h, &v, partition, offset)
            _put_str(body, "{\"id\":")
            _put_json(body, <const unsigned char*>h.data, h.len)
            _put_str(body, ",\"topic\":")
            _put_json(body, v.topic, v.topic_len)
            _put_str(body, ",\"partition\":")
            _put_uint(body, partition)
            _put_str(body, ",\"offset\":")
            _put_uint(body, offset)
            _put_str(body, ",\"time_ms\":")
            _put_uint(body, v.time_ms)
            if _is_utf8(v.payload, v.payload_len):
                _put_str(body, ",\"payload\":")
                _put_json(body, v.payload, v.payload_len)
            else:
                _put_str(body, ",\"payload_b64\":\"")
                _put_base64(body, v.payload, v.payload_len)
                _put_str(body, "\"")
            if v.properties_len:
                content_type = self._content_types(
                    PyBytes_FromStringAndSize(<const char*>v.properties, v.properties_len))[1]
                if content_type is not None:
                    encoded = (<str>content_type).encode("utf-8")
                    _put_str(body, ",\"content_type\":")
                    _put_json(body, <const unsigned char*>PyBytes_AS_STRING(encoded),
                              PyBytes_GET_SIZE(encoded))
            _put_str(body, "}\n")
        h.len = 0
        _put_bytes(h, self._start)
        _put_str(h, "Content-Type: ")
        _put_bytes(h, _BATCH_CONTENT_TYPE)
        _put_str(h, "\r\nContent-Length: ")
        _put_uint(h, body.len)
        _put_str(h, "\r\nIdempotency-Key: ")
        key_at = h.len
        _put_uint(h, partition)
        _put(h, b"-", 1)
        _put_uint(h, first_offset)
        _put(h, b"-", 1)
        _put_uint(h, first_offset + <uint64_t>(n - 1))
        key_len = h.len - key_at
        _put_str(h, "\r\nX-Pushcore-Partition: ")
        _put_uint(h, partition)
        _put_str(h, "\r\nX-Pushcore-Count: ")
        _put_uint(h, n)
        _put_str(h, "\r\n")
        self._sign(key_at, key_len, <const unsigned char*>body.data, body.len, now_s)
        _put_bytes(h, self._extra)
        _put_str(h, "\r\n")
        _put(h, body.data, body.len)
        return PyBytes_FromStringAndSize(h.data, h.len)

    cdef int _sign(self, Py_ssize_t key_at, Py_ssize_t key_len, const unsigned char* body,
                   Py_ssize_t body_len, double now_s) except -1:
        # Standard Webhooks: webhook-id, webhook-timestamp (whole seconds) and
        # webhook-signature "v1," + base64 of HMAC-SHA256("{id}.{timestamp}.{body}").
        cdef Buf* h = &self._head
        cdef bytes key, timestamp, digest
        if self._signing_key is None:
            return 0
        key = PyBytes_FromStringAndSize(h.data + key_at, key_len)
        timestamp = str(<long long>floor(now_s)).encode("ascii")
        digest = _hmac_digest(self._signing_key,
                              key + b"." + timestamp + b"." +
                              PyBytes_FromStringAndSize(<const char*>body, body_len),
                              "sha256")
        _put_str(h, "webhook-id: ")
        _put_bytes(h, key)
        _put_str(h, "\r\nwebhook-timestamp: ")
        _put_bytes(h, timestamp)
        _put_str(h, "\r\nwebhook-signature: v1,")
        _put_base64(h, <const unsigned char*>PyBytes_AS_STRING(digest), PyBytes_GET_SIZE(digest))
        _put_str(h, "\r\n")
        return 0
