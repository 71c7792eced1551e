"""Typed stubs for pushcore._frame (MQTT 3.1.1 / 5.0 framing core)."""

from typing import Any

from pushcore.errors import MQTTError

Buffer = bytes | bytearray | memoryview
Properties = dict[str, Any]

CONNECT: int
CONNACK: int
PUBLISH: int
PUBACK: int
PUBREC: int
PUBREL: int
PUBCOMP: int
SUBSCRIBE: int
SUBACK: int
UNSUBSCRIBE: int
UNSUBACK: int
PINGREQ: int
PINGRESP: int
DISCONNECT: int
AUTH: int

class Packet:
    @property
    def type(self) -> int: ...

class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    def __init__(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None: ...

class Connect(Packet):
    client_id: str
    clean_start: bool
    keepalive: int
    protocol_level: int
    protocol_name: str
    username: str | None
    password: bytes | None
    will: Will | None
    properties: Properties | None
    def __init__(
        self,
        client_id: str = "",
        clean_start: bool = True,
        keepalive: int = 60,
        protocol_level: int = 4,
        protocol_name: str = "MQTT",
        username: str | None = None,
        password: bytes | None = None,
        will: Will | None = None,
        properties: Properties | None = None,
    ) -> None: ...

class Connack(Packet):
    session_present: bool
    reason_code: int
    properties: Properties | None
    def __init__(
        self,
        session_present: bool = False,
        reason_code: int = 0,
        properties: Properties | None = None,
    ) -> None: ...

class Publish(Packet):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: Properties | None
    def __init__(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        packet_id: int = 0,
        properties: Properties | None = None,
    ) -> None: ...

class Ack(Packet):
    packet_id: int
    reason_code: int
    properties: Properties | None
    def __init__(
        self,
        type: int,
        packet_id: int,
        reason_code: int = 0,
        properties: Properties | None = None,
    ) -> None: ...

class Subscribe(Packet):
    packet_id: int
    subscriptions: list[tuple[str, int]]
    properties: Properties | None
    def __init__(
        self,
        packet_id: int,
        subscriptions: list[tuple[str, int]],
        properties: Properties | None = None,
    ) -> None: ...

class Suback(Packet):
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None
    def __init__(
        self, packet_id: int, reason_codes: list[int], properties: Properties | None = None
    ) -> None: ...

class Unsubscribe(Packet):
    packet_id: int
    filters: list[str]
    properties: Properties | None
    def __init__(
        self, packet_id: int, filters: list[str], properties: Properties | None = None
    ) -> None: ...

class Unsuback(Packet):
    packet_id: int
    reason_codes: list[int]
    properties: Properties | None
    def __init__(
        self,
        packet_id: int,
        reason_codes: list[int] | None = None,
        properties: Properties | None = None,
    ) -> None: ...

class Pingreq(Packet):
    def __init__(self) -> None: ...

class Pingresp(Packet):
    def __init__(self) -> None: ...

class Disconnect(Packet):
    reason_code: int
    properties: Properties | None
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

class Auth(Packet):
    reason_code: int
    properties: Properties | None
    def __init__(self, reason_code: int = 0, properties: Properties | None = None) -> None: ...

AnyPacket = (
    Connect | Connack | Publish | Ack | Subscribe | Suback | Unsubscribe | Unsuback
    | Pingreq | Pingresp | Disconnect | Auth
)

class Parser:
    version: int
    max_packet_size: int
    def __init__(self, max_packet_size: int = 268435460, version: int = 0) -> None: ...
    def parse(
        self, buf: Buffer, start: int, end: int
    ) -> tuple[list[AnyPacket], int, MQTTError | None]: ...

def encode(packet: AnyPacket, version: int) -> bytes: ...
def encode_ack(ptype: int, packet_id: int, reason_code: int = 0, version: int = 4) -> bytes: ...
def encode_properties(props: Properties | None) -> bytes: ...
def decode_properties(buf: Buffer) -> Properties | None: ...
def encode_remaining_length(n: int) -> bytes: ...
def decode_remaining_length(buf: Buffer, start: int, end: int) -> tuple[int, int]: ...
