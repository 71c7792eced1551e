"""Typed stubs for pushcore._http (HTTP/1.1 response parser, RFC 9112)."""

from typing import Any

Buffer = bytes | bytearray | memoryview

class Response:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    version: tuple[int, int]
    keep_alive: bool
    content_length: int | None
    chunked: bool
    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[bytes, bytes]],
        version: tuple[int, int],
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None: ...

class Data:
    data: bytes
    def __init__(self, data: bytes) -> None: ...

class EndOfMessage:
    def __init__(self) -> None: ...

Event = Response | Data | EndOfMessage

class ResponseParser:
    max_header_bytes: int
    expect_body: bool
    def __init__(self, max_header_bytes: int = 65536, expect_body: bool = True) -> None: ...
    def feed(self, buf: Buffer, start: int, end: int) -> tuple[list[Event], int]: ...
    def eof(self) -> EndOfMessage | None: ...

class RequestWriter:
    def __init__(
        self, start: bytes, extra: bytes, signing_key: bytes | None, content_types: Any
    ) -> None: ...
    def single(self, record: bytes, partition: int, offset: int, now_s: float) -> bytes: ...
    def batch(self, records: list[bytes], partition: int, first_offset: int, now_s: float) -> bytes: ...
