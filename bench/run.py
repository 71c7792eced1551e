"""pushcore against Mosquitto, side by side, in one run.

Builds ../shared/tools/mqttload.c (a neutral MQTT load generator), installs
Mosquitto if it is missing (Debian package), starts both brokers on loopback
ports, runs every scenario against each in turn, prints a table with the
ratios and writes it to bench/RESULTS.md.  Nothing here asserts a time: these
machines are shared and noisy; compare within one run.

    ./run bench              # full run (a few minutes)
    ./run bench --quick      # shorter scenarios, for a smoke check
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOLS = os.path.join(ROOT, "..", "shared", "tools")
OUT = os.path.join(HERE, "out")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mqttload():
    os.makedirs(OUT, exist_ok=True)
    exe = os.path.join(OUT, "mqttload")
    src = os.path.join(TOOLS, "mqttload.c")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


def ensure_mosquitto():
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if path:
        return path
    print("installing mosquitto (apt-get)...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_port(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("broker did not listen")


class Broker:
    def __init__(self, name, argv, port, workdir):
        self.name = name
        self.argv = argv
        self.port = port
        self.workdir = workdir
        self.proc = None

    def start(self):
        log = open(os.path.join(self.workdir, f"{self.name}.log"), "ab")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_port(self.port, self.proc)
        return self

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mosquitto(exe, workdir):
    port = free_port()
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                "persistence false\nmax_queued_messages 100000\nlog_type error\n")
    return Broker("mosquitto", [exe, "-c", conf], port, workdir).start()


def start_pushcore(workdir, durability):
    port = free_port()
    data = tempfile.mkdtemp(prefix="pushcore-bench-", dir=workdir)
    conf = os.path.join(workdir, "pushcore.yaml")
    with open(conf, "w") as f:
        f.write("log:\n  level: warning\nstorage:\n  map_size: 8GiB\n"
                "mqtt:\n  max_connections: 20000\n")
    argv = [sys.executable, "-m", "server.cli", "serve", "-c", conf, "--data", data,
            "--mqtt", f"127.0.0.1:{port}", "--durability", durability]
    return Broker("pushcore", argv, port, workdir).start()


def mqttload(exe, port, args, timeout=300):
    out = subprocess.run([exe, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                         text=True, timeout=timeout)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"error": out.stderr.strip()[-300:] or f"exit {out.returncode}", "rate": 0}
    result = json.loads(lines[-1])
    if out.returncode != 0:
        result["error"] = out.stderr.strip()[-300:]
    return result


def idle_connections(port, count, timeout=120):
    """Open `count` MQTT 3.1.1 connections that CONNECT and then stay idle."""
    socks = []
    connect = bytearray(b"\x10\x00\x00\x04MQTT\x04\x02\x00\x00")  # keepalive 0: never times out
    deadline = time.monotonic() + timeout
    for i in range(count):
        cid = f"idle-{i}".encode()
        body = bytes(connect[2:]) + len(cid).to_bytes(2, "big") + cid
        pkt = b"\x10" + bytes([len(body)]) + body
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(pkt)
        socks.append(s)
        if time.monotonic() > deadline:
            break
    ok = 0
    for s in socks:
        try:
            if s.recv(4)[:1] == b"\x20":
                ok += 1
        except OSError:
            pass
    return socks, ok


def scenario_table(quick):
    """(load arguments, [(row title, mqttload field)]) per scenario."""
    n = 100_000 if quick else 400_000
    secs = "5" if quick else "10"
    return [
        (["-c", "16", "-n", str(n), "-q", "1", "-s", "64", "-w", "32"],
         [("QoS 1, 64 B, 16 conns, window 32: acked msg/s", "rate")]),
        (["-c", "16", "-n", str(n // 2), "-q", "2", "-s", "64", "-w", "32"],
         [("QoS 2, 64 B, 16 conns, window 32: acked msg/s", "rate")]),
        (["-c", "16", "-d", secs, "-r", "50000", "-q", "1", "-s", "64", "-w", "32"],
         [("QoS 1 at fixed 50,000 msg/s: ack p50 (µs)", "p50_us"),
          ("QoS 1 at fixed 50,000 msg/s: ack p99 (µs)", "p99_us")]),
        (["-c", "16", "-d", secs, "-r", "5000", "-q", "1", "-s", "64", "-w", "32"],
         [("QoS 1 at fixed 5,000 msg/s: ack p50 (µs)", "p50_us"),
          ("QoS 1 at fixed 5,000 msg/s: ack p99 (µs)", "p99_us")]),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="runs per scenario and broker; median kept")
    ap.add_argument("--idle", type=int, default=10_000, help="idle connections for the RSS measure")
    ap.add_argument("--durability", default="fsync", choices=["fsync", "os"])
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
        args.idle = min(args.idle, 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    exe = build_mqttload()
    mosq_exe = ensure_mosquitto()
    workdir = tempfile.mkdtemp(prefix="pushcore-bench-")
    rows = []
    try:
        for sargs, measures in scenario_table(args.quick):
            runs = {"mosquitto": [], "pushcore": []}
            for round_no in range(args.rounds):
                # Alternate which broker goes first so drift on a noisy machine is shared.
                order = ("mosquitto", "pushcore") if round_no % 2 == 0 else ("pushcore", "mosquitto")
                for name in order:
                    broker = start_mosquitto(mosq_exe, workdir) if name == "mosquitto" else \
                        start_pushcore(workdir, args.durability)
                    try:
                        r = mqttload(exe, broker.port, sargs)
                    finally:
                        broker.stop()
                    runs[name].append(r)
                    print(f"  {' '.join(sargs)} [{name}]: {json.dumps(r)}", file=sys.stderr)
            for title, field in measures:
                rows.append((title, field,
                             statistics.median(r.get(field, 0) for r in runs["mosquitto"]),
                             statistics.median(r.get(field, 0) for r in runs["pushcore"])))

        idle = {}
        for name in ("mosquitto", "pushcore"):
            broker = start_mosquitto(mosq_exe, workdir) if name == "mosquitto" else \
                start_pushcore(workdir, args.durability)
            try:
                time.sleep(0.5)
                before = broker.rss_kb()
                socks, ok = idle_connections(broker.port, args.idle)
                time.sleep(1.0)
                after = broker.rss_kb()
                for s in socks:
                    s.close()
                idle[name] = ((after - before) * 1024 / max(ok, 1), ok)
                print(f"  idle [{name}]: {ok} connected, RSS {before} -> {after} kB", file=sys.stderr)
            finally:
                broker.stop()
        rows.append((f"{args.idle} idle connections: RSS per connection (bytes)", "rss",
                     idle["mosquitto"][0], idle["pushcore"][0]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    lines = [
        f"# pushcore vs Mosquitto — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
        f"loader, broker and pushcore on one machine.  pushcore durability `{args.durability}` "
        f"(acks only after the LMDB commit{' and fdatasync' if args.durability == 'fsync' else ''}); "
        "Mosquitto without persistence, `set_tcp_nodelay true`.  "
        f"Median of {args.rounds} run(s) per cell, brokers alternated.",
        "",
        "| measure | Mosquitto | pushcore | ratio (pushcore / Mosquitto) |",
        "|---|---:|---:|---:|",
    ]
    for title, _field, mosq, push in rows:
        ratio = push / mosq if mosq else float("nan")
        lines.append(f"| {title} | {mosq:,.0f} | {push:,.0f} | {ratio:.2f}x |")
    lines.append("")
    lines.append("For rates, higher is better; for latency and memory, lower is better.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
