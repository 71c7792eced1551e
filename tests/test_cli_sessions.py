"""``pushcore sessions``: the stored persistent sessions, read while the daemon runs."""

import json
import time

import pytest

from server.subscriber import Subscriber
from tests.support import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("sessions")).start()
    yield d
    d.kill()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def sessions_json(daemon, *args):
    res = daemon.cli("sessions", "--data", daemon.data_dir, "--json", *args, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_sessions_lists_subscriptions_and_queue(daemon):
    sub = Subscriber(daemon.host, daemon.port, client_id="cli-sess", clean_start=False,
                     session_expiry=600)
    sub.connect()
    sub.subscribe(["cli/#"], qos=1, subscription_id=7)
    sub.close()
    res = daemon.cli("pub", "-h", daemon.host, "-p", str(daemon.port), "-t", "cli/a", "-m", "one",
                     "-q", "1", text=True)
    assert res.returncode == 0, res.stderr
    listed = wait_for(lambda: [s for s in sessions_json(daemon)["sessions"]
                               if s["client_id"] == "cli-sess" and s["queued"] == 1])
    (s,) = listed
    assert (s["version"], s["expiry"], s["inflight"]) == (5, 600, 0)
    assert s["subs"] == [["cli/#", 1, 0, 0, 0, 7]]
    assert s["disconnected_ms"] > 0
    detail = sessions_json(daemon, "--client", "cli-sess")
    assert [(e["topic"], e["qos"], e["sent"], e["subscription_ids"]) for e in detail["queue"]] == \
        [("cli/a", 1, False, [7])]
    text = daemon.cli("sessions", "--data", daemon.data_dir, "--client", "cli-sess", text=True)
    assert "cli/#  (qos 1, retain-handling 0, id 7)" in text.stdout
    assert "offline since" in text.stdout


def test_clean_sessions_are_not_stored(daemon):
    sub = Subscriber(daemon.host, daemon.port, client_id="cli-clean", clean_start=True)
    sub.connect()
    sub.subscribe(["clean/#"], qos=1)
    assert "cli-clean" not in [s["client_id"] for s in sessions_json(daemon)["sessions"]]
    sub.close()


def test_unknown_client_is_an_error(daemon):
    res = daemon.cli("sessions", "--data", daemon.data_dir, "--client", "nobody", text=True)
    assert res.returncode == 1
    assert "no stored session for client id 'nobody'" in res.stderr
