"""pushcore: a durable push-message ingestion gateway.

The core library: sans-IO protocols, the record format, the LMDB log, the
configuration, and the blocking publisher client.
"""

__version__ = "0.1.0"
