"""The epoll reactor, shaped like redis ``ae.c``.

One :class:`EventLoop` per process (or per SO_REUSEPORT worker) drives every
socket, timer and cross-thread wakeup.  It is level-triggered epoll with one
registration per fd (reader and writer share the mask), a hashed timing wheel
for timers, a ``call_soon`` queue, and ``before_sleep`` hooks.

Callback order
--------------

The order of one :meth:`EventLoop.run`, written as a grammar in the style of
asyncio's ``protocols.py``::

    run -> ITERATION* -> end                (ends at the top of an iteration
                                              after stop() was called)
    ITERATION -> SOON* -> TIMER* -> BEFORE_SLEEP* -> poll -> FD_EVENT*
    FD_EVENT  -> [READER] [WRITER]

- SOON: the ``call_soon``/``call_soon_threadsafe`` callbacks queued before
  this iteration began, in FIFO order.  Callbacks they queue run in the next
  iteration, never in the same one, so a callback that re-queues itself
  cannot starve I/O.
- TIMER: the expired timers, in deadline order (FIFO for equal deadlines).  A
  timer cancelled or reset by an earlier callback of the same round does not
  run.
- BEFORE_SLEEP: every hook, every iteration, in registration order.
- poll: ``epoll.poll`` with timeout 0 when SOON work is pending (a hook may
  have queued some), else until the next timer tick, at most 1 s.
- READER runs on EPOLLIN, WRITER on EPOLLOUT; on EPOLLHUP/EPOLLERR both run
  so that each sees the error from its own ``recv``/``send``.  Once a callback
  has removed the last interest in an fd, no further callback runs for that
  fd in this round, even if the fd number was reused and registered again
  (the stale event belongs to the old file).

A callback's exception is logged to ``pushcore.loop`` and the loop goes on:
a bug in one connection's handler must not stop the daemon.

The durability rule lives here
------------------------------

**before_sleep commits the pending batch to the log, THEN flushes acks.**

Every PUBLISH parsed during this iteration's FD_EVENTs sits in the pending
batch with the (connection, packet id) that waits for its ack.  The daemon
registers, in this order, the hook that commits that batch to LMDB with the
configured durability and the hook that queues and flushes the acks; hooks run
in registration order, so no ack leaves for a record that is not committed.
When the commit is pipelined to the writer thread, the first hook only hands
the batch over and the acks are queued by the ``call_soon_threadsafe``
callback that reports the commit done: the order is kept, only deferred.
This is redis' ``beforeSleep`` writing the AOF before replies go out.
"""

import errno
import logging
import os
import select
import time
from collections import deque
from operator import attrgetter

__all__ = ["EventLoop", "Timer"]

_logger = logging.getLogger("pushcore.loop")

# Timing wheel: 10 ms ticks x 4096 slots, one revolution every 40.96 s.  A
# timer stores its absolute tick; a longer one (keepalive x1.5 can reach
# minutes) stays in its slot and is passed over until its round comes.  The
# slot count is a power of two so that the slot is ``tick & _SLOT_MASK``.
_TICKS_PER_SECOND = 100
# No cap on a poll's wait beyond the timers' own (poll_within lowers it).
_MAX_POLL_S = float("inf")
_WHEEL_SLOTS = 4096
_SLOT_MASK = _WHEEL_SLOTS - 1

# Longest sleep in epoll.poll, in ticks (1 s).  A Python signal handler runs
# while epoll_wait is retried (PEP 475) and cannot interrupt it, so a stop()
# from a handler is seen within this bound.
_MAX_SLEEP_TICKS = _TICKS_PER_SECOND

# One poll returns up to this many ready fds: many connections served per
# wakeup under load.
_MAX_EVENTS = 4096

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
# EPOLLHUP and EPOLLERR are always reported, registered or not; both
# callbacks are run for them so each sees the error.
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

_timer_when = attrgetter("_when")
_monotonic = time.monotonic


class Timer:
    """A timer on the loop's wheel; made by ``call_later``/``call_at``.

    ``cancel()`` and ``reset()`` are O(1): the timer is a key of its slot's
    dict, so it is unlinked and relinked without a scan and without making a
    new object.  A timer that has fired or was cancelled can be armed again
    with ``reset()``.
    """

    __slots__ = ("_loop", "_callback", "_args", "_when", "_tick", "_slot", "_cancelled")

    def __init__(self, loop, callback, args):
        self._loop = loop
        self._callback = callback
        self._args = args
        self._when = 0.0
        self._tick = 0
        self._slot = None
        self._cancelled = False

    def __repr__(self):
        state = "cancelled" if self._cancelled else ("armed" if self._slot is not None else "idle")
        return f"<Timer {state} when={self._when:.3f} callback={self._callback!r}>"

    def when(self):
        """The monotonic time this timer was last armed for."""
        return self._when

    def cancelled(self):
        return self._cancelled

    def cancel(self):
        """Stop the timer from firing; harmless if it fired or was cancelled."""
        slot = self._slot
        if slot is not None:
            del slot[self]
            self._slot = None
        self._cancelled = True

    def reset(self, delay_s):
        """Re-arm to fire ``delay_s`` seconds from now (keepalive on each packet)."""
        when = _monotonic() + delay_s
        if self._slot is not None and int(when * _TICKS_PER_SECOND) + 1 == self._tick:
            # A keepalive reset within the same tick stays in its slot.
            self._when = when
            return
        self._arm(when)

    def _arm(self, when):
        loop = self._loop
        # Fire on the first tick that starts strictly after `when`: the wheel
        # then fires no earlier than asked and at most one tick after.
        tick = int(when * _TICKS_PER_SECOND) + 1
        if tick <= loop._tick:
            # Already due: fire on the next tick the loop processes (the
            # current one's slot has been swept).
            tick = loop._tick + 1
        old_slot = self._slot
        if old_slot is not None:
            del old_slot[self]
        slot = loop._wheel[tick & _SLOT_MASK]
        slot[self] = None
        self._slot = slot
        self._when = when
        self._tick = tick
        self._cancelled = False
        if tick < loop._next_tick:
            loop._next_tick = tick


class EventLoop:
    """A level-triggered epoll reactor with a timing wheel; see the module doc.

    fds are ints; remove an fd's reader and writer before closing it (removal
    after close is tolerated).  All methods except ``call_soon_threadsafe``
    must be called from the thread running the loop.
    """

    def __init__(self):
        self._epoll = select.epoll()
        self._readers = {}
        self._writers = {}
        self._masks = {}
        # fds whose registration was dropped since the last poll returned;
        # their events in the current round are stale.
        self._removed = set()
        self._ready = deque()
        self._before_sleep = []
        self._wheel = [{} for _ in range(_WHEEL_SLOTS)]
        self._due = []
        self._now = time.monotonic()
        # Last tick whose slot has been swept, and a lower bound on the tick
        # of the earliest armed timer (waking early is harmless, late is not).
        self._tick = int(self._now * _TICKS_PER_SECOND)
        self._next_tick = self._tick + _MAX_SLEEP_TICKS
        self._running = False
        self._stopping = False
        self._closed = False
        # The longest the next poll may wait (poll_within); reset after each poll.
        self._poll_cap = _MAX_POLL_S
        self._wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.add_reader(self._wakeup_fd, self._drain_wakeup)

    # -- file events -------------------------------------------------------

    def add_reader(self, fd, callback):
        self._readers[fd] = callback
        mask = self._masks.get(fd, 0)
        if not mask & _EPOLLIN:
            self._set_mask(fd, mask, mask | _EPOLLIN)

    def remove_reader(self, fd):
        if self._readers.pop(fd, None) is not None:
            mask = self._masks[fd]
            self._set_mask(fd, mask, mask & ~_EPOLLIN)

    def add_writer(self, fd, callback):
        self._writers[fd] = callback
        mask = self._masks.get(fd, 0)
        if not mask & _EPOLLOUT:
            self._set_mask(fd, mask, mask | _EPOLLOUT)

    def remove_writer(self, fd):
        if self._writers.pop(fd, None) is not None:
            mask = self._masks[fd]
            self._set_mask(fd, mask, mask & ~_EPOLLOUT)

    def _set_mask(self, fd, old, new):
        if new:
            if old:
                self._epoll.modify(fd, new)
            else:
                self._epoll.register(fd, new)
            self._masks[fd] = new
            return
        del self._masks[fd]
        self._removed.add(fd)
        try:
            self._epoll.unregister(fd)
        except OSError as exc:
            # The fd was closed first; closing it already took it out of the
            # epoll set (EBADF), or its number now names an unregistered file
            # (ENOENT).
            if exc.errno not in (errno.EBADF, errno.ENOENT):
                raise

    # -- time events ---------------------------------------------------------

    def call_later(self, delay_s, callback, *args):
        """Run ``callback(*args)`` once, no earlier than ``delay_s`` from now.

        Now is ``time.monotonic()`` at the call, not the cached ``time()``,
        so the delay is never shortened by the time spent in this iteration.
        """
        timer = Timer(self, callback, args)
        timer._arm(_monotonic() + delay_s)
        return timer

    def call_at(self, when, callback, *args):
        """Run ``callback(*args)`` once at monotonic time ``when`` or up to a tick later."""
        timer = Timer(self, callback, args)
        timer._arm(when)
        return timer

    def time(self):
        """The monotonic time cached for this iteration (refreshed after each poll)."""
        return self._now

    def poll_within(self, delay_s):
        """Have this iteration's poll return within ``delay_s``: for a before_sleep
        hook that put off work it must come back to sooner than a timer tick."""
        if delay_s < self._poll_cap:
            self._poll_cap = delay_s

    def _run_timers(self, now_tick):
        wheel = self._wheel
        due = self._due
        start = self._next_tick
        if now_tick - start >= _WHEEL_SLOTS:
            # Slept through a whole revolution: every slot once is enough.
            start = now_tick - _SLOT_MASK
        for tick in range(start, now_tick + 1):
            slot = wheel[tick & _SLOT_MASK]
            if slot:
                for timer in slot:
                    if timer._tick <= now_tick:
                        due.append(timer)
        for timer in due:
            del timer._slot[timer]
            timer._slot = None
        self._tick = now_tick
        try:
            if len(due) > 1:
                due.sort(key=_timer_when)
            for timer in due:
                # Skip one cancelled or re-armed by an earlier callback here.
                if timer._slot is None and not timer._cancelled:
                    try:
                        timer._callback(*timer._args)
                    except Exception:
                        _logger.exception("Exception in timer callback %r", timer._callback)
        finally:
            due.clear()
        # Timers armed above all landed after now_tick; find the first
        # non-empty slot, or sleep the longest allowed.
        end = now_tick + _MAX_SLEEP_TICKS
        tick = now_tick + 1
        while tick < end and not wheel[tick & _SLOT_MASK]:
            tick += 1
        self._next_tick = tick

    # -- soon callbacks and hooks ------------------------------------------

    def call_soon(self, callback, *args):
        """Run ``callback(*args)`` at the start of the next iteration, before polling."""
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback, *args):
        """``call_soon`` from any thread; wakes the loop if it is blocked in poll."""
        if self._closed:
            raise RuntimeError("event loop is closed")
        # deque.append is atomic under the GIL; the eventfd write makes a
        # sleeping epoll_wait return.
        self._ready.append((callback, args))
        os.eventfd_write(self._wakeup_fd, 1)

    def _drain_wakeup(self):
        # One read resets the eventfd counter (non-semaphore mode).
        os.eventfd_read(self._wakeup_fd)

    def add_before_sleep(self, callback):
        """Call ``callback()`` every iteration right before polling, in registration order."""
        self._before_sleep.append(callback)

    # -- running -------------------------------------------------------------

    def run(self):
        """Run iterations until ``stop()``; returns at once if stop() came first."""
        if self._closed:
            raise RuntimeError("event loop is closed")
        if self._running:
            raise RuntimeError("event loop is already running")
        self._running = True
        # The hot path: bound methods and containers cached as locals.
        ready = self._ready
        popleft = ready.popleft
        before_sleep = self._before_sleep
        poll = self._epoll.poll
        readers_get = self._readers.get
        writers_get = self._writers.get
        removed = self._removed
        clear_removed = removed.clear
        run_timers = self._run_timers
        log_exception = _logger.exception
        monotonic = _monotonic
        try:
            while not self._stopping:
                now = monotonic()
                self._now = now
                if ready:
                    for _ in range(len(ready)):
                        callback, args = popleft()
                        try:
                            callback(*args)
                        except Exception:
                            log_exception("Exception in callback %r", callback)
                now_tick = int(now * _TICKS_PER_SECOND)
                if now_tick >= self._next_tick:
                    run_timers(now_tick)
                for hook in before_sleep:
                    try:
                        hook()
                    except Exception:
                        log_exception("Exception in before_sleep hook %r", hook)
                if ready or self._stopping:
                    timeout = 0.0
                else:
                    timeout = self._next_tick / _TICKS_PER_SECOND - monotonic()
                    if timeout > self._poll_cap:
                        timeout = self._poll_cap
                    if timeout < 0.0:
                        timeout = 0.0
                self._poll_cap = _MAX_POLL_S
                events = poll(timeout, _MAX_EVENTS)
                self._now = monotonic()
                if removed:
                    clear_removed()
                for fd, mask in events:
                    if mask & _READ_EVENTS:
                        callback = readers_get(fd)
                        if callback is not None and fd not in removed:
                            try:
                                callback()
                            except Exception:
                                log_exception("Exception in reader callback %r for fd %d", callback, fd)
                    if mask & _WRITE_EVENTS:
                        callback = writers_get(fd)
                        if callback is not None and fd not in removed:
                            try:
                                callback()
                            except Exception:
                                log_exception("Exception in writer callback %r for fd %d", callback, fd)
        finally:
            self._stopping = False
            self._running = False

    def stop(self):
        """End ``run()`` after the current iteration (from another thread: ``call_soon_threadsafe(loop.stop)``)."""
        self._stopping = True

    def close(self):
        """Release the epoll and eventfd; pending callbacks and timers are dropped."""
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        if self._closed:
            return
        self._closed = True
        self._epoll.close()
        os.close(self._wakeup_fd)
        self._readers.clear()
        self._writers.clear()
        self._masks.clear()
        self._ready.clear()
        self._before_sleep.clear()
        for slot in self._wheel:
            for timer in slot:
                timer._slot = None
            slot.clear()
