"""A model whose forward passes wait for the test: the test decides when each step runs.

Ordering tests (who decodes when, cancellation, a newcomer beside a long reply) need no
sleeps or retries: every step of the real model, alone or in a batch, passes this gate,
and the test releases steps one at a time and waits for what it expects to have happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

WAIT_S = 120  # a step or a condition that takes longer than this is a failure, not a slow machine


class StepGate:
    def __init__(self, model: Any):
        self.model = model
        self.steps = 0  # forward passes that ran
        self.waiting = 0  # forward passes held at the gate now
        self._allowed = 0
        self._open = False
        self._changed = threading.Condition()
        self._forward: Any = None

    def __enter__(self) -> StepGate:
        self._forward = self.model.forward
        self._own_forward = "forward" in vars(self.model)  # the fused decode step sets one
        gate = self

        def gated_forward(*args, **kwargs):
            gate._wait_for_permission()
            try:
                return gate._forward(*args, **kwargs)
            finally:
                with gate._changed:
                    gate.steps += 1
                    gate._changed.notify_all()

        self.model.forward = gated_forward
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()
        if self._own_forward:
            self.model.forward = self._forward
        else:
            del self.model.forward

    def release(self, steps: int = 1) -> None:
        with self._changed:
            self._allowed += steps
            self._changed.notify_all()

    def step_until(self, done: Callable[[], bool], most: int) -> int:
        """Release steps one at a time until ``done()``; returns how many it took (at most ``most``).

        After each release it waits until the model is held at the gate again (everything that
        step led to has happened) or ``done()``."""
        for taken in range(most + 1):
            if done():
                return taken
            self.release()
            self.wait_for(lambda: done() or (self.waiting and self._allowed == 0))
        raise AssertionError(f"not done after {most} steps")

    def wait_for(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()``, checking whenever a step starts or ends and every few
        milliseconds (a run's consumer thread reports without telling the gate)."""
        deadline = time.monotonic() + WAIT_S
        with self._changed:
            while not done():
                if time.monotonic() > deadline:
                    raise AssertionError("the condition was not reached")
                self._changed.wait(0.005)

    def _wait_for_permission(self) -> None:
        with self._changed:
            self.waiting += 1
            self._changed.notify_all()
            try:
                if not self._changed.wait_for(lambda: self._open or self._allowed > 0, WAIT_S):
                    raise AssertionError("a step waited for release for too long")
            finally:
                self.waiting -= 1
            if not self._open:
                self._allowed -= 1
