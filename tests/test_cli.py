"""The `pushcore` command line, run as a user would."""

import json
import os
import subprocess

import pytest

from support import ROOT, Daemon, free_port, pushcore_cmd


def run(*args, **kw):
    return subprocess.run(pushcore_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=60, **kw)


def test_check_config_ok_on_shipped_file():
    r = run("check-config", os.path.join(ROOT, "conf", "pushcore.yaml"))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_check_config_names_key_line_and_hint(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  partitions: 4\n  durabilty: os\n")
    r = run("check-config", str(bad))
    assert r.returncode == 78
    assert f"{bad}:3: storage.durabilty: unknown option; did you mean storage.durability?" in r.stderr


def test_check_config_bad_enum_lists_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  durability: sometimes\n")
    r = run("check-config", str(bad))
    assert r.returncode == 78
    assert ":2: storage.durability:" in r.stderr
    assert "fsync" in r.stderr and "os" in r.stderr


def test_serve_with_flags_and_no_file(tmp_path):
    port = free_port()
    data = tmp_path / "d"
    proc = subprocess.Popen(pushcore_cmd("serve", "--data", str(data), "--mqtt", f"127.0.0.1:{port}"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import socket
        import time
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        r = run("pub", "-p", str(port), "-t", "cli/topic", "-m", "from the cli", "--id", "cli-1",
                "--key", "k1")
        assert r.returncode == 0, r.stderr
        # The same id again: acked, not stored twice.
        r = run("pub", "-p", str(port), "-t", "cli/topic", "-m", "from the cli", "--id", "cli-1")
        assert r.returncode == 0, r.stderr
        r = run("pub", "-p", str(port), "-t", "cli/topic", "-q", "2", "-V", "4", "-m", "v311")
        assert r.returncode == 0, r.stderr
        r = run("log", "dump", "--data", str(data))
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in r.stdout.splitlines()]
        assert [(x["payload"], x["id"], x["key"]) for x in records if x["qos"] == 1] == \
            [("from the cli", "cli-1", "k1")]
        assert [(x["payload"], x["qos"]) for x in records if x["qos"] == 2] == [("v311", 2)]
        r = run("log", "stats", "--data", str(data), "--json")
        stats = json.loads(r.stdout)
        assert stats["partitions"] == 8
        assert sum(p["count"] for p in stats["per_partition"]) == 2
        # Read-only while serving: stats in text form too.
        r = run("log", "stats", "--data", str(data))
        assert r.returncode == 0 and "partition" in r.stdout
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "draining" in out


def test_dump_base64_and_filters(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        r = run("pub", "-p", str(d.port), "-t", "bin", "-m", "abc", "--key", "same")
        assert r.returncode == 0, r.stderr
        r = run("pub", "-p", str(d.port), "-t", "bin", "-m", "def", "--key", "same")
        assert r.returncode == 0, r.stderr
    finally:
        d.stop()
    dump = d.dump()
    part = dump[0]["partition"]
    r = run("log", "dump", "--data", d.data_dir, "--partition", str(part), "--from", "1", "--base64")
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["payload_b64"] == "ZGVm" and rec["offset"] == 1
    r = run("log", "dump", "--data", d.data_dir, "--partition", "8")
    assert r.returncode == 2
    assert "--partition 8: the store has partitions 0..7" in r.stderr


def test_log_on_missing_store_is_a_clear_error(tmp_path):
    r = run("log", "stats", "--data", str(tmp_path / "nothing-here"))
    assert r.returncode == 1
    assert "no store at" in r.stderr


def test_partition_count_mismatch_is_a_clear_error(tmp_path):
    d = Daemon(tmp_path).start()
    d.stop()
    cfg = tmp_path / "p4.yaml"
    cfg.write_text("storage:\n  partitions: 4\n")
    r = run("serve", "-c", str(cfg), "--data", d.data_dir, "--mqtt", f"127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "8 partitions but 4 were configured" in r.stderr


@pytest.mark.parametrize("fmt", ["json"])
def test_json_logs(tmp_path, fmt):
    d = Daemon(tmp_path, config=f"log:\n  format: {fmt}\n").start()
    d.stop()
    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert any("listening" in x["msg"] for x in lines)
    assert all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = run("serve", "--data", str(tmp_path / "d"), "--mqtt", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (mqtt.bind): Address already in use" in r.stderr


def test_systemd_notify_ready_and_stopping(tmp_path):
    # Type=notify: systemd passes $NOTIFY_SOCKET; READY=1 must come once the
    # listener is bound, STOPPING=1 when SIGTERM starts the drain.
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(15)
        d = Daemon(tmp_path, env={"NOTIFY_SOCKET": path}).start()
        try:
            ready = notify.recv(4096).decode()
            assert "READY=1" in ready.splitlines()
            assert f"STATUS=listening on 127.0.0.1:{d.port}" in ready.splitlines()
        finally:
            assert d.stop() == 0
        assert notify.recv(4096).decode() == "STOPPING=1"


def test_dump_reads_in_chunks_across_the_whole_partition(tmp_path):
    from server import cli

    d = Daemon(tmp_path, config="storage:\n  partitions: 1\n", durability="os").start()
    try:
        lines = "\n".join(f"m{i}" for i in range(2500)) + "\n"
        r = run("pub", "-p", str(d.port), "-t", "bulk", "-l", input=lines)
        assert r.returncode == 0, r.stderr
    finally:
        d.stop()
    assert cli.DUMP_CHUNK < 2500
    dump = d.dump()
    assert [x["payload"] for x in dump] == [f"m{i}" for i in range(2500)]
    assert [x["offset"] for x in dump] == list(range(2500))
    r = run("log", "dump", "--data", d.data_dir, "--from", "999", "--limit", "1002")
    got = [json.loads(line)["offset"] for line in r.stdout.splitlines()]
    assert got == list(range(999, 2001))
