"""Typed stubs for pushcore._ingest (the C ingest path: records, batch, acks)."""

from collections import deque
from typing import Any

from pushcore._frame import AnyPacket

Buffer = bytes | bytearray | memoryview
Item = tuple[int, bytes | None, bytes]
Waiter = tuple[Any, int, int, int]

STATE_CONNECTING: int
STATE_CONNECTED: int
STATE_CLOSED: int

def partition_for(key: Buffer | str, partitions: int) -> int: ...
def id_hash(scope: bytes, msg_id: bytes) -> bytes: ...
def encode_record(
    time_ms: int,
    topic: str,
    payload: Buffer,
    qos: int = 0,
    retain: bool = False,
    msg_id: Buffer | None = None,
    key: Buffer | None = None,
    client_id: str = "",
    properties: Buffer = b"",
) -> bytes: ...

class Batch:
    items: list[Item]
    waiters: list[Waiter]
    nbytes: int
    nretain: int
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def add(
        self, partition: int, idh: bytes | None, record: bytes, conn: Any, packet_id: int, qos: int
    ) -> None: ...
    def add_ack_only(self, conn: Any, packet_id: int, qos: int) -> None: ...
    def extend(self, other: Batch) -> None: ...

class Ingest:
    partitions: int
    scope_global: bool
    batch: Batch
    now_ms: int
    def __init__(self, partitions: int, scope_global: bool = True) -> None: ...
    def add(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        msg_id: bytes | None,
        key: bytes | None,
        client_id: str,
        properties: bytes | None,
        conn: Any,
        packet_id: int,
    ) -> None: ...
    def add_ack_only(self, conn: Any, packet_id: int, qos: int) -> None: ...
    def take(self) -> Batch: ...

class ConnState:
    state: int
    version: int
    inflight: int
    acks_written: int
    client_id: str
    out: bytearray
    qos2_received: set[int]
    held_refusals: deque[tuple[int, int, int, int]]
    settings: Any
    ingest: Ingest
    def ingest_publishes(self, packets: list[AnyPacket], i: int) -> int: ...

def select_records(
    rows: list[tuple[bytes, bytes]],
    pos: int,
    next_offset: int,
    limit: int,
    routed: dict[bytes, bool],
    route_miss: Any,
    taken: list[bytes],
    first_offset: int,
) -> tuple[int, int, int, bool]: ...

def ack_committed(waiters: list[Waiter]) -> set[Any]: ...
def count_duplicates(results: list[tuple[int, int, bool]]) -> int: ...

# Log.append_batch's per-item work (pushcore/log.py does the LMDB calls).
Result = tuple[int, int, bool]

def batch_partitions(items: list[Item], partitions: int) -> tuple[list[int], int]: ...
def id_entries(
    items: list[Item], partitions: int, touched: list[int], first_offsets: list[int], now_ms: int
) -> list[tuple[int, int, int, bytes, bytes]]: ...
def batch_rows(
    items: list[Item],
    partitions: int,
    touched: list[int],
    first_offsets: list[int],
    duplicates: dict[int, Result],
) -> tuple[list[Result], list[list[tuple[bytes, bytes]]], list[int]]: ...

def record_fields(record: bytes) -> tuple[int, int, str, str, bytes, bytes]: ...
def encode_publish(
    topic: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    properties: bytes,
    payload: bytes,
    version: int,
) -> bytes: ...
