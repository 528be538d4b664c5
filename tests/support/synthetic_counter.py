"""A simulated device for the energy tests: fake time, a known power draw, and an energy counter that
publishes the true energy only at its own update ticks, like NVML's.

Nothing here sleeps: a 10 s window costs a few milliseconds, and every number is deterministic.

* ``World`` is a :class:`vitmerge.profiling.energy.Clock`: ``now``/``sleep``/``every`` run on fake
  time. ``sleep`` is idle time; ``work(seconds, watts)`` is time under load.
* Power: ``watts`` while working; after work, ``settle_w`` for ``settle_s`` seconds (clocks still
  high), then ``idle_w``.
* The counter updates at ticks spaced ``tick`` seconds (or uniformly in [tick_min, tick] with
  ``tick_min``), starting at ``phase``. At each tick it adds the energy of the interval since the
  last tick; with ``sampled < 1`` only the first ``sampled`` fraction of each interval is measured
  and scaled up (hardware that samples power part of the time).
* Pollers registered with ``every`` run at their interval in fake time, between the steps.
"""
from __future__ import annotations

import contextlib
import math
import random

from vitmerge.profiling import energy as en


class World(en.Clock):
    def __init__(self, tick=0.1, tick_min=None, phase=0.0, idle_w=40.0, settle_w=None, settle_s=0.0,
                 sampled=1.0, seed=0):
        self.t = 0.0
        self.true = 0.0  # true energy since t = 0 (J)
        self.published = 0.0  # what the counter shows
        self.updates = 0
        self.idle_w, self.settle_w, self.settle_s = idle_w, settle_w, settle_s
        self.last_work_end = -math.inf
        self.tick, self.tick_min, self.sampled = tick, tick_min, sampled
        self._rng = random.Random(seed)
        self._next_tick = phase if phase > 0 else tick  # the first update; then every tick (or jittered)
        self._interval_start = self._next_tick - tick
        self._acc = 0.0  # sampled energy of the current interval
        self._pollers = []  # [fn, interval, next due]

    # ------------------------------------------------------------------ Clock
    def now(self):
        return self.t

    def sleep(self, seconds):
        self._advance(seconds, None)

    @contextlib.contextmanager
    def every(self, seconds, fn):
        entry = [fn, seconds, self.t + seconds]
        self._pollers.append(entry)
        try:
            yield
        finally:
            self._pollers.remove(entry)

    # ------------------------------------------------------------------ the device
    def work(self, seconds, watts):
        self._advance(seconds, watts)
        self.last_work_end = self.t

    def power(self, watts):
        if watts is not None:
            return watts
        if self.settle_w is not None and self.t < self.last_work_end + self.settle_s:
            return self.settle_w
        return self.idle_w

    def _next_interval(self):
        return self.tick if self.tick_min is None else self._rng.uniform(self.tick_min, self.tick)

    def _advance(self, seconds, watts):
        end = self.t + seconds
        while self.t < end - 1e-12:
            sample_end = self._interval_start + self.sampled * (self._next_tick - self._interval_start)
            marks = [end, self._next_tick] + [p[2] for p in self._pollers]
            if self.sampled < 1 and sample_end > self.t:
                marks.append(sample_end)
            if watts is None and self.settle_w is not None and self.t < self.last_work_end + self.settle_s:
                marks.append(self.last_work_end + self.settle_s)
            nxt = min(m for m in marks if m > self.t + 1e-12) if any(m > self.t + 1e-12 for m in marks) else end
            p = self.power(watts)
            self.true += p * (nxt - self.t)
            lo, hi = self.t, min(nxt, sample_end)
            if hi > lo:
                self._acc += p * (hi - lo)
            self.t = nxt
            if abs(self.t - self._next_tick) <= 1e-12:
                self.published += self._acc / self.sampled
                self.updates += 1
                self._acc = 0.0
                self._interval_start = self.t
                self._next_tick = self.t + self._next_interval()
            for entry in list(self._pollers):
                if self.t >= entry[2] - 1e-12:
                    entry[2] = self.t + entry[1]
                    entry[0]()


class WorldMeter(en.EnergyMeter):
    """The world's counter as an energy meter (tick-aligned like NVML unless told otherwise)."""

    def __init__(self, world, tick_aligned=True, default_seconds=10.0, default_rest=10.0, poll_seconds=0.002):
        self.world = world
        self.source = "sim"
        self.tick_aligned, self.default_seconds, self.default_rest = tick_aligned, default_seconds, default_rest
        self.poll_seconds = poll_seconds
        self.reads = 0

    def read(self):
        self.reads += 1
        return self.world.published
