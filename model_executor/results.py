"""Finished requests' outputs on their way from the device to the host, without the host waiting for the device.

When requests finish in a denoising step, the executor queues their VAE decode and the copies of their frames and
actions into pinned host memory behind that step, on the same CUDA stream, and records an event; the next steps are
queued behind them at once. A later call hands the outputs out when the event has completed (or waits for it when
nothing else is left to run). Before this, the worker synchronised with the device twice per finishing step and
the GPU sat idle while the results crossed to the driver and the next step was asked for (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class GenerationOutput:
    """A finished request's result, as the reference pipeline returns it."""

    video: torch.Tensor | None  # normalised latents [1, z_dim, T, H, W] or uint8 frames; None in inverse dynamics
    actions: torch.Tensor | None  # [chunk, raw_action_dim] generated actions (policy, inverse dynamics)


def to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A host copy of `tensor` queued on the current stream (pinned memory; valid once the stream has passed it);
    a CPU tensor as it is."""
    if tensor is None or tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class PendingResults:
    """The outputs of the requests that finished in one step: valid on the host once `ready`."""

    outputs: dict[str, GenerationOutput]  # request id -> host tensors
    done: torch.cuda.Event | None = None  # recorded after the copies; None on the CPU (ready at once)
    decode_events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # around the VAE decode, on CUDA
    decode_host_s: float = 0.0  # the VAE decode's seconds where it ran synchronously (CPU)

    @classmethod
    def launch(cls, produce: Callable[[], dict[str, GenerationOutput]], device: torch.device) -> PendingResults:
        """Queue `produce()` (the decode, or the outputs as they are) and the copies of its outputs to the host."""
        if device.type != "cuda":
            started = time.perf_counter()
            outputs = produce()
            return cls(outputs, decode_host_s=time.perf_counter() - started)
        start, end, done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        outputs = produce()
        end.record()
        host = {request_id: GenerationOutput(to_host(out.video), to_host(out.actions))
                for request_id, out in outputs.items()}  # fmt: skip
        done.record()
        return cls(host, done=done, decode_events=(start, end))

    @property
    def ready(self) -> bool:
        return self.done is None or self.done.query()

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    @property
    def decode_s(self) -> float:
        """Seconds the device spent producing the outputs (the VAE decode; once ready)."""
        if self.decode_events is None:
            return self.decode_host_s
        start, end = self.decode_events
        return start.elapsed_time(end) / 1e3
