"""The pending group-commit batch, shared by every protocol.

A protocol turns each inbound message into a record and appends it here with
the ack it waits for; the server's writer commits the whole batch in one LMDB
transaction and only then hands each waiter its result.  Nothing in this
module sends anything: it only keeps records and waiters side by side.

``Batch`` and ``Ingest`` are C classes (pushcore/_ingest.pyx, where their
docstrings are): the MQTT fast path appends records to them without entering
Python once per message.
"""

from ._ingest import Batch, Ingest

__all__ = ["Batch", "Ingest"]
