"""The caller's deadline, carried through a call's work in a contextvar, and the timeouts derived from it.

A transport sets the deadline of each call once (`retrieval_service.grpc.interceptors` wraps every RPC in
`scope(context.time_remaining())`); every outgoing call of an adapter takes `remaining(cap_s)` as its timeout:
the caller's time left, at most the adapter's own per-call setting (`encoder_timeout_s`, `milvus_timeout_s`).
So a frozen dependency holds a caller at most until its deadline (or the setting, without a deadline), and
work for a caller that has gone is not kept running past its deadline.

Deadlines are absolute `time.monotonic()` seconds. The contextvar follows the call into the tasks it creates
(asyncio copies the context into each new task) but NOT into `loop.run_in_executor` threads: hop with
`contextvars.copy_context().run` (retrieval_service.adapters.milvus.async_store) or compute the timeout first.

A deadline that has passed is `DeadlineExceededError` (gRPC DEADLINE_EXCEEDED, retrieval_service.grpc.status),
not a dependency outage: it says nothing about the dependency's health (a caller may send 5 ms deadlines to a
healthy service), so it never turns health NOT_SERVING. A dependency that does not answer within the adapter's
own setting, with the caller's time not yet spent, is DependencyUnavailableError (UNAVAILABLE) as before.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The smallest timeout `remaining` gives (seconds): a deadline 0.2 ms away still gets a real, short call
#: rather than a zero or negative timeout, which gRPC and pymilvus treat as "no deadline" or reject.
MIN_TIMEOUT_S = 0.001
#: `expired()` counts a deadline at most this close (seconds) as passed: a call timed out by a timeout equal
#: to the caller's time left ends within a clock tick of the deadline.
EXPIRY_SLACK_S = 0.005

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("vitrine_deadline", default=None)


class DeadlineExceededError(RuntimeError):
    """The caller's deadline passed before the work finished (gRPC DEADLINE_EXCEEDED).

    Raised by `remaining()` when the deadline has already passed, and by the adapters when a dependency call
    fails after the caller's deadline passed (its timeout was the caller's time left). Not a dependency
    outage: health is not affected. (Deliberately not a TimeoutError, so code waiting on its own
    `asyncio.wait_for` never mistakes it for its own timeout.)
    """


def deadline() -> float | None:
    """The current call's absolute deadline, `time.monotonic()` seconds; None when the caller set none."""
    return _deadline.get()


def time_left() -> float | None:
    """Seconds until the current call's deadline (<= 0 once it passed); None when there is none."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()


def expired() -> bool:
    """True when the current call has a deadline and it has passed (within `EXPIRY_SLACK_S`)."""
    left = time_left()
    return left is not None and left <= EXPIRY_SLACK_S


def check() -> None:
    """Raise DeadlineExceededError (gRPC DEADLINE_EXCEEDED) when the current call's deadline has passed; else
    (or without a deadline) do nothing."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceededError(f"the caller's deadline passed {-left:.3f} s ago")


def remaining(cap_s: float) -> float:
    """Timeout for one outgoing call: min(cap_s, the caller's time left), at least `MIN_TIMEOUT_S`.

    Args:
        cap_s: the adapter's own per-call timeout (a setting), seconds, > 0.

    Returns:
        Seconds (float): cap_s without a caller deadline; else min(cap_s, deadline - now), floored at
        MIN_TIMEOUT_S.

    Raises:
        DeadlineExceededError: the caller's deadline has already passed (gRPC DEADLINE_EXCEEDED).
    """
    check()
    left = time_left()
    return cap_s if left is None else min(cap_s, max(left, MIN_TIMEOUT_S))


@contextmanager
def scope(timeout_s: float | None) -> Iterator[float | None]:
    """Set the deadline of the work inside the block to `timeout_s` seconds from now (None: no new deadline).

    Nested scopes never extend an outer deadline: the block's deadline is the earlier of the two. Used by the
    transport once per call (gRPC: `context.time_remaining()`, None when the client set no deadline).

    Yields:
        The block's absolute deadline (`time.monotonic()` seconds), or None when there is none.
    """
    outer = _deadline.get()
    at = outer
    if timeout_s is not None:
        mine = time.monotonic() + float(timeout_s)
        at = mine if outer is None else min(outer, mine)
    token = _deadline.set(at)
    try:
        yield at
    finally:
        try:
            _deadline.reset(token)
        except ValueError:  # an async generator closed from another context (asyncio's asyncgen finalizer)
            _deadline.set(outer)
