"""The driver's end of the generator loop's event stream: a ZeroMQ PULL socket bound on this host (an IPC path in a
private temporary directory), whose address the driver hands to `cosmos3_start_generator`."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from cosmos3_serve.model_executor.wire import decode_event


class EventChannel:
    """Receives the loop's events, blocking (`recv`) or awaiting them (`arecv`, with `asynchronous`)."""

    def __init__(self, asynchronous: bool = False) -> None:
        self._directory = tempfile.mkdtemp(prefix="cosmos3-")
        os.chmod(self._directory, 0o700)
        self.address = f"ipc://{self._directory}/events"
        context = zmq.asyncio.Context.instance() if asynchronous else zmq.Context.instance()
        self._socket = context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.address)

    def recv(self, timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """The next event, or None after `timeout_s` without one."""
        if timeout_s is not None and not self._socket.poll(int(timeout_s * 1000)):
            return None
        return decode_event(self._socket.recv_multipart(copy=False))

    async def arecv(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return decode_event(await self._socket.recv_multipart(copy=False))

    def close(self) -> None:
        self._socket.close(linger=0)
        shutil.rmtree(self._directory, ignore_errors=True)
