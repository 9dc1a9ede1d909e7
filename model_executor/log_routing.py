"""cosmos3_serve's log records go where vLLM's go: its handlers, format and level (`VLLM_LOGGING_LEVEL`), in every
process (the API server's and the engine's), whenever vLLM configures them (at import in 0.26, when the engine or
server starts in 0.32)."""

from __future__ import annotations

import logging


class _ToVllm(logging.Handler):
    """Hands each record to the "vllm" logger's handlers, at that logger's level when the record is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm = logging.getLogger("vllm")
        if record.levelno >= vllm.getEffectiveLevel():
            vllm.handle(record)


def route_to_vllm() -> None:
    """Idempotent."""
    ours = logging.getLogger("cosmos3_serve")
    if not any(isinstance(handler, _ToVllm) for handler in ours.handlers):
        ours.addHandler(_ToVllm())
    ours.setLevel(logging.DEBUG)  # the "vllm" logger's level decides, at emit time
    ours.propagate = False
