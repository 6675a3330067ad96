"""Dependency monitor driving grpc.health.v1 status.

SERVING only while every dependency check passes (the encoder's models are READY and the Milvus collection is
open and answering); NOT_SERVING as soon as one fails — either on the periodic probe or when an RPC reports a
dependency error (`mark_down`), after which the next probe runs at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]


class HealthMonitor:
    """Probes `checks` every `interval_s` seconds and sets `services` SERVING / NOT_SERVING on `servicer`.

    Each check returns True when its dependency is usable; one that raises or takes longer than
    `timeout_s` counts as down.
    """

    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        services: list[str],
        checks: dict[str, Check],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._servicer = servicer
        self._services = services
        self._checks = checks
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._down: set[str] = set(checks)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        """True when the last probe found every dependency up."""
        return not self._down

    @property
    def down(self) -> frozenset[str]:
        """Names of the dependencies found down."""
        return frozenset(self._down)

    async def start(self) -> None:
        """Run one probe now (so the first status is real), then keep probing in the background."""
        await self.probe()
        self._task = asyncio.create_task(self._loop(), name="vitrine-health")

    async def stop(self) -> None:
        """Stop probing and report NOT_SERVING (the server is going away)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._publish(health_pb2.HealthCheckResponse.NOT_SERVING)

    def mark_down(self, dependency: str) -> None:
        """Record that an RPC found `dependency` unreachable: NOT_SERVING now, re-probe at once.

        Called once per failed call or ingest item (retrieval_service.grpc.status.ErrorMapper), so a dependency
        already recorded down only wakes the probe: NOT_SERVING was published when it went down.
        """
        self._wake.set()
        if dependency in self._down:
            return
        log.warning("dependency %s reported unavailable", dependency)
        self._down.add(dependency)
        asyncio.get_running_loop().create_task(self._publish(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def probe(self) -> None:
        """Run every check once and publish the resulting status."""
        results = await asyncio.gather(*(self._run(name, check) for name, check in self._checks.items()))
        before = set(self._down)
        self._down = {name for name, ok in zip(self._checks, results) if not ok}
        if self._down != before:
            log.info("health: %s", "SERVING" if not self._down else f"NOT_SERVING ({', '.join(sorted(self._down))} down)")
        status = health_pb2.HealthCheckResponse.SERVING if not self._down else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._publish(status)

    async def _run(self, name: str, check: Check) -> bool:
        try:
            return bool(await asyncio.wait_for(check(), self._timeout_s))
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "down"
            log.debug("health check %s failed: %r", name, exc)
            return False

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.probe()

    async def _publish(self, status: int) -> None:
        for service in self._services:
            await self._servicer.set(service, status)
