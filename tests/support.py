"""Start and stop the real daemon for end-to-end tests."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from pushcore.client import Client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pushcore_cmd(*args):
    return [sys.executable, "-m", "server.cli", *args]


class Daemon:
    """The real pushcore daemon on a free loopback port, as a subprocess."""

    def __init__(self, tmp_path, config="", durability="fsync", port=None, wrapper=(), env=None):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.data_dir = str(tmp_path / "data")
        self.config_path = tmp_path / "pushcore.yaml"
        self.config_path.write_text(config)
        self.durability = durability
        self.log_path = tmp_path / "daemon.log"
        # A command the daemon runs under, e.g. ("prlimit", "--nofile=40:40").
        self.wrapper = list(wrapper)
        self.env = None if env is None else {**os.environ, **env}
        self.proc = None

    def start(self, timeout=15.0):
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.wrapper + pushcore_cmd("serve", "-c", str(self.config_path), "--data", self.data_dir,
                         "--mqtt", f"{self.host}:{self.port}", "--durability", self.durability),
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen within {timeout}s:\n{self.log()}")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self):
        """SIGKILL: the crash case; nothing is flushed or drained."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout=15.0):
        """SIGTERM: drain and exit; returns the exit status."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def dump(self):
        """Every stored record, as `pushcore log dump` prints it."""
        out = subprocess.run(pushcore_cmd("log", "dump", "--data", self.data_dir),
                             cwd=ROOT, capture_output=True, check=True, timeout=120)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def cli(self, *args, **kw):
        return subprocess.run(pushcore_cmd(*args), cwd=ROOT, capture_output=True, timeout=120, **kw)


# -- delivery tests (test_delivery.py, test_delivery_nginx.py) ---------------------


def delivery_config(sinks, routes, partitions=4, retention=None):
    """The daemon's YAML (JSON is YAML) with ``sinks`` and ``routes`` [(filter, sink)]."""
    storage = {"partitions": partitions}
    if retention is not None:
        storage["retention"] = retention
    return json.dumps({"storage": storage, "sinks": sinks,
                       "routes": [{"filter": f, "sink": s} for f, s in routes]})


def publish(daemon, messages, client_id="publisher"):
    """Publish (topic, payload, msg_id, key) tuples at QoS 1; return once all are acked."""
    with Client(port=daemon.port, client_id=client_id, max_inflight=256) as client:
        for topic, payload, msg_id, key in messages:
            client.publish(topic, payload, qos=1, msg_id=msg_id, key=key)
        assert client.flush(timeout=60)
        assert client.stats["failed"] == 0, client.stats
        assert client.stats["acked"] == len(messages), client.stats


def wait_until(predicate, timeout, what, daemon=None):
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` s pass (fail,
    with the daemon's log)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            log = f"\ndaemon log:\n{daemon.log()[-4000:]}" if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{log}")
        time.sleep(0.02)


def sink_stats(daemon, name):
    """`pushcore log stats --json`, and the entry of sink ``name`` in it."""
    out = daemon.cli("log", "stats", "--json", "--data", daemon.data_dir, check=True)
    stats = json.loads(out.stdout)
    return stats, next(s for s in stats["sinks"] if s["name"] == name)
