"""Tests for server.loop: the epoll reactor, on real fds (socketpair, os.pipe)."""

import logging
import os
import socket
import threading
import time

import pytest

from server.loop import EventLoop

TICK = 0.01
# Wall-clock allowance for the kernel waking us (epoll_wait rounds up to whole
# milliseconds) and for a 2-core machine shared with other work.  Only the
# upper bounds use it; "never early" is checked exactly.
SCHEDULING_SLACK = 0.03

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.close()


def run_for(loop, seconds):
    """Run the loop for about `seconds` (a watchdog stop, so no test can hang)."""
    watchdog = loop.call_later(seconds, loop.stop)
    loop.run()
    watchdog.cancel()


def run_until_stopped(loop, limit=5.0):
    """Run until a callback calls loop.stop(); fail if that takes over `limit` seconds."""
    expired = []
    watchdog = loop.call_later(limit, lambda: (expired.append(True), loop.stop()))
    loop.run()
    watchdog.cancel()
    assert not expired, f"loop was not stopped within {limit}s"


# -- file events -------------------------------------------------------------


def test_reader_fires_on_data(loop, pair):
    a, b = pair
    received = []

    def on_readable():
        received.append(a.recv(100))
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    b.send(b"hello")
    run_until_stopped(loop)
    assert received == [b"hello"]


def test_reader_is_level_triggered(loop, pair):
    a, b = pair
    chunks = []

    def on_readable():
        # Read less than is buffered: level-triggered epoll reports it again.
        chunks.append(a.recv(2))
        if b"".join(chunks) == b"abcdef":
            loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    b.send(b"abcdef")
    run_until_stopped(loop)
    assert chunks == [b"ab", b"cd", b"ef"]


def test_writer_fires_when_writable_and_stops_after_removal(loop, pair):
    a, b = pair
    calls = []

    def on_writable():
        calls.append(a.send(b"x"))
        loop.remove_writer(a.fileno())
        loop.call_later(0.05, loop.stop)

    loop.add_writer(a.fileno(), on_writable)
    run_until_stopped(loop)
    assert calls == [1]
    assert b.recv(10) == b"x"


def test_reader_and_writer_share_one_registration(loop, pair):
    a, b = pair
    events = []

    def on_readable():
        events.append(("r", a.recv(10)))

    def on_writable():
        events.append(("w",))
        loop.remove_writer(a.fileno())

    loop.add_reader(a.fileno(), on_readable)
    loop.add_writer(a.fileno(), on_writable)
    b.send(b"ping")
    loop.call_later(0.05, loop.stop)
    run_until_stopped(loop)
    # Both fired from the same event, reader first; removing the writer kept
    # the reader registered (epoll.modify, not unregister).
    assert events[:2] == [("r", b"ping"), ("w",)]
    b.send(b"again")
    loop.call_later(0.05, loop.stop)
    run_until_stopped(loop)
    assert events[2:] == [("r", b"again")]


def test_add_and_remove_are_idempotent(loop, pair):
    a, b = pair
    first, second = [], []
    fd = a.fileno()
    loop.remove_reader(fd)
    loop.remove_writer(fd)
    loop.add_reader(fd, lambda: first.append(a.recv(10)))
    loop.add_reader(fd, lambda: (second.append(a.recv(10)), loop.stop()))
    b.send(b"1")
    run_until_stopped(loop)
    # Adding again replaced the callback.
    assert (first, second) == ([], [b"1"])
    loop.remove_reader(fd)
    loop.remove_reader(fd)
    # Fully unregistered: registering again is a fresh epoll.register.
    loop.add_writer(fd, loop.stop)
    run_until_stopped(loop)
    loop.remove_writer(fd)
    b.send(b"2")
    run_for(loop, 0.05)
    assert second == [b"1"]


def test_removal_after_close_is_tolerated(loop):
    r, w = os.pipe()
    loop.add_reader(r, lambda: None)
    os.close(r)
    os.close(w)
    loop.remove_reader(r)
    run_for(loop, 0.02)


def test_hangup_runs_reader_and_writer(loop):
    # A pipe's read end is never writable and its write end never readable,
    # so these callbacks can only run for EPOLLHUP / EPOLLERR.
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    seen = set()

    def writer_on_read_end():
        seen.add("writer saw hangup")
        assert os.read(r1, 10) == b""
        loop.remove_writer(r1)

    def reader_on_write_end():
        seen.add("reader saw error")
        with pytest.raises(BrokenPipeError):
            os.write(w2, b"x")
        loop.remove_reader(w2)

    loop.add_writer(r1, writer_on_read_end)
    loop.add_reader(w2, reader_on_write_end)
    os.close(w1)
    os.close(r2)
    run_for(loop, 0.1)
    assert seen == {"writer saw hangup", "reader saw error"}
    os.close(r1)
    os.close(w2)


def test_peer_close_is_seen_by_reader(loop, pair):
    a, b = pair
    seen = []

    def on_readable():
        seen.append(a.recv(10))
        loop.remove_reader(a.fileno())
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    b.close()
    run_until_stopped(loop)
    assert seen == [b""]


def test_fd_removed_during_dispatch_is_skipped():
    loop = EventLoop()
    p1, p2 = socket.socketpair(), socket.socketpair()
    calls = []

    def make_callback(mine, other):
        def on_readable():
            calls.append(mine)
            loop.remove_reader(other[0].fileno())
            loop.stop()
        return on_readable

    try:
        loop.add_reader(p1[0].fileno(), make_callback("p1", p2))
        loop.add_reader(p2[0].fileno(), make_callback("p2", p1))
        p1[1].send(b"x")
        p2[1].send(b"x")
        # Both fds are ready in the same poll; whichever runs first removes
        # the other, which must then not run.
        run_until_stopped(loop)
        assert len(calls) == 1
    finally:
        loop.close()
        for s in (*p1, *p2):
            s.close()


def test_reused_fd_number_does_not_get_the_stale_event():
    loop = EventLoop()
    p1, p2 = socket.socketpair(), socket.socketpair()
    quiet_r, quiet_w = os.pipe()
    calls = []

    def make_callback(mine, other):
        def on_readable():
            calls.append(mine)
            fd = other.fileno()
            loop.remove_reader(fd)
            # The fd number now names a different, empty file, registered
            # again: the event already polled for the old file is stale.
            os.dup2(quiet_r, fd)
            loop.add_reader(fd, lambda: calls.append("stale"))
            loop.stop()
        return on_readable

    try:
        loop.add_reader(p1[0].fileno(), make_callback("p1", p2[0]))
        loop.add_reader(p2[0].fileno(), make_callback("p2", p1[0]))
        p1[1].send(b"x")
        p2[1].send(b"x")
        run_until_stopped(loop)
        assert len(calls) == 1 and calls[0] in ("p1", "p2")
    finally:
        loop.close()
        for s in (*p1, *p2):
            s.close()
        os.close(quiet_r)
        os.close(quiet_w)


# -- timers --------------------------------------------------------------------


def test_timers_fire_in_deadline_order(loop):
    order = []
    now = time.monotonic()
    for delay in (0.05, 0.01, 0.03, 0.02, 0.04):
        loop.call_later(delay, order.append, delay)
    # Same tick, different deadlines: deadline order, not insertion order.
    loop.call_at(now + 0.064, order.append, "b")
    loop.call_at(now + 0.062, order.append, "a")
    # Equal deadlines: FIFO.
    loop.call_at(now + 0.08, order.append, "first")
    loop.call_at(now + 0.08, order.append, "second")
    loop.call_at(now + 0.1, loop.stop)
    run_until_stopped(loop)
    assert order == [0.01, 0.02, 0.03, 0.04, 0.05, "a", "b", "first", "second"]


def test_timer_fires_never_early_and_within_a_tick(loop):
    fired = {}
    iteration_times = []
    loop.add_before_sleep(lambda: iteration_times.append(loop.time()))

    def on_fire(index):
        # Timers run before the hooks, so this iteration's time is appended next.
        fired[index] = (time.monotonic(), len(iteration_times))

    delays = (0.0, 0.001, 0.005, 0.0099, 0.01, 0.013, 0.021, 0.05, 0.0777, 0.1)
    timers = [loop.call_later(delay, on_fire, i) for i, delay in enumerate(delays)]
    run_for(loop, 0.15)
    assert sorted(fired) == list(range(len(delays)))
    for index, (fired_at, iteration) in fired.items():
        when = timers[index].when()
        assert fired_at >= when
        assert iteration_times[iteration] >= when
        if iteration:
            # It ran in the first iteration that began after its tick came:
            # the one before began before when + one tick.
            assert iteration_times[iteration - 1] < when + TICK
        assert fired_at - when < TICK + SCHEDULING_SLACK


def test_timer_longer_than_one_wheel_revolution_waits_its_round(loop):
    fired = []
    base = time.monotonic()
    # 40.96 s is one revolution: this timer's slot comes round after 20 ms,
    # but its round is the next one.
    timer = loop.call_at(base + 40.96 + 0.02, fired.append, "next round")
    # Timers due in that slot and its neighbours make the loop sweep it.
    for delay in (0.01, 0.02, 0.03):
        loop.call_at(base + delay, fired.append, delay)
    run_for(loop, 0.1)
    assert fired == [0.01, 0.02, 0.03]
    assert not timer.cancelled()
    timer.cancel()


def test_cancel(loop):
    fired = []
    timer = loop.call_later(0.01, fired.append, "cancelled")
    loop.call_later(0.02, fired.append, "kept")
    timer.cancel()
    assert timer.cancelled()
    timer.cancel()
    run_for(loop, 0.05)
    assert fired == ["kept"]


def test_cancel_by_an_earlier_timer_of_the_same_round(loop):
    fired = []
    when = time.monotonic() + 0.02
    # Both expire in the same sweep; the first cancels the second.
    later = loop.call_at(when + 0.002, fired.append, "later")
    loop.call_at(when, lambda: (fired.append("first"), later.cancel()))
    run_for(loop, 0.06)
    assert fired == ["first"]


def test_cancel_after_firing_is_harmless(loop):
    fired = []
    timer = loop.call_later(0, fired.append, 1)
    run_for(loop, 0.03)
    timer.cancel()
    assert fired == [1]


def test_reset_moves_a_timer_later(loop):
    fired = []
    start = time.monotonic()
    timer = loop.call_later(0.02, lambda: fired.append(time.monotonic() - start))
    loop.call_later(0.01, timer.reset, 0.05)
    run_for(loop, 0.1)
    assert len(fired) == 1
    assert fired[0] >= 0.06


def test_reset_moves_a_timer_earlier(loop):
    fired = []
    timer = loop.call_later(30, fired.append, "x")
    timer.reset(0.01)
    run_for(loop, 0.05)
    assert fired == ["x"]


def test_reset_within_the_same_tick_keeps_the_latest_deadline(loop):
    fired = []
    timer = loop.call_later(0.02, lambda: fired.append(time.monotonic()))
    for _ in range(100):
        timer.reset(0.02)
    deadline = timer.when()
    run_for(loop, 0.06)
    assert len(fired) == 1 and fired[0] >= deadline


def test_reset_rearms_a_fired_or_cancelled_timer(loop):
    fired = []

    def periodic():
        fired.append(loop.time())
        if len(fired) < 3:
            timer.reset(0.01)

    timer = loop.call_later(0.01, periodic)
    run_for(loop, 0.1)
    assert len(fired) == 3
    cancelled = loop.call_later(0.01, fired.append, "back")
    cancelled.cancel()
    cancelled.reset(0.01)
    assert not cancelled.cancelled()
    run_for(loop, 0.05)
    assert fired[3:] == ["back"]


def test_timer_reset_in_a_callback_of_the_same_round_does_not_fire_now(loop):
    fired = []
    when = time.monotonic() + 0.02
    second = loop.call_at(when + 0.001, fired.append, "second")
    loop.call_at(when, lambda: (fired.append("first"), second.reset(0.05)))
    run_for(loop, 0.04)
    assert fired == ["first"]
    run_for(loop, 0.06)
    assert fired == ["first", "second"]


def test_timer_in_the_past_fires_on_the_next_tick(loop):
    fired = []
    loop.call_at(time.monotonic() - 5, fired.append, "late")
    loop.call_later(-1, fired.append, "negative")
    run_for(loop, 0.05)
    assert fired == ["late", "negative"]


def test_ten_thousand_timers_created_and_cancelled_quickly(loop):
    fired = []
    started = time.perf_counter()
    timers = [loop.call_later(0.001 * (i % 50), fired.append, i) for i in range(10_000)]
    for i, timer in enumerate(timers):
        timer.reset(0.01 + 0.001 * (i % 50))
    for timer in timers:
        timer.cancel()
    elapsed = time.perf_counter() - started
    # O(1) each: tens of milliseconds in total; a scan per cancel would take
    # seconds.
    assert elapsed < 1.0
    run_for(loop, 0.08)
    assert fired == []


def test_time_is_cached_per_iteration(loop):
    seen = []

    def check():
        first = loop.time()
        time.sleep(0.002)
        seen.append((first, loop.time(), time.monotonic()))
        loop.stop()

    before = time.monotonic()
    loop.call_soon(check)
    run_until_stopped(loop)
    first, again, after = seen[0]
    assert first == again
    assert before <= first <= after


# -- call_soon, before_sleep, stop -----------------------------------------


def test_call_soon_runs_in_fifo_order_with_args(loop):
    calls = []
    loop.call_soon(calls.append, 1)
    loop.call_soon(calls.append, 2)
    loop.call_soon(lambda a, b: calls.append(a + b), 1, 2)
    loop.call_soon(loop.stop)
    run_until_stopped(loop)
    assert calls == [1, 2, 3]


def test_call_soon_from_a_callback_runs_next_iteration(loop):
    iteration = []
    loop.add_before_sleep(lambda: iteration.append(None))
    seen = []

    def outer():
        seen.append(("outer", len(iteration)))
        loop.call_soon(inner)

    def inner():
        seen.append(("inner", len(iteration)))
        loop.stop()

    loop.call_soon(outer)
    run_until_stopped(loop)
    assert seen == [("outer", 0), ("inner", 1)]


def test_iteration_order(loop, pair):
    a, b = pair
    order = []
    loop.call_later(0, order.append, "timer")
    loop.call_soon(order.append, "soon")
    loop.add_before_sleep(lambda: order.append("before_sleep 1"))
    loop.add_before_sleep(lambda: order.append("before_sleep 2"))

    def on_readable():
        order.append("reader")
        a.recv(10)
        loop.stop()

    loop.add_reader(a.fileno(), on_readable)
    b.send(b"x")
    # Let the timer's tick pass so that everything is due in iteration one.
    time.sleep(2 * TICK)
    run_until_stopped(loop)
    assert order == ["soon", "timer", "before_sleep 1", "before_sleep 2", "reader"]


def test_before_sleep_runs_every_iteration_in_order(loop):
    order = []
    loop.add_before_sleep(lambda: order.append(1))
    loop.add_before_sleep(lambda: order.append(2))
    remaining = [5]

    def again():
        remaining[0] -= 1
        if remaining[0]:
            loop.call_soon(again)
        else:
            loop.stop()

    loop.call_soon(again)
    run_until_stopped(loop)
    assert order == [1, 2] * 5


def test_work_queued_by_before_sleep_does_not_wait_for_poll(loop):
    # A far timer would make poll sleep its full second; the call_soon queued
    # by a hook makes poll return at once instead.
    loop.call_later(30, lambda: None)
    hooks = []

    def hook():
        hooks.append(time.monotonic())
        if len(hooks) == 1:
            loop.call_soon(loop.stop)

    loop.add_before_sleep(hook)
    started = time.monotonic()
    run_until_stopped(loop)
    assert time.monotonic() - started < 0.5


def test_call_soon_threadsafe_wakes_a_blocked_loop(loop):
    latencies = []
    woke = threading.Event()

    def from_thread():
        # The loop is asleep in poll by now (no timers, no ready work).
        time.sleep(0.2)
        sent = time.monotonic()
        loop.call_soon_threadsafe(lambda: (latencies.append(time.monotonic() - sent), woke.set()))
        woke.wait(5)
        loop.call_soon_threadsafe(loop.stop)

    thread = threading.Thread(target=from_thread)
    thread.start()
    started = time.monotonic()
    loop.run()
    thread.join()
    assert len(latencies) == 1
    assert latencies[0] < 0.1
    assert time.monotonic() - started < 1.0


def test_stop_then_run_again(loop):
    calls = []
    loop.call_soon(loop.stop)
    loop.run()
    loop.call_soon(calls.append, "second run")
    loop.call_soon(loop.stop)
    loop.run()
    assert calls == ["second run"]


def test_close_while_running_and_after(loop):
    errors = []

    def try_close():
        with pytest.raises(RuntimeError):
            loop.close()
        errors.append("refused")
        loop.stop()

    loop.call_soon(try_close)
    loop.run()
    assert errors == ["refused"]
    loop.close()
    loop.close()
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(lambda: None)
    with pytest.raises(RuntimeError):
        loop.run()


# -- errors --------------------------------------------------------------------


def test_callback_exceptions_are_logged_and_the_loop_continues(loop, pair, caplog):
    a, b = pair
    survived = []

    def boom(where):
        raise ValueError(f"boom in {where}")

    def bad_reader():
        a.recv(10)
        boom("reader")

    loop.call_soon(boom, "soon")
    loop.call_later(0, boom, "timer")
    loop.add_before_sleep(lambda: boom("before_sleep") if not survived else None)
    loop.add_reader(a.fileno(), bad_reader)
    b.send(b"x")
    loop.call_later(0.03, lambda: (survived.append(True), loop.stop()))
    with caplog.at_level(logging.ERROR, logger="pushcore.loop"):
        run_until_stopped(loop)
    assert survived == [True]
    records = [r for r in caplog.records if r.name == "pushcore.loop"]
    messages = {str(r.exc_info[1]) for r in records}
    assert {"boom in soon", "boom in timer", "boom in before_sleep", "boom in reader"} <= messages
    assert all(r.exc_info is not None for r in records)


def test_poll_within_wakes_the_loop_sooner_than_a_tick(loop):
    # A hook that put work off asks for the poll to return within 1 ms; with no
    # timer or event due, the loop would otherwise sleep up to its longest wait.
    starts = []

    def hook():
        starts.append(time.monotonic())
        if len(starts) < 20:
            loop.poll_within(0.001)

    loop.add_before_sleep(hook)
    loop.call_later(0.5, loop.stop)
    loop.run()
    # Twenty quick iterations, then one that slept until the stop timer.
    gaps = [b - a for a, b in zip(starts, starts[1:20])]
    assert len(starts) >= 20
    assert max(gaps) < TICK / 2 + SCHEDULING_SLACK
    assert starts[-1] - starts[19] > 0.3


def test_poll_within_lasts_one_iteration(loop):
    waits = []

    def hook():
        waits.append(time.monotonic())
        if len(waits) == 1:
            loop.poll_within(0.0)

    loop.add_before_sleep(hook)
    loop.call_later(0.2, loop.stop)
    loop.run()
    # The cap made the first poll return at once; after it the loop slept until
    # the stop timer (a cap that stayed would have made it spin).
    assert len(waits) <= 3
    assert waits[-1] - waits[0] > 0.15
