# Declarations of the HTTP/1.1 response parser, for a Cython webhook client
# that feeds its receive buffer to ResponseParser.feed_ptr without a Python call.

# Where the parser is in the response stream (RFC 9112 §6.3 decides which body
# state follows a head).
cdef enum ParserState:
    ST_HEAD = 0          # waiting for a status line and header section
    ST_LENGTH_BODY = 1   # inside a Content-Length body
    ST_CHUNK_LINE = 2    # waiting for a chunk-size line
    ST_CHUNK_DATA = 3    # inside a chunk's data
    ST_CHUNK_END = 4     # waiting for the CRLF after a chunk's data
    ST_TRAILERS = 5      # waiting for the trailer section after the last chunk
    ST_UNTIL_CLOSE = 6   # body delimited by the connection closing
    ST_SWITCHED = 7      # after 101: the bytes belong to another protocol
    ST_CLOSED = 8        # eof() was called
    ST_FAILED = 9        # an error was raised; the parser is unusable


cdef class Response:
    cdef readonly int status
    cdef readonly str reason
    cdef readonly list headers
    cdef readonly tuple version
    cdef readonly bint keep_alive
    cdef readonly object content_length
    cdef readonly bint chunked


cdef class Data:
    cdef readonly bytes data


cdef class EndOfMessage:
    pass


cdef class ResponseParser:
    cdef readonly Py_ssize_t max_header_bytes
    cdef bint _expect_body
    cdef ParserState _state
    # Body bytes left in the Content-Length body or in the current chunk.
    cdef Py_ssize_t _remaining
    # Scan memo for a head, chunk line or trailer section not yet complete:
    # offsets from the unconsumed start of the line that is not yet terminated
    # and of the first byte not yet searched for LF.  The caller feeds the
    # unconsumed bytes again, so they need not be searched twice.
    cdef Py_ssize_t _line_off
    cdef Py_ssize_t _scan_off
    # The last feed left part of a head unconsumed (eof() then truncates it).
    cdef bint _partial
    # An interim 1xx response was parsed; the final response is still due.
    cdef bint _interim
    # The error that failed the parser, raised again by every later call.
    cdef object _error

    cdef tuple feed_ptr(self, const unsigned char* p, Py_ssize_t start, Py_ssize_t end)
    cdef Py_ssize_t _find_block(self, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                str too_large) except -2
    cdef Py_ssize_t _find_line(self, const unsigned char* p, Py_ssize_t pos,
                               Py_ssize_t end) except -2
    cdef int _on_head(self, list events, const unsigned char* p, Py_ssize_t pos,
                      Py_ssize_t stop) except -1
    cdef int _on_chunk_line(self, const unsigned char* p, Py_ssize_t pos,
                            Py_ssize_t stop) except -1
    cdef void _end_message(self, list events)
