"""The app over HTTP: uvicorn on the socket vLLM set up, with the server's own signal handling (`lifecycle`).

uvicorn's and vLLM's launchers both install SIGINT / SIGTERM handlers that stop the engine first and cancel the
HTTP server, dropping open responses; here a signal drains (`Lifecycle.drain`), then uvicorn shuts down
gracefully, then the caller stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from cosmos3_serve.server.lifecycle import Lifecycle


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its signal handlers: the lifecycle owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(app: FastAPI, sock: socket.socket, lifecycle: Lifecycle, *, log_level: str, access_log: bool,
                max_message_bytes: int) -> int:  # fmt: skip
    """Serve until a signal (drain, exit code 0) or the engine's or generator's death (exit code 1). A websocket
    message over `max_message_bytes` closes its connection (1009), as a body over it gets 413."""
    server = SignalFreeServer(uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                             ws_max_size=max_message_bytes))  # fmt: skip
    app.state.server = server
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled.set)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    watchers = {asyncio.create_task(signalled.wait()): "signal",
                asyncio.create_task(lifecycle.wait_for_failure()): "failure"}  # fmt: skip
    done, _ = await asyncio.wait({serving, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    grace_left_s = lifecycle.grace_s
    for task in done:
        if watchers.get(task) == "signal":
            grace_left_s = await lifecycle.drain()
        elif watchers.get(task) == "failure":
            lifecycle.fail(task.result())
    for task in watchers:
        task.cancel()
    server.config.timeout_graceful_shutdown = max(1, round(grace_left_s))
    server.should_exit = True
    await serving
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
    return lifecycle.exit_code
