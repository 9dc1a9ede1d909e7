"""The server's life once it serves: draining on SIGTERM / SIGINT, stopping when the engine or the generator dies,
and the exit code that tells a supervisor which happened.

Draining: new work (every POST) gets 503 and `/v1/health/ready` turns 503, the generation jobs in flight get up to
the grace period to finish and are then failed (every event stream gets its final event, every synchronous client
its answer), open HTTP requests (chat streams) get what is left of it, then the engine stops and the process exits
0. A dead engine core or generator loop fails every job at once, turns readiness 503 and ends the process with
exit code 1, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from cosmos3_serve.server.generation_service import GenerationService
from cosmos3_serve.server.middleware import json_error

logger = logging.getLogger(__name__)
WATCH_INTERVAL_S = 0.5
SHUTDOWN_REASON = "the server shut down before the job finished; retry it"


class Lifecycle:
    def __init__(self, engine_client: Any, service: GenerationService, grace_s: float) -> None:
        self.engine, self.service, self.grace_s = engine_client, service, grace_s
        self.draining = False
        self.failure: str | None = None

    @property
    def accepting(self) -> bool:
        """Whether new work is taken: not draining, nothing dead."""
        return not self.draining and self.failure is None and not self.engine.errored

    @property
    def exit_code(self) -> int:
        return 0 if self.failure is None else 1

    async def wait_for_failure(self) -> str:
        """Returns why, once vLLM's engine core is dead or the generator loop has stopped."""
        while True:
            if self.engine.errored:
                return "the engine stopped"
            if self.service.failure is not None:
                return self.service.failure
            await asyncio.sleep(WATCH_INTERVAL_S)

    def fail(self, reason: str) -> None:
        self.failure = reason
        logger.error("%s: failing every generation job and exiting with code 1", reason)
        self.service.fail_all(reason)

    async def drain(self) -> float:
        """Refuse new work, let the jobs in flight finish within the grace period, fail the rest; returns the
        seconds of the grace period that are left."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        logger.info("draining: new work is refused; jobs in flight get %.0f s to finish", self.grace_s)
        await self.service.drain(self.grace_s, SHUTDOWN_REASON)
        return max(0.0, deadline - loop.time())


class LifecycleMiddleware:
    """While the server drains or after a failure, new work (POST) gets 503 with `Retry-After`; reads (job status,
    results, health, metadata) still pass."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app, self.lifecycle = app, lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or self.lifecycle.accepting:
            return await self.app(scope, receive, send)
        message = "the server is shutting down" if self.lifecycle.draining else "the server has failed and restarts"
        await json_error(send, 503, message, "service_unavailable", headers=[(b"retry-after", b"5")])
