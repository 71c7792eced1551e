"""The one error tree of pushcore.

Every protocol error carries the code it is answered with on the wire
(MQTT 5 reason code, and for errors that refuse a CONNECT the MQTT 3.1.1
CONNACK return code).  Turning an error into reply bytes happens in exactly
one place per protocol (``pushcore.mqtt.MQTTServerConnection._fail``).
"""


class PushcoreError(Exception):
    """Base of every error pushcore raises on purpose."""


class MQTTError(PushcoreError):
    """An MQTT protocol error.

    ``reason_code`` is the MQTT 5.0 reason code (§2.4) sent in CONNACK,
    PUBACK or DISCONNECT; ``connack_v3`` is the MQTT 3.1.1 CONNACK return code
    (§3.2.2.3) when the error refuses a CONNECT, else None (3.1.1 then just
    closes the connection, §4.8).
    """

    # MQTT 5.0 §2.4: 0x80 Unspecified error
    reason_code = 0x80
    connack_v3 = None

    def __init__(self, message="", reason_code=None):
        super().__init__(message or self.__class__.__name__)
        if reason_code is not None:
            self.reason_code = reason_code


# MQTT 5.0 §2.4 reason codes, one class each; 3.1.1 CONNACK codes per §3.2.2.3.
class MalformedPacket(MQTTError):
    reason_code = 0x81


class ProtocolError(MQTTError):
    reason_code = 0x82


class ImplementationSpecificError(MQTTError):
    reason_code = 0x83


class UnsupportedProtocolVersion(MQTTError):
    reason_code = 0x84
    connack_v3 = 0x01


class ClientIdentifierNotValid(MQTTError):
    reason_code = 0x85
    connack_v3 = 0x02


class BadUsernameOrPassword(MQTTError):
    reason_code = 0x86
    connack_v3 = 0x04


class NotAuthorized(MQTTError):
    reason_code = 0x87
    connack_v3 = 0x05


class ServerUnavailable(MQTTError):
    reason_code = 0x88
    connack_v3 = 0x03


class ServerBusy(MQTTError):
    reason_code = 0x89
    connack_v3 = 0x03


class KeepAliveTimeout(MQTTError):
    reason_code = 0x8D


class SessionTakenOver(MQTTError):
    reason_code = 0x8E


class TopicFilterInvalid(MQTTError):
    reason_code = 0x8F


class TopicNameInvalid(MQTTError):
    reason_code = 0x90


class PacketIdentifierInUse(MQTTError):
    reason_code = 0x91


class PacketIdentifierNotFound(MQTTError):
    reason_code = 0x92


class ReceiveMaximumExceeded(MQTTError):
    reason_code = 0x93


class TopicAliasInvalid(MQTTError):
    reason_code = 0x94


class PacketTooLarge(MQTTError):
    reason_code = 0x95


class QuotaExceeded(MQTTError):
    reason_code = 0x97


class PayloadFormatInvalid(MQTTError):
    reason_code = 0x99


class ConfigError(PushcoreError):
    """A configuration error: names the key, the line and what is allowed."""

    def __init__(self, key, message, line=None, source=None):
        self.key = key
        self.line = line
        self.source = source
        where = ""
        if source is not None:
            where = f"{source}:"
        if line is not None:
            where += f"{line}: "
        elif where:
            where += " "
        super().__init__(f"{where}{key}: {message}")


class StoreError(PushcoreError):
    """The LMDB store cannot do what was asked."""


class StoreFull(StoreError):
    """The store's map (its disk budget) is exhausted; publishes are refused."""


class RetentionFull(StoreFull):
    """The records would go past storage.retention.hard_max_bytes, and a sink
    has not delivered those in the way (overflow policy ``refuse``).

    Unlike a full map, only the batch's records are refused: its other
    writes (delivery cursors, session state) were committed, so that the
    sinks can go on and make room.
    """


class PartitionMismatch(StoreError):
    """The store was created with another partition count."""


class HTTPParseError(PushcoreError):
    """An HTTP/1.1 response (RFC 9112) the webhook client cannot parse.

    ``reason`` is a short fixed phrase naming what was wrong ("bad status
    line", "bad content-length", ...), for logs and a record's last error;
    the message adds the detail.  The connection it came from cannot be reused.
    """

    def __init__(self, reason, detail=""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
