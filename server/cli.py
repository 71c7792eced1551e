"""The ``pushcore`` command: serve, check-config, log stats|dump, sessions, dlq, pub, sub."""

import argparse
import base64
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from struct import Struct

from pushcore.config import Duration, load_config
from pushcore.errors import ConfigError, MQTTError, StoreError

EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h, as systemd and mosquitto users know it
# mosquitto_sub exits with 27 when its -W timeout ends it; scripts written for
# one work with the other.
EXIT_SUB_TIMEOUT = 27


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exc if any)."""

    def format(self, record):
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(level="info", fmt="text"):
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _config(args, extra=None):
    overrides = dict(extra or {})
    if getattr(args, "data", None):
        overrides["storage.data_dir"] = args.data
    return load_config(getattr(args, "config", None), overrides)


def cmd_serve(args):
    overrides = {}
    if args.mqtt:
        overrides["mqtt.bind"] = args.mqtt
    if args.durability:
        overrides["storage.durability"] = args.durability
    cfg = _config(args, overrides)
    setup_logging(cfg.log.level, cfg.log.format)
    from .daemon import Server

    Server(cfg).run()
    return 0


def cmd_check_config(args):
    cfg = load_config(args.file)
    print(f"{args.file}: ok ({cfg.storage.partitions} partitions, durability "
          f"{cfg.storage.durability}, mqtt on {cfg.mqtt.bind[0]}:{cfg.mqtt.bind[1]})")
    return 0


def _open_readonly(args, cfg=None):
    from pushcore.log import Log

    cfg = cfg or _config(args)
    return Log(cfg.storage.data_dir, partitions=None, readonly=True)


def cmd_log_stats(args):
    cfg = _config(args)
    store = _open_readonly(args, cfg)
    try:
        stats = store.stats()
        # Which sinks the file configures is known only when one was given (-c).
        configured = set(cfg.sinks) if getattr(args, "config", None) else None
        stats["sinks"] = _sink_stats(store, stats["per_partition"], configured)
    finally:
        store.close()
    # The store does not hold its retention settings: these are the configuration's
    # (-c), which is what the daemon runs with when given the same file.
    retention = cfg.storage.retention
    stats["hard_max_bytes"] = retention.hard_max_bytes
    stats["overflow"] = retention.overflow
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    print(f"store     {stats.get('path', '')}")
    print(f"partitions {stats['partitions']}   "
          f"ids {stats.get('ids', 0)}")
    if "map_size" in stats:
        print(f"map       {stats.get('used_bytes', 0)} / {stats['map_size']} bytes used")
    print(f"kept      {stats['records']} records, {stats['bytes']} bytes")
    if retention.hard_max_bytes:
        print(f"hard max  {stats['bytes']} / {retention.hard_max_bytes} bytes kept "
              f"(storage.retention.hard_max_bytes), overflow: {retention.overflow}")
    print(f"{'partition':>9} {'first':>12} {'next':>12} {'records':>10} {'bytes':>14}")
    for p in stats["per_partition"]:
        print(f"{p['partition']:>9} {p['first']:>12} {p['next']:>12} {p['count']:>10} {p['bytes']:>14}")
    if stats["sinks"]:
        print()
        print(f"{'sink':<24} {'backlog':>12} {'retries':>10} {'dead letters':>12}")
        for s in stats["sinks"]:
            note = "   (not in the configuration: holds nothing back)" \
                if s["configured"] is False else ""
            print(f"{s['name']:<24} {s['backlog']:>12} {s['retries']:>10} "
                  f"{s['dead_letters']:>12}{note}")
        print()
        print(f"{'sink':<24} {'partition':>9} {'cursor':>12} {'backlog':>12}")
        for s in stats["sinks"]:
            for p in s["per_partition"]:
                print(f"{s['name']:<24} {p['partition']:>9} {p['cursor']:>12} {p['backlog']:>12}")
    return 0


def _sink_stats(store, per_partition, configured=None):
    """Per registered sink, by id: its cursor and backlog per partition, its
    retries pending and dead letters (the store counts those per sink only),
    and whether ``configured`` (names, or None when unknown) has it.

    The backlog is what is kept and not yet passed: records trimmed before a
    sink reached them (overflow drop_oldest, or a sink out of the configuration)
    are not waiting for it any more."""
    cursors = store.cursors()
    counts = store.delivery_counts()
    out = []
    for name, sink_id in sorted(store.sinks().items(), key=lambda item: item[1]):
        parts = []
        for p in per_partition:
            # No cursor yet: the sink has read nothing, as retention assumes.
            cursor = cursors.get((sink_id, p["partition"]), 0)
            parts.append({"partition": p["partition"], "cursor": cursor,
                          "backlog": max(0, p["next"] - max(cursor, p["first"]))})
        retries, dead = counts.get(sink_id, (0, 0))
        out.append({"name": name, "id": sink_id, "backlog": sum(p["backlog"] for p in parts),
                    "retries": retries, "dead_letters": dead, "per_partition": parts,
                    "configured": None if configured is None else name in configured})
    return out


def cmd_sessions(args):
    """Persistent sessions as stored: subscriptions and queues (read-only, safe while serving)."""
    from pushcore.record import decode_record

    store = _open_readonly(args)
    try:
        sessions = store.sessions()
        if args.client is not None:
            sessions = [s for s in sessions if s["client_id"] == args.client]
            if not sessions:
                print(f"pushcore sessions: no stored session for client id {args.client!r}",
                      file=sys.stderr)
                return 1
            queue = store.queue(args.client, args.limit)
        retained = len(store.retained())
    finally:
        store.close()
    if args.client is not None:
        s = sessions[0]
        entries = []
        for seq, qos, flags, packet_id, sub_ids, share, record in queue:
            r = decode_record(record)
            entries.append({"seq": seq, "topic": r.topic, "qos": qos, "bytes": len(r.payload),
                            "sent": bool(flags & 0x02), "pubrec": bool(flags & 0x04),
                            "packet_id": packet_id, "subscription_ids": list(sub_ids),
                            "share": share, "time_ms": r.time_ms,
                            "publisher": r.client_id})
        if args.json:
            print(json.dumps({**s, "queue": entries}, indent=2))
            return 0
        _print_session_header()
        _print_session_line(s)
        print("subscriptions:")
        for topic_filter, qos, nl, rap, rh, sub_id in s["subs"]:
            opts = [f"qos {qos}"] + (["no-local"] if nl else []) + \
                (["retain-as-published"] if rap else []) + [f"retain-handling {rh}"] + \
                ([f"id {sub_id}"] if sub_id else [])
            print(f"  {topic_filter}  ({', '.join(opts)})")
        print(f"queue ({len(entries)} shown):")
        for e in entries:
            state = "pubrec'd" if e["pubrec"] else f"sent as {e['packet_id']}" if e["sent"] else "queued"
            via = f"  (via {e['share']})" if e["share"] else ""
            print(f"  {e['seq']:>8}  qos {e['qos']}  {state:<14} {e['bytes']:>8} B  {e['topic']}{via}")
        return 0
    if args.json:
        print(json.dumps({"sessions": sessions, "retained": retained}, indent=2))
        return 0
    print(f"{len(sessions)} stored sessions, {retained} retained messages")
    if sessions:
        _print_session_header()
        for s in sessions:
            _print_session_line(s)
    return 0


def _print_session_header():
    print(f"{'client id':<32} {'ver':>5} {'expiry':>10} {'state':<27} {'subs':>5} "
          f"{'queued':>7} {'in flight':>9} {'bytes':>10}")


def _print_session_line(s):
    expiry = "never" if s["expiry"] == 0xFFFFFFFF else f"{s['expiry']}s"
    if s["disconnected_ms"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["disconnected_ms"] / 1000))
        state = f"offline since {since}"
    else:
        # Written when it connected; a crash leaves it so until the next start.
        state = "connected"
    version = "5" if s["version"] == 5 else "3.1.1"
    print(f"{s['client_id']:<32} {version:>5} {expiry:>10} {state:<27} {len(s['subs']):>5} "
          f"{s['queued']:>7} {s['inflight']:>9} {s['queued_bytes']:>10}")


# Records are read in chunks, each in its own short read transaction, so a dump
# of a large partition neither holds all of it in memory nor pins an old
# snapshot (which would keep the writer from reusing freed pages).
DUMP_CHUNK = 1000


def _records(store, partition, start, limit):
    left = limit
    while left is None or left > 0:
        chunk = store.read(partition, start, DUMP_CHUNK if left is None else min(left, DUMP_CHUNK))
        if not chunk:
            return
        yield from chunk
        start = chunk[-1][0] + 1
        if left is not None:
            left -= len(chunk)


def cmd_log_dump(args):
    from pushcore.record import decode_record

    store = _open_readonly(args)
    try:
        if args.partition is not None and not 0 <= args.partition < store.partitions:
            print(f"pushcore: --partition {args.partition}: the store has partitions 0.."
                  f"{store.partitions - 1}", file=sys.stderr)
            return EXIT_USAGE
        parts = [args.partition] if args.partition is not None else range(store.partitions)
        out = sys.stdout
        for part in parts:
            for offset, data in _records(store, part, args.start or 0, args.limit):
                rec = decode_record(data)
                obj = {"partition": part, "offset": offset, "time": rec.time_ms,
                       **_record_json(rec)}
                if args.base64:
                    obj["payload_b64"] = base64.b64encode(rec.payload).decode()
                else:
                    _put_text_or_b64(obj, "payload", rec.payload)
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    finally:
        store.close()
    return 0


# -- dead letters ------------------------------------------------------------------

# A dead-letter entry id is the hex of its dlq key: u16 sink id + u64 time ms +
# u16 partition + u64 offset (the layout in pushcore/log.py's docstring).
_DLQ_ID = Struct(">HQHQ")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# --since/--until "30m", "1h", "2d": a time that long ago.  A unit is required,
# so that a bare number is never mistaken for an ISO 8601 year.
_AGO = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")


class DeadLetterError(Exception):
    """A dlq command that cannot go on: unknown sink or entry; exit status 1."""


def _iso_utc(ms):
    """ISO 8601 in UTC with milliseconds: 2024-05-01T12:00:00.250Z."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time_arg(text):
    """--since/--until: ISO 8601 (UTC unless it names an offset), or a duration ago."""
    match = _AGO.fullmatch(text.strip())
    if match:
        ago_ms = float(match.group(1)) * Duration.UNITS[match.group(2)] * 1000
        # A duration longer than the clock has run means "ever since".
        return int(max(0.0, time.time() * 1000 - ago_ms))
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time (2024-05-01T12:00:00Z) nor a duration ago"
            f" (30m, 1h, 2d): {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _entry_id(text):
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _DLQ_ID.size:
        raise argparse.ArgumentTypeError(
            f"not a dead-letter entry id ({2 * _DLQ_ID.size} hex digits, as"
            f" `pushcore dlq list` prints them): {text!r}")
    return key


def _topic_filter(text):
    from pushcore.errors import TopicFilterInvalid
    from pushcore.topics import parse_shared

    try:
        share, _ = parse_shared(text)
    except TopicFilterInvalid as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if share is not None:
        raise argparse.ArgumentTypeError(f"a shared subscription is no topic filter here: {text!r}")
    return text


def _filters_given(args):
    return any(getattr(args, name) is not None
               for name in ("sink", "topic", "since", "until", "limit"))


def _sink_names(store):
    """{sink id: name}; an id no name claims (none should) shows as #ID."""
    return {sink_id: name for name, sink_id in store.sinks().items()}


def _matching_dead_letters(store, args):
    """The dead letters the filters select, by sink, oldest first."""
    from pushcore.record import decode_record
    from pushcore.topics import matches

    sink_id = None
    if args.sink is not None:
        sinks = store.sinks()
        if args.sink not in sinks:
            known = ", ".join(sorted(sinks)) or "none is registered"
            raise DeadLetterError(f"no sink named {args.sink!r} (sinks: {known})")
        sink_id = sinks[args.sink]
    if args.topic is None:
        return store.dead_letters(sink_id, args.since, args.until, args.limit)
    entries = [entry for entry in store.dead_letters(sink_id, args.since, args.until)
               if matches(args.topic, decode_record(entry[8]).topic)]
    return entries if args.limit is None else entries[:args.limit]


def _dead_letters_by_id(store, keys):
    """The entries of ``keys``, in order, each once; DeadLetterError names the first unknown."""
    out = []
    for key in dict.fromkeys(keys):
        sink_id, dead_ms, _partition, _offset = _DLQ_ID.unpack(key)
        found = [entry for entry in store.dead_letters(sink_id, dead_ms, dead_ms)
                 if entry[0] == key]
        if not found:
            raise DeadLetterError(f"no dead-letter entry {key.hex()}"
                                  f" (replayed or purged already?)")
        out.append(found[0])
    return out


def _dead_letter_json(entry, names, detail=False):
    from pushcore._frame import decode_properties
    from pushcore.record import decode_record

    key, sink_id, dead_ms, partition, offset, attempts, status, error, record = entry
    rec = decode_record(record)
    obj = {
        "entry_id": key.hex(),
        "sink": names.get(sink_id, f"#{sink_id}"),
        "time": _iso_utc(dead_ms),
        "time_ms": dead_ms,
        "partition": partition,
        "offset": offset,
        "attempts": attempts,
        # 0 is stored for a failure without an HTTP status (a connection error).
        "status": status or None,
        "error": error,
        **_record_json(rec),
        "published": _iso_utc(rec.time_ms),
    }
    if detail:
        obj["sink_id"] = sink_id
        obj["published_ms"] = rec.time_ms
        obj["properties"] = _properties_json(decode_properties(rec.properties))
    _put_text_or_b64(obj, "payload", rec.payload)
    return obj


def cmd_dlq_list(args):
    store = _open_readonly(args)
    try:
        names = _sink_names(store)
        entries = _matching_dead_letters(store, args)
        objs = [_dead_letter_json(entry, names) for entry in entries]
    finally:
        store.close()
    if args.json:
        for obj in objs:
            print(json.dumps(obj, ensure_ascii=False))
        return 0
    print(f"{'entry id':<{2 * _DLQ_ID.size}}  {'sink':<16} {'time':<24} {'partition/offset':>20} "
          f"{'tries':>5} {'status':>6}  error  topic")
    for o in objs:
        where = f"{o['partition']}/{o['offset']}"
        # The error is quoted: it may hold spaces, and the topic follows it.
        print(f"{o['entry_id']}  {o['sink']:<16} {o['time']:<24} {where:>20} {o['attempts']:>5} "
              f"{o['status'] or '-':>6}  {json.dumps(o['error'], ensure_ascii=False)}  {o['topic']}")
    return 0


def cmd_dlq_show(args):
    store = _open_readonly(args)
    try:
        names = _sink_names(store)
        objs = [_dead_letter_json(entry, names, detail=True)
                for entry in _dead_letters_by_id(store, args.ids)]
    finally:
        store.close()
    for n, o in enumerate(objs):
        if args.json:
            print(json.dumps(o, ensure_ascii=False))
            continue
        if n:
            print()
        rows = [("entry id", o["entry_id"]), ("sink", f"{o['sink']} (id {o['sink_id']})"),
                ("dead since", o["time"]), ("partition", o["partition"]), ("offset", o["offset"]),
                ("attempts", o["attempts"]), ("last status", o["status"] or "-"),
                ("last error", o["error"]), ("topic", o["topic"]),
                ("published", o["published"]), ("client", o["client"]),
                ("message id", "-" if o["id"] is None else o["id"]),
                ("key", "-" if o["key"] is None else o["key"]), ("qos", o["qos"]),
                ("retain", "yes" if o["retain"] else "no")]
        for name, value in o["properties"].items():
            if name == "user_property":
                rows += [("user property", f"{k}: {v}") for k, v in value]
            else:
                rows.append((name.replace("_", " "), value))
        if "payload" in o:
            rows.append(("payload", f"{len(o['payload'].encode())} bytes"))
        else:
            rows.append(("payload", f"{len(base64.b64decode(o['payload_b64']))} bytes, base64"))
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value}")
        print(o.get("payload", o.get("payload_b64")))
    return 0


def _open_writable(args):
    """The store opened to write beside a running daemon, if any.

    A read-only open first: it fails on a missing store (a writable open would
    create one) and reads the partition count the store was created with.  It
    is closed before the second open, as one process must not hold one LMDB
    environment twice.  map_size 0 takes the map size the store's last writer
    set (LMDB's mdb_env_set_mapsize), so the daemon's map is never shrunk to
    another config's.  Commits are fdatasync'd: a count printed is on disk.
    """
    from pushcore.log import Log

    probe = _open_readonly(args)
    try:
        path, partitions = probe.path, probe.partitions
    finally:
        probe.close()
    return Log(path, partitions=partitions, map_size=0, durability="fsync")


def _selected_keys(store, args):
    if args.ids:
        return [entry[0] for entry in _dead_letters_by_id(store, args.ids)]
    return [entry[0] for entry in _matching_dead_letters(store, args)]


def _dlq_selection_problem(args):
    if args.ids and args.all:
        return "give entry ids or --all, not both"
    if not args.ids and not args.all:
        return "give entry ids (from `pushcore dlq list`) or --all"
    if args.ids and _filters_given(args):
        return "--sink, --topic, --since, --until and --limit go with --all"
    return None


def _dead_letters_counted(n):
    return f"{n} dead letter{'' if n == 1 else 's'}"


def cmd_dlq_replay(args):
    problem = _dlq_selection_problem(args)
    if problem:
        print(f"pushcore dlq replay: {problem}", file=sys.stderr)
        return EXIT_USAGE
    store = _open_writable(args)
    try:
        keys = _selected_keys(store, args)
        replayed = store.replay_dead_letters(keys, int(time.time() * 1000))
    finally:
        store.close()
    print(f"replayed {_dead_letters_counted(replayed)}")
    return 0


def cmd_dlq_purge(args):
    problem = _dlq_selection_problem(args)
    if problem:
        print(f"pushcore dlq purge: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not args.yes:
        store = _open_readonly(args)
        try:
            selected = len(_selected_keys(store, args))
        finally:
            store.close()
        print(f"pushcore dlq purge: this deletes {_dead_letters_counted(selected)} for good;"
              f" add --yes to do it", file=sys.stderr)
        return EXIT_USAGE
    store = _open_writable(args)
    try:
        purged = store.purge_dead_letters(_selected_keys(store, args))
    finally:
        store.close()
    print(f"purged {_dead_letters_counted(purged)}")
    return 0


def cmd_dlq(args):
    try:
        return args.dlq_func(args)
    except DeadLetterError as err:
        print(f"pushcore dlq {args.dlq_command}: {err}", file=sys.stderr)
        return 1


def cmd_pub(args):
    from pushcore.client import Client

    setup_logging("warning" if not args.verbose else "info")
    if args.file is not None:
        with open(args.file, "rb") as f:
            messages = [f.read()]
    elif args.stdin_lines:
        messages = [line.rstrip(b"\n") for line in sys.stdin.buffer]
    elif args.message is not None:
        messages = [args.message.encode()]
    else:
        print("pushcore pub: give -m MESSAGE, -f FILE or -l (lines from stdin)", file=sys.stderr)
        return EXIT_USAGE
    client = Client(host=args.host, port=args.port, client_id=args.client_id or "",
                    version=args.protocol_version, keepalive=args.keepalive,
                    max_reconnects=args.max_reconnects)
    client.connect()
    handles = []
    for i, payload in enumerate(messages):
        msg_id = args.id if len(messages) == 1 else (f"{args.id}-{i}" if args.id else None)
        handles.append(client.publish(args.topic, payload, qos=args.qos, retain=args.retain,
                                      msg_id=msg_id, key=args.key))
    ok = client.flush(timeout=args.timeout)
    client.close()
    failed = [h for h in handles if getattr(h, "failed", False)]
    if not ok or failed:
        codes = sorted({f"0x{h.reason_code:02x}" for h in failed})
        print(f"pushcore pub: {len(failed)} refused ({', '.join(codes)}), "
              f"{'all others acked' if ok else 'not all acked before the timeout'}", file=sys.stderr)
        return 1
    return 0


def _record_json(rec):
    """The fields of a stored record that `log dump` and `dlq` both print."""
    return {
        "topic": rec.topic,
        "id": rec.msg_id.decode("utf-8", "replace") if rec.msg_id is not None else None,
        "key": rec.key.decode("utf-8", "replace") if rec.key is not None else None,
        "client": rec.client_id,
        "qos": rec.qos,
        "retain": rec.retain,
    }


def _put_text_or_b64(obj, name, data):
    """``obj[name]`` is ``data`` as text when it is UTF-8, else
    ``obj[name + "_b64"]`` is its base64, as ``log dump`` prints payloads."""
    try:
        obj[name] = data.decode()
    except UnicodeDecodeError:
        obj[name + "_b64"] = base64.b64encode(data).decode()


def _properties_json(properties):
    """MQTT 5 properties (a dict or None) as JSON: binary values as text, or
    NAME_b64 when not UTF-8."""
    props = {}
    for name, value in (properties or {}).items():
        if isinstance(value, bytes):
            _put_text_or_b64(props, name, value)
        else:
            props[name] = value
    return props


def _message_json(msg):
    obj = {"topic": msg.topic, "qos": msg.qos, "retain": msg.retain}
    _put_text_or_b64(obj, "payload", msg.payload)
    obj["properties"] = _properties_json(msg.properties)
    return obj


def _print_message(msg, args):
    if args.format == "json":
        line = json.dumps(_message_json(msg), ensure_ascii=False).encode() + b"\n"
    elif args.verbose:
        line = msg.topic.encode() + b" " + msg.payload + b"\n"
    else:
        line = msg.payload + b"\n"
    out = sys.stdout.buffer
    out.write(line)
    # One message, one write: a reader on a pipe sees each as it arrives.
    out.flush()


def _sub_usage_problem(args, version):
    if args.no_clean and not args.client_id:
        return "-c needs a client id (-i): a session is resumed by its client id"
    if args.session_expiry is not None and version == 4:
        return ("-x is an MQTT 5.0 option; an MQTT 3.1.1 session (-c) is kept until "
                "a clean session connects with its client id")
    if args.no_retained and args.retained_only:
        return "-R drops the retained messages --retained-only prints; give one of them"
    return None


def cmd_sub(args):
    from server.subscriber import SESSION_NEVER_EXPIRES, Subscriber

    setup_logging("debug" if args.debug else "warning")
    version = 5 if args.protocol_version == "5" else 4
    problem = _sub_usage_problem(args, version)
    if problem:
        print(f"pushcore sub: {problem}", file=sys.stderr)
        return EXIT_USAGE
    expiry = args.session_expiry
    if expiry is None and args.no_clean and version == 5:
        # As mosquitto_sub: -c without -x asks for a session that never expires.
        expiry = SESSION_NEVER_EXPIRES
    sub = Subscriber(host=args.host, port=args.port, client_id=args.client_id, version=version,
                     keepalive=args.keepalive, clean_start=not args.no_clean,
                     session_expiry=expiry)
    try:
        sub.connect()
        # As mosquitto_sub: the -W clock starts once connected.
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        sub.subscribe(args.topics, qos=args.qos)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        shown = 0
        for msg in sub.messages(timeout=remaining):
            if args.no_retained and msg.retain:
                continue
            if args.retained_only and not msg.retain:
                # The retained messages came first; a live one means they are all out.
                return 0
            _print_message(msg, args)
            shown += 1
            if shown == args.count:
                return 0
        return EXIT_SUB_TIMEOUT
    except MQTTError as err:
        print(f"pushcore sub: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`).  As the signal module's "Note on
        # SIGPIPE" advises, stdout goes to /dev/null so that the flush at exit
        # does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        # A socket error names no address; the subscriber's own errors do.
        address = f"{args.host}:{args.port}"
        where = "" if address in str(err) else f"{address}: "
        print(f"pushcore sub: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    finally:
        sub.close()


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _session_expiry(text):
    """-x SECONDS: 0..4294967295, or -1 for never, as mosquitto_sub spells it."""
    from server.subscriber import SESSION_NEVER_EXPIRES

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value == -1:
        return SESSION_NEVER_EXPIRES
    if not 0 <= value <= SESSION_NEVER_EXPIRES:
        raise argparse.ArgumentTypeError(f"must be 0..{SESSION_NEVER_EXPIRES} or -1 (never), "
                                         f"not {value}")
    return value


def build_parser():
    p = argparse.ArgumentParser(prog="pushcore", description="Durable push-message ingestion gateway")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("-c", "--config", help="YAML configuration file (default: built-in defaults)")
    s.add_argument("--data", help="LMDB data directory (overrides storage.data_dir)")
    s.add_argument("--mqtt", help="MQTT listener HOST:PORT (overrides mqtt.bind)")
    s.add_argument("--durability", choices=["fsync", "os"], help="overrides storage.durability")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    lg = sub.add_parser("log", help="inspect the stored log (read-only, safe while serving)")
    lsub = lg.add_subparsers(dest="log_command", required=True)
    for name, func, helptext in (("stats", cmd_log_stats, "per-partition offsets and sizes"),
                                 ("dump", cmd_log_dump, "one JSON object per stored record")):
        x = lsub.add_parser(name, help=helptext)
        x.add_argument("-c", "--config", help="configuration file to take storage.data_dir from")
        x.add_argument("--data", help="LMDB data directory (default: storage.data_dir)")
        if name == "dump":
            x.add_argument("--partition", type=int, help="only this partition")
            x.add_argument("--from", dest="start", type=int, help="first offset")
            x.add_argument("--limit", type=int, help="at most this many records per partition")
            x.add_argument("--base64", action="store_true", help="payloads always as payload_b64")
        else:
            x.add_argument("--json", action="store_true", help="machine-readable output")
        x.set_defaults(func=func)

    ss = sub.add_parser("sessions", help="persistent MQTT sessions, their subscriptions and "
                                         "queues (read-only, safe while serving)")
    ss.add_argument("-c", "--config", help="configuration file to take storage.data_dir from")
    ss.add_argument("--data", help="LMDB data directory (default: storage.data_dir)")
    ss.add_argument("--client", help="one session in detail: subscriptions and queued messages")
    ss.add_argument("--limit", type=int, default=100,
                    help="queued messages shown with --client (default 100)")
    ss.add_argument("--json", action="store_true", help="machine-readable output")
    ss.set_defaults(func=cmd_sessions)

    dq = sub.add_parser("dlq", help="dead letters: list, show, replay, purge (safe while serving)")
    dsub = dq.add_subparsers(dest="dlq_command", required=True)
    for name, func, helptext in (
            ("list", cmd_dlq_list, "one line per dead letter, by sink, oldest first"),
            ("show", cmd_dlq_show, "dead letters in full: failure, record fields, payload"),
            ("replay", cmd_dlq_replay, "put dead letters back into delivery (the retry queue, "
                                       "due now, attempts 0); prints how many"),
            ("purge", cmd_dlq_purge, "delete dead letters for good (needs --yes); prints how many")):
        x = dsub.add_parser(name, help=helptext)
        x.add_argument("-c", "--config", help="configuration file to take storage.data_dir from")
        x.add_argument("--data", help="LMDB data directory (default: storage.data_dir)")
        if name in ("show", "replay", "purge"):
            x.add_argument("ids", nargs="+" if name == "show" else "*", type=_entry_id,
                           metavar="ID", help="entry id as `dlq list` prints it")
        if name in ("replay", "purge"):
            x.add_argument("--all", action="store_true",
                           help="every dead letter the filters below select")
        if name != "show":
            x.add_argument("--sink", help="only this sink's dead letters")
            x.add_argument("--topic", type=_topic_filter, metavar="FILTER",
                           help="only records whose topic this MQTT filter (+, #) matches")
            x.add_argument("--since", type=_time_arg, metavar="T",
                           help="dead-lettered at T or later: ISO 8601 (UTC unless an offset is "
                                "given) or a duration ago (30m, 1h, 2d)")
            x.add_argument("--until", type=_time_arg, metavar="T",
                           help="dead-lettered at T or earlier (as --since)")
            x.add_argument("--limit", type=_positive_int, metavar="N",
                           help="at most N dead letters (the oldest per sink first)")
        if name in ("list", "show"):
            x.add_argument("--json", action="store_true",
                           help="one JSON object per line; payload as text, or payload_b64")
        if name == "purge":
            x.add_argument("-y", "--yes", action="store_true", help="really delete")
        x.set_defaults(func=cmd_dlq, dlq_func=func)

    pb = sub.add_parser("pub", help="publish messages (QoS 1 by default, acked after storage)",
                        add_help=False)
    pb.add_argument("--help", action="help", help="show this help and exit")
    pb.add_argument("-h", "--host", default="127.0.0.1")
    pb.add_argument("-p", "--port", type=int, default=1883)
    pb.add_argument("-t", "--topic", required=True)
    pb.add_argument("-m", "--message")
    pb.add_argument("-f", "--file", help="send the file's content as one message")
    pb.add_argument("-l", "--stdin-lines", action="store_true", help="one message per stdin line")
    pb.add_argument("-q", "--qos", type=int, choices=[0, 1, 2], default=1)
    pb.add_argument("-r", "--retain", action="store_true")
    pb.add_argument("-i", "--client-id")
    pb.add_argument("--id", help="message id (MQTT 5 user property); -l appends -N per line")
    pb.add_argument("--key", help="ordering key (MQTT 5 user property)")
    pb.add_argument("-V", "--protocol-version", type=int, choices=[4, 5], default=5,
                    help="4 = MQTT 3.1.1, 5 = MQTT 5.0")
    pb.add_argument("-k", "--keepalive", type=int, default=60)
    pb.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for every ack")
    pb.add_argument("--max-reconnects", type=int, default=5)
    pb.add_argument("-v", "--verbose", action="store_true")
    pb.set_defaults(func=cmd_pub)

    sb = sub.add_parser("sub", help="subscribe and print messages, like mosquitto_sub",
                        add_help=False)
    sb.add_argument("--help", action="help", help="show this help and exit")
    sb.add_argument("-h", "--host", default="127.0.0.1")
    sb.add_argument("-p", "--port", type=int, default=1883)
    sb.add_argument("-t", "--topic", dest="topics", action="append", required=True,
                    metavar="FILTER", help="topic filter (+ and # wildcards); repeat for more")
    sb.add_argument("-q", "--qos", type=int, choices=[0, 1, 2], default=0,
                    help="maximum QoS of every subscription")
    sb.add_argument("-i", "--client-id", help="client id (default: generated)")
    sb.add_argument("-c", "--disable-clean-session", dest="no_clean", action="store_true",
                    help="keep the session when disconnected and resume it (needs -i); "
                         "MQTT 5: it never expires unless -x says otherwise")
    sb.add_argument("-x", "--session-expiry", type=_session_expiry, metavar="SECONDS",
                    help="MQTT 5 Session Expiry Interval (-1: never)")
    sb.add_argument("-V", "--protocol-version", choices=["5", "311", "4"], default="5",
                    help="5 = MQTT 5.0, 311 (or 4, as pub spells it) = MQTT 3.1.1")
    sb.add_argument("-k", "--keepalive", type=int, default=60)
    sb.add_argument("-C", "--count", type=_positive_int,
                    help="exit (status 0) after printing this many messages")
    sb.add_argument("-W", "--timeout", type=_positive_seconds, metavar="SECONDS",
                    help=f"exit with status {EXIT_SUB_TIMEOUT} this long after connecting")
    sb.add_argument("-v", "--verbose", action="store_true", help='print "topic payload"')
    sb.add_argument("-R", dest="no_retained", action="store_true",
                    help="do not print retained (stale) messages")
    sb.add_argument("--retained-only", action="store_true",
                    help="print only retained messages; exit at the first live one")
    sb.add_argument("-F", "--format", choices=["json"],
                    help="json: one object per line: topic, qos, retain, payload "
                         "(payload_b64 when not UTF-8), properties")
    sb.add_argument("-d", "--debug", action="store_true",
                    help="log connecting and subscribing on stderr")
    sb.set_defaults(func=cmd_sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"pushcore: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as err:
        print(f"pushcore: store error: {err}", file=sys.stderr)
        return 1
    except MQTTError as err:
        print(f"pushcore: refused by the server: {err} (reason 0x{err.reason_code:02x})",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`pushcore log dump | head`): nothing to say.  Point
        # stdout at /dev/null so the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConnectionError, OSError) as err:
        print(f"pushcore: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

