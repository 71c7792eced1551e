"""Sans-IO MQTT 3.1.1 / 5.0 server connection.

One ``MQTTServerConnection`` per client connection.  It takes bytes
(``receive``) and gives back bytes to send (``out``) and records to store
(appended to the shared ``Ingest`` batch); it never touches a socket or the
clock.  The server drives it:

    receive* -> [committed(result)*] -> ... -> lost() | close

Callback order, asyncio style::

    start -> receive+ [-> acked*] -> (closing | lost) -> end

- ``receive(buf, start, end)`` parses every complete packet, handles each one
  through the ``handle_<verb>`` table, and returns the offset of the first byte
  not consumed.  PUBLISH QoS 0/1/2 becomes a record in ``ingest.batch``; its ack
  is *not* written yet.
- ``committed(packet_id, qos, duplicate)`` is called by the server for each
  waiter once the batch holding its record is committed to the log with the
  configured durability.  Only then does the PUBACK/PUBREC go into ``out``:
  no ack ever leaves for a record that is not committed.
- ``refused(packet_id, qos, error)`` is the same for a batch the log refused
  (StoreFull): a v5 client gets PUBACK/PUBREC 0x97 Quota exceeded.
- A QoS 1/2 PUBLISH refused while parsing (v5 payload not UTF-8 as its Payload
  Format Indicator says) is answered with PUBACK/PUBREC 0x99, but only after
  the acks owed for the publishes that came before it, so acks leave in the
  order the PUBLISH packets arrived.
- Errors become reply bytes in exactly one place, ``_fail``.

After ``receive`` the server looks at ``out`` (bytes to send), ``close_after_flush``
(send ``out`` then close) and ``inflight`` (unacked inbound QoS 1/2 publishes,
for 3.1.1 flow control).
"""

import json
from collections import deque

from . import _frame
from ._frame import (
    Connack,
    Disconnect,
    Parser,
    Suback,
    Unsuback,
    encode,
    encode_ack,
    encode_properties,
)
from ._ingest import STATE_CLOSED, STATE_CONNECTED, STATE_CONNECTING, ConnState
from .broker import MAX_STORED_CLIENT_ID
from .errors import (
    ClientIdentifierNotValid,
    ImplementationSpecificError,
    KeepAliveTimeout,
    MQTTError,
    PayloadFormatInvalid,
    ProtocolError,
    ReceiveMaximumExceeded,
    SessionTakenOver,
    TopicAliasInvalid,
    UnsupportedProtocolVersion,
)

# MQTT 3.1.1 §3.1.2.2: protocol level 4; MQTT 5.0 §3.1.2.2: protocol version 5.
MQTT311 = 4
MQTT5 = 5

# MQTT 5.0 §3.2.2.2 reason codes used in CONNACK.
CONNACK_BAD_AUTH_METHOD = 0x8C
# MQTT 5.0 §3.4.2.1: 0x10 No matching subscribers is still a success.
PUBACK_SUCCESS = 0x00
# MQTT 5.0 §3.9.3 / 3.1.1 §3.9.3: SUBACK failure codes.
SUBACK_FAILURE_V3 = 0x80
SUBACK_IMPLEMENTATION_SPECIFIC = 0x83
# MQTT 5.0 §3.11.3: UNSUBACK 0x11 No subscription existed.
UNSUBACK_NO_SUBSCRIPTION = 0x11
# MQTT 5.0 §3.14.2.1: 0x9B QoS not supported.
QOS_NOT_SUPPORTED = 0x9B
# MQTT 5.0 §3.14.2.1: 0x00 Normal disconnection.
DISCONNECT_NORMAL = 0x00
# MQTT 5.0 §3.14.2.1: 0x8B Server shutting down.
SERVER_SHUTTING_DOWN = 0x8B

class MQTTSettings:
    """What the server configured for its MQTT listener (plain values, no I/O)."""

    __slots__ = ("max_packet_size", "receive_maximum", "topic_alias_maximum",
                 "keepalive_max", "max_qos", "allow_zero_length_clientid",
                 "id_property", "key_property", "json_field")

    def __init__(self, max_packet_size=1 << 20, receive_maximum=1024, topic_alias_maximum=64,
                 keepalive_max=0, max_qos=2, allow_zero_length_clientid=True,
                 id_property="id", key_property="key", json_field=None):
        self.max_packet_size = max_packet_size
        self.receive_maximum = receive_maximum
        self.topic_alias_maximum = topic_alias_maximum
        self.keepalive_max = keepalive_max
        self.max_qos = max_qos
        self.allow_zero_length_clientid = allow_zero_length_clientid
        self.id_property = id_property
        self.key_property = key_property
        self.json_field = json_field


class MQTTServerConnection(ConnState):
    """The MQTT state of one client connection (see the module docstring).

    Its hot fields (state, version, client_id, inflight, acks_written, out,
    qos2_received, held_refusals, settings, ingest) live in the C base class
    ``ConnState`` (pushcore/_ingest.pyx), whose loops do the common case of
    ``handle_publish`` and ``committed`` without entering Python per message.
    """

    # False sends every packet through the handle_<verb> table: the reference
    # the C path is checked against (tests/test_ingest_fast.py).
    fast_path = True

    def __init__(self, settings, ingest, server=None):
        self.settings = settings
        self.ingest = ingest
        # The server side of CONNECT: ``server.connected(conn)`` registers the
        # client id (session takeover) and ``server.assign_client_id()``.
        self.server = server
        # The server's connection object for this client (opaque here).
        self.transport = None
        self.parser = Parser(settings.max_packet_size, 0)
        self.state = STATE_CONNECTING
        self.version = 0
        self.client_id = ""
        self.keepalive = 0
        self.out = bytearray()
        self.close_after_flush = False
        self.close_reason = None
        self.disconnected_cleanly = False
        # Inbound QoS 1/2 publishes stored or being stored, not yet acked.
        self.inflight = 0
        # MQTT 5.0 §4.3.3 / 3.1.1 §4.3.3: QoS 2 packet ids between PUBLISH and
        # PUBREL; a re-sent PUBLISH with one of these ids is not stored again.
        self.qos2_received = set()
        # MQTT 5.0 §4.6 [MQTT-4.6.0-2, -3]: PUBACK/PUBREC go out in the order the
        # PUBLISH packets arrived.  A refusal decided while parsing waits here until
        # the acks owed before it are written: (acks_written to wait for, packet id,
        # qos, reason code).
        self.acks_written = 0
        self.held_refusals = deque()
        # MQTT 5.0 §3.1.2.11.7: with Request Problem Information 0 the server sends no
        # Reason String except in PUBLISH, CONNACK and DISCONNECT.
        self.problem_information = True
        self.topic_aliases = {}
        self.will = None
        self.max_packet_out = 268435460
        self.errors = 0
        # The broker role (pushcore/broker.py): this client's session, and what the
        # client allows for deliveries to it (MQTT 5.0 §3.1.2.11.3, §3.1.2.11.5).
        self.broker = server.broker if server is not None else None
        self.session = None
        self.session_expiry = 0
        self.receive_maximum_out = 65535
        self.topic_alias_maximum_out = 0
        self.aliases_out = {}
        self.outbuf_high = server.outbuf_high if server is not None else 1 << 20

    # -- input -----------------------------------------------------------

    def receive(self, buf, start, end):
        """Handle every complete packet in buf[start:end]; return the first unconsumed offset."""
        packets, consumed, error = self.parser.parse(buf, start, end)
        handlers = self._handlers
        fast_path = self.fast_path
        i = 0
        n = len(packets)
        while i < n:
            if fast_path:
                # A run of ordinary PUBLISH packets becomes records in one C call; it
                # stops at the first packet that needs handle_<verb> (ConnState).
                i = self.ingest_publishes(packets, i)
                if i == n:
                    break
            if self.state == STATE_CLOSED:
                break
            packet = packets[i]
            i += 1
            try:
                handlers[packet.type](self, packet)
            except MQTTError as err:
                self._fail(err)
                break
        if error is not None and self.state != STATE_CLOSED:
            self._fail(error)
        return consumed

    def handle_connect(self, p):
        if self.state != STATE_CONNECTING:
            # MQTT 5.0 §3.1: a second CONNECT is a Protocol Error.
            raise ProtocolError("second CONNECT")
        s = self.settings
        self.version = p.protocol_level
        props = p.properties
        if props is not None:
            if "authentication_method" in props:
                raise MQTTError("enhanced authentication is not supported", CONNACK_BAD_AUTH_METHOD)
            self.problem_information = props.get("request_problem_information", 1) == 1
        client_id = p.client_id
        assigned = None
        if not client_id:
            # MQTT 3.1.1 §3.1.3.1: a zero-length id needs CleanSession=1.
            if not s.allow_zero_length_clientid or (self.version == MQTT311 and not p.clean_start):
                raise ClientIdentifierNotValid("empty client id")
            client_id = assigned = self.server.assign_client_id() if self.server else "auto"
        self.client_id = client_id
        self.keepalive = p.keepalive
        server_keepalive = None
        if s.keepalive_max and (p.keepalive == 0 or p.keepalive > s.keepalive_max):
            if self.version != MQTT5:
                # MQTT 3.1.1 has no Server Keep Alive: the client would go on pinging at its
                # own, longer interval and be closed at 1.5x ours.  Refuse it up front with
                # CONNACK 0x02 Identifier rejected, as Mosquitto's max_keepalive does.
                raise ClientIdentifierNotValid(
                    f"keepalive {p.keepalive} is 0 or above mqtt.keepalive_max {s.keepalive_max}")
            # MQTT 5.0 §3.2.2.3.14: the server tells the client the keepalive it must use.
            self.keepalive = s.keepalive_max
            server_keepalive = s.keepalive_max
        if props is not None:
            self.max_packet_out = props.get("maximum_packet_size", self.max_packet_out)
            self.receive_maximum_out = props.get("receive_maximum", 65535)
            self.topic_alias_maximum_out = props.get("topic_alias_maximum", 0)
        requested_expiry = props.get("session_expiry_interval", 0) if props is not None else 0
        if self.broker is not None:
            self.session_expiry = self.broker.session_expiry_for(self.version, p.clean_start,
                                                                 requested_expiry)
            if self.session_expiry and len(client_id.encode()) > MAX_STORED_CLIENT_ID:
                # A kept session is stored under its client id (an LMDB key, bounded).
                raise ClientIdentifierNotValid(
                    f"client id of {len(client_id.encode())} bytes: at most "
                    f"{MAX_STORED_CLIENT_ID} for a session kept after the connection")
        if p.will is not None and p.will.qos > s.max_qos:
            # MQTT 5.0 §3.2.2.2: a Will QoS above Maximum QoS is CONNACK 0x9B.
            raise MQTTError("will QoS above the server's maximum", QOS_NOT_SUPPORTED)
        self.will = p.will
        self.state = STATE_CONNECTED
        if self.server is not None:
            self.server.connected(self)
        present = False
        broker = self.broker
        if broker is not None:
            present = broker.connect(self, p.clean_start, self.session_expiry,
                                     self.ingest.now_ms)
        if self.version == MQTT5:
            cprops = {
                "receive_maximum": s.receive_maximum,
                "maximum_packet_size": s.max_packet_size,
                "topic_alias_maximum": s.topic_alias_maximum,
            }
            if s.max_qos < 2:
                cprops["maximum_qos"] = s.max_qos
            if server_keepalive is not None:
                cprops["server_keep_alive"] = server_keepalive
            if assigned is not None:
                cprops["assigned_client_identifier"] = assigned
            if self.session_expiry != requested_expiry:
                # MQTT 5.0 §3.2.2.3.2: sessions.max_expiry shortened the client's interval.
                cprops["session_expiry_interval"] = self.session_expiry
            self.out += encode(Connack(present, 0, cprops), MQTT5)
        else:
            self.out += encode(Connack(present, 0, None), MQTT311)
        if broker is not None:
            broker.resume(self.session)

    def handle_publish(self, p):
        if self.state != STATE_CONNECTED:
            raise ProtocolError("PUBLISH before CONNECT")
        qos = p.qos
        s = self.settings
        if qos > s.max_qos:
            # MQTT 5.0 §3.3.1.2: a QoS above Maximum QoS is 0x9B QoS not supported.
            raise MQTTError("QoS above the server's maximum", QOS_NOT_SUPPORTED)
        topic = p.topic
        props = p.properties
        msg_id = key = None
        raw_props = b""
        if props is not None:
            if "subscription_identifier" in props:
                # MQTT 5.0 §3.3.4 [MQTT-3.3.4-6]: only the server puts one in a PUBLISH.
                raise ProtocolError("subscription_identifier in a PUBLISH from the client")
            alias = props.get("topic_alias")
            if alias is not None:
                # MQTT 5.0 §3.3.2.3.4: 0 or above Topic Alias Maximum is 0x94.
                if alias == 0 or alias > s.topic_alias_maximum:
                    raise TopicAliasInvalid(f"topic alias {alias}")
                if topic:
                    self.topic_aliases[alias] = topic
                else:
                    topic = self.topic_aliases.get(alias)
                    if topic is None:
                        raise ProtocolError(f"unknown topic alias {alias}")
                props = dict(props)
                del props["topic_alias"]
            user = props.get("user_property")
            if user:
                msg_id, key = _id_and_key(user, s)
            if props.get("payload_format_indicator") == 1 and not _is_utf8(p.payload):
                # MQTT 5.0 §3.3.2.3.2: the receiver MAY check the payload and answer
                # PUBACK, PUBREC or DISCONNECT 0x99.  QoS 1/2: the ack refuses this one
                # message and ends its flow (§4.3.2, §4.3.3), so the client does not resend
                # it after every reconnect, and the connection goes on.  QoS 0 has no ack;
                # nothing is dropped silently, so that is a DISCONNECT.
                if qos == 0:
                    raise PayloadFormatInvalid("payload is not UTF-8")
                self._refuse_in_order(p.packet_id, qos, PayloadFormatInvalid.reason_code)
                return
            if props:
                raw_props = encode_properties(props)
        elif s.json_field is not None and self.version == MQTT311:
            msg_id = self._json_id(p.payload)
        if qos == 0:
            self.ingest.add(topic, p.payload, 0, p.retain, msg_id, key, self.client_id,
                            raw_props, None, 0)
            return
        packet_id = p.packet_id
        if qos == 2 and packet_id in self.qos2_received:
            # MQTT 5.0 §4.3.3: until PUBREL the same packet id is the same message; it was
            # stored (or is being stored) already.  Answer once it is committed.
            self.inflight += 1
            self.ingest.add_ack_only(self, packet_id, 2)
            return
        self.inflight += 1
        if self.version == MQTT5 and self.inflight > s.receive_maximum:
            # MQTT 5.0 §3.3.4: more unacked QoS>0 publishes than Receive Maximum.
            raise ReceiveMaximumExceeded("receive maximum exceeded")
        if qos == 2:
            self.qos2_received.add(packet_id)
        self.ingest.add(topic, p.payload, qos, p.retain, msg_id, key, self.client_id,
                        raw_props, self, packet_id)

    def _json_id(self, payload):
        """The id from a JSON object payload's configured field, for 3.1.1 publishers."""
        if not payload or payload[:1] != b"{":
            return None
        try:
            value = json.loads(payload).get(self.settings.json_field)
        except (ValueError, AttributeError, RecursionError):
            # Not JSON, or nested past the interpreter's limit ({"a":{"a":... fits
            # easily in one packet): no id, the message is stored all the same.
            return None
        if value is None:
            return None
        return str(value).encode()

    def handle_pubrel(self, p):
        if self.state != STATE_CONNECTED:
            raise ProtocolError("PUBREL before CONNECT")
        known = p.packet_id in self.qos2_received
        self.qos2_received.discard(p.packet_id)
        if self.version == MQTT5 and not known:
            # MQTT 5.0 §3.7.2.1: 0x92 Packet Identifier not found.
            self.out += encode_ack(_frame.PUBCOMP, p.packet_id, 0x92, MQTT5)
        else:
            self.out += encode_ack(_frame.PUBCOMP, p.packet_id, 0, self.version)

    def handle_pingreq(self, p):
        if self.state != STATE_CONNECTED:
            raise ProtocolError("PINGREQ before CONNECT")
        session = self.session
        if session is not None and session.holding is not None:
            # Deliveries wait for a commit (QoS 2 to a stored session): the answer
            # follows them, so a PINGREQ still tells the client it has everything owed.
            self.server.after_commit(self._pingresp)
            return
        self._pingresp()

    def _pingresp(self):
        if self.state == STATE_CLOSED:
            return
        # MQTT 3.1.1 §3.12 / 5.0 §3.12: PINGRESP is two fixed bytes.
        self.out += b"\xd0\x00"
        if self.transport is not None:
            self.transport.flush()

    def handle_subscribe(self, p):
        if self.state != STATE_CONNECTED:
            raise ProtocolError("SUBSCRIBE before CONNECT")
        broker = self.broker
        if broker is None:
            # A protocol object without a server (codec tests): no broker to subscribe to.
            codes = [SUBACK_IMPLEMENTATION_SPECIFIC if self.version == MQTT5
                     else SUBACK_FAILURE_V3] * len(p.subscriptions)
            self.out += encode(Suback(p.packet_id, codes, None), self.version)
            return
        sub_id = 0
        if p.properties:
            ids = p.properties.get("subscription_identifier")
            if ids:
                sub_id = ids[0] if isinstance(ids, list) else ids
        session = self.session
        codes, wanted = broker.subscribe(session, p.subscriptions, sub_id)
        suback = encode(Suback(p.packet_id, codes, None), self.version)
        mark = session.enqueued
        if session.persistent:
            # The subscription is part of the stored session: SUBACK only once the
            # session record holding it is committed, like a PUBACK.
            self.server.after_commit(self._after_commit, suback, wanted, mark)
        else:
            self.out += suback
            if wanted:
                # Retained messages once what is committing now is committed: a newer
                # retained message in that batch is the one to send.
                self.server.after_commit(self._after_commit, b"", wanted, mark)

    def _after_commit(self, reply, wanted, mark):
        """A SUBACK/UNSUBACK and retained messages that waited for the commit.

        A stored session gets its retained messages queued even when this
        connection is gone: they are part of what the subscription owes it.
        """
        if self.state != STATE_CLOSED:
            self.out += reply
        if wanted and (self.state != STATE_CLOSED or self.session.persistent):
            self.broker.send_retained(self.session, wanted, self.ingest.now_ms, mark)
        if self.state != STATE_CLOSED:
            self.transport.flush()

    def handle_unsubscribe(self, p):
        if self.state != STATE_CONNECTED:
            raise ProtocolError("UNSUBSCRIBE before CONNECT")
        if self.broker is None:
            codes = [UNSUBACK_NO_SUBSCRIPTION] * len(p.filters)
        else:
            codes = self.broker.unsubscribe(self.session, p.filters)
        if self.version == MQTT5:
            unsuback = encode(Unsuback(p.packet_id, codes, None), MQTT5)
        else:
            unsuback = encode(Unsuback(p.packet_id, [], None), MQTT311)
        if self.session is not None and self.session.persistent:
            # As SUBACK: once the stored session no longer holds the subscription.
            self.server.after_commit(self._after_commit, unsuback, None, 0)
        else:
            self.out += unsuback

    def handle_disconnect(self, p):
        if self.version == MQTT5 and p.properties and self.session is not None:
            expiry = p.properties.get("session_expiry_interval")
            if expiry is not None:
                if self.session_expiry == 0 and expiry != 0:
                    # MQTT 5.0 §3.14.2.2.2 [MQTT-3.14.2-2]: a session that was to end
                    # with the connection cannot be extended at DISCONNECT.
                    raise ProtocolError("session expiry set at DISCONNECT after 0 at CONNECT")
                self.session_expiry = expiry
                self.broker.set_expiry(self.session, expiry)
        if self.version == MQTT311 or p.reason_code == DISCONNECT_NORMAL:
            # MQTT 3.1.1 §3.14.4 / 5.0 §3.14.4 [MQTT-3.14.4-3]: only a normal DISCONNECT
            # (v5 reason 0x00) discards the Will; 0x04 and the error codes keep it.
            self.will = None
        self.disconnected_cleanly = True
        self.close_reason = "client disconnect"
        self.state = STATE_CLOSED
        self.close_after_flush = True

    def handle_puback(self, p):
        """PUBACK (QoS 1) or PUBCOMP (QoS 2) for a delivery: it is done."""
        if self.state != STATE_CONNECTED or self.broker is None:
            raise ProtocolError(f"unexpected packet type {p.type}")
        if not self.broker.puback(self.session, p.packet_id):
            # MQTT 5.0 §4.3: an ack for an id not in flight (a late duplicate) is ignored.
            self.server.metrics["acks_unknown_packet_id"] += 1

    def handle_pubrec(self, p):
        if self.state != STATE_CONNECTED or self.broker is None:
            raise ProtocolError(f"unexpected packet type {p.type}")
        if p.reason_code >= 0x80:
            # MQTT 5.0 §4.3.3: a PUBREC with a failure code ends the flow; no PUBREL.
            self.broker.pubrec_refused(self.session, p.packet_id)
            return
        packet_id = p.packet_id
        if self.broker.pubrec(self.session, packet_id, lambda: self._send_pubrel(packet_id)):
            return
        if self.version == MQTT5:
            # MQTT 5.0 §3.6.2.1: 0x92 Packet Identifier not found.
            self.out += encode_ack(_frame.PUBREL, p.packet_id, 0x92, MQTT5)
        else:
            self.out += encode_ack(_frame.PUBREL, p.packet_id, 0, MQTT311)

    def _send_pubrel(self, packet_id):
        """MQTT 5.0 §4.3.3: PUBREL once the PUBREC is recorded (maybe after a commit)."""
        if self.state == STATE_CLOSED:
            return
        self.out += encode_ack(_frame.PUBREL, packet_id, 0, self.version)
        if self.transport is not None:
            self.transport.flush()

    def handle_unexpected(self, p):
        # MQTT 5.0 §4.13: a packet only the server sends is a Protocol Error.
        raise ProtocolError(f"unexpected packet type {p.type}")

    def handle_auth(self, p):
        raise ProtocolError("AUTH without an authentication method")

    _handlers = {
        _frame.CONNECT: handle_connect,
        _frame.CONNACK: handle_unexpected,
        _frame.PUBLISH: handle_publish,
        _frame.PUBACK: handle_puback,
        _frame.PUBREC: handle_pubrec,
        _frame.PUBREL: handle_pubrel,
        _frame.PUBCOMP: handle_puback,
        _frame.SUBSCRIBE: handle_subscribe,
        _frame.SUBACK: handle_unexpected,
        _frame.UNSUBSCRIBE: handle_unsubscribe,
        _frame.UNSUBACK: handle_unexpected,
        _frame.PINGREQ: handle_pingreq,
        _frame.PINGRESP: handle_unexpected,
        _frame.DISCONNECT: handle_disconnect,
        _frame.AUTH: handle_auth,
    }

    # -- results of the group commit --------------------------------------

    def committed(self, packet_id, qos):
        """The record for this publish is committed: now, and only now, ack it.

        The server acks a whole batch with ``_ingest.ack_committed``, which does
        this in C and calls this method for a connection with held refusals.
        """
        self.inflight -= 1
        if self.state == STATE_CLOSED:
            return
        self.out += encode_ack(_frame.PUBACK if qos == 1 else _frame.PUBREC, packet_id, 0, self.version)
        self.acks_written += 1
        if self.held_refusals:
            self._release_refusals()

    def refused(self, packet_id, qos, error):
        """The log refused the batch (StoreFull).  Only v5 can say so in the ack."""
        self.inflight -= 1
        if self.state == STATE_CLOSED:
            return
        if qos == 2:
            # MQTT 5.0 §4.3.3: a PUBREC >= 0x80 ends the flow; the id may be used again.
            self.qos2_received.discard(packet_id)
        self.out += encode_ack(_frame.PUBACK if qos == 1 else _frame.PUBREC, packet_id,
                               error.reason_code, self.version)
        self.acks_written += 1
        if self.held_refusals:
            self._release_refusals()

    def _refuse_in_order(self, packet_id, qos, reason_code):
        """Refuse one v5 QoS 1/2 PUBLISH in its ack, after the acks owed before it."""
        held = self.held_refusals
        if self.inflight + len(held) >= self.settings.receive_maximum:
            # MQTT 5.0 §3.3.4: the client counts a refused publish until its ack arrives.
            raise ReceiveMaximumExceeded("receive maximum exceeded")
        self.errors += 1
        if self.server is not None:
            self.server.metrics["messages_refused_payload_format"] += 1
        if self.inflight:
            held.append((self.acks_written + self.inflight, packet_id, qos, reason_code))
        else:
            self.out += encode_ack(_frame.PUBACK if qos == 1 else _frame.PUBREC, packet_id,
                                   reason_code, MQTT5)

    def _release_refusals(self):
        held = self.held_refusals
        while held and held[0][0] <= self.acks_written:
            _, packet_id, qos, reason_code = held.popleft()
            self.out += encode_ack(_frame.PUBACK if qos == 1 else _frame.PUBREC, packet_id,
                                   reason_code, MQTT5)

    # -- server-initiated -------------------------------------------------

    def keepalive_expired(self):
        self._fail(KeepAliveTimeout("keepalive timeout"))

    def taken_over(self):
        self._fail(SessionTakenOver("session taken over"))

    def connection_lost(self):
        """The network connection is gone; publish the Will Message if one is due.

        MQTT 3.1.1 §3.1.2.5 / 5.0 §3.1.2.5: unless the client ended with a
        normal DISCONNECT, its Will Message is published when the connection
        closes (keepalive lapse, protocol error, socket error, takeover).
        MQTT 5.0 §3.1.3.2.2: with a Will Delay Interval and a session that
        outlives the connection, it waits that long (at most until the session
        ends) and is not published if the client reconnects in time.
        Published means stored in the log like a QoS 0 publish from this
        client (no ack to wait for), then routed to subscribers.
        """
        will = self.will
        if will is None:
            return
        self.will = None
        delay = will.properties.get("will_delay_interval", 0) if will.properties else 0
        if delay and self.broker is not None and self.session_expiry:
            self.broker.delay_will(self.client_id, will, delay, self.ingest.now_ms)
        else:
            publish_will(self.ingest, self.settings, self.client_id, will)

    def discard_will(self):
        """The server is shutting down: no Will (the client reconnects to a new run)."""
        self.will = None

    def internal_error(self, err):
        """A bug surfaced while handling this connection's input."""
        self._fail(ImplementationSpecificError(f"internal error: {type(err).__name__}"))

    def shutdown(self):
        """The server is stopping (after its final commit and acks)."""
        self._fail(MQTTError("server shutting down", SERVER_SHUTTING_DOWN))

    def _fits(self, props):
        return len(encode_properties(props)) + 16 <= self.max_packet_out

    def _fail(self, err):
        """Turn an error into its reply bytes and mark the connection closing.

        The one place errors become bytes: before CONNACK, a CONNACK with the
        reason (3.1.1: its return code, or nothing when 3.1.1 has none);
        after it, a v5 DISCONNECT with the reason code (3.1.1 just closes,
        §4.8).
        """
        self.errors += 1
        self.close_reason = err
        if self.state == STATE_CONNECTING:
            if isinstance(err, UnsupportedProtocolVersion) and getattr(err, "protocol_level", 0) != MQTT5:
                # MQTT 3.1.1 §3.1.2.2: CONNACK 0x01 in the 3.1.1 format.
                self.out += encode(Connack(False, 0x01, None), MQTT311)
            elif self.version == MQTT5 or getattr(err, "protocol_level", 0) == MQTT5:
                self.out += encode(Connack(False, err.reason_code, None), MQTT5)
            elif self.version == MQTT311 and err.connack_v3 is not None:
                self.out += encode(Connack(False, err.connack_v3, None), MQTT311)
        elif self.state == STATE_CONNECTED and self.version == MQTT5:
            props = {"reason_string": str(err)[:200]}
            if not self._fits(props):
                props = None
            self.out += encode(Disconnect(err.reason_code, props), MQTT5)
        self.state = STATE_CLOSED
        self.close_after_flush = True


def publish_will(ingest, settings, client_id, will):
    """Add a Will Message to the pending batch, as a publish from ``client_id``."""
    msg_id = key = None
    raw_props = b""
    props = will.properties
    if props:
        props = {k: v for k, v in props.items() if k != "will_delay_interval"}
        user = props.get("user_property")
        if user:
            msg_id, key = _id_and_key(user, settings)
        if props:
            raw_props = encode_properties(props)
    ingest.add(will.topic, will.payload, will.qos, will.retain, msg_id, key, client_id,
               raw_props, None, 0)


def _id_and_key(user_properties, settings):
    """The message id and ordering key among a message's user properties (bytes or None)."""
    msg_id = key = None
    id_name = settings.id_property
    key_name = settings.key_property
    for name, value in user_properties:
        if name == id_name:
            msg_id = value.encode()
        elif name == key_name:
            key = value.encode()
    return msg_id, key


def _is_utf8(payload):
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True
