"""The generator's own loop inside a vLLM worker: the reasoner keeps stepping while the generator denoises.

`GeneratorLoop` runs the `DiffusionExecutor` on a thread of its own, with a CUDA stream of its own. vLLM's engine
core never waits for a denoising step: a driver's RPC (`Cosmos3WorkerExtension.cosmos3_submit`) only queues
commands (admit, cancel, forget), and the loop applies them at its next step boundary. The loop sends what happens
(admissions, progress, results, failures) straight to the driver over a ZeroMQ socket, not through the engine
core: a 720p video's frames are half a gigabyte.

On the GPU the reasoner's kernels and the generator's share the device: the reasoner's (latency-bound decode steps)
on vLLM's stream, the generator's (compute-bound) on this loop's. The host side yields too: the loop's thread runs
at a lower OS priority, and the worker switches Python threads more often, so the engine core's thread gets the
interpreter back within a millisecond.

With several ranks every rank runs a loop (over its shard of the tower, or its share of the sequences); the ranks'
loops agree at every step on how many of the commands they have received they apply (`GeneratorGroup.agree`), so
their batches stay equal. The first rank sends the events of the batch (admissions, progress, failures); every rank
sends the results it decoded itself (the executor deals finished requests to the ranks in turn), and a rank whose
loop stops says so.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import torch

from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
from cosmos3_serve.model_executor.generator_parallel import GeneratorGroup
from cosmos3_serve.model_executor.kv_export import PromptKVStore
from cosmos3_serve.model_executor.wire import Commands, encode_event, request_from_payload

logger = logging.getLogger(__name__)

# Python hands the interpreter to a waiting thread after this many seconds (5 ms by default): the engine core's
# thread waits at most this long for the loop's thread to let go.
SWITCH_INTERVAL_S = 0.0005
# The loop thread's niceness above the worker's (Linux schedules threads by it): the engine core's thread wins a
# contended core.
LOOP_NICENESS = 10


class GeneratorLoop:
    def __init__(self, executor: DiffusionExecutor, group: GeneratorGroup, store: PromptKVStore) -> None:
        self.executor, self.group, self.store = executor, group, store
        self._received: list[Commands] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._socket = None
        self._sending = threading.Lock()  # the socket: the loop sends, a driver's start replaces it
        self.steps = 0

    def start(self, events_address: str | None) -> None:
        """Start the loop (once), sending its events to `events_address` (a ZeroMQ PULL socket's). Called again, the
        events go to the new address from then on: one driver at a time, the last one started."""
        if events_address is not None:
            import zmq

            socket = zmq.Context.instance().socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(events_address)
            with self._sending:
                if self._socket is not None:
                    self._socket.close()
                self._socket = socket
        if self._thread is None:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            self._thread = threading.Thread(target=self._run, name="cosmos3-generator", daemon=True)
            self._thread.start()

    def submit(self, commands: Commands) -> None:
        """Queue commands for the next step boundary (called from the worker's RPC handler: returns at once)."""
        with self._condition:
            self._received.append(commands)
            self._condition.notify()

    # ---- the loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        device = self.executor.device
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOOP_NICENESS)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.set_stream(torch.cuda.Stream(device))
        try:
            while True:
                for commands in self._take(wait=not self.executor.has_work):
                    self._apply(commands)
                self._step()
        except Exception as exc:  # noqa: BLE001 - the loop is gone: say so, the driver fails what it waits for
            logger.exception("the generator loop stopped")
            self._send({"kind": "fatal", "error": f"{type(exc).__name__}: {exc}"}, every_rank=True)

    def _take(self, wait: bool) -> list[Commands]:
        """The commands to apply at this step boundary, the same on every rank (the first rank's count)."""
        with self._condition:
            if wait and self.group.is_leader:
                self._condition.wait_for(lambda: self._received)
            count = self.group.agree(len(self._received)) if self.group.is_leader else None
        if not self.group.is_leader:
            count = self.group.agree(0)
            with self._condition:
                self._condition.wait_for(lambda: len(self._received) >= count)
        with self._condition:
            taken, self._received = self._received[:count], self._received[count:]
        return taken

    def _apply(self, commands: Commands) -> None:
        for key in commands.forget:
            self.store.discard(key)
        for request_id in commands.cancel:
            self.executor.cancel(request_id)
        if not commands.admit:
            return
        entries, errors = [], {}
        for request_id, payload, keys, decode in commands.admit:
            prompt_kvs = [self.store.take(key) for key in keys if key in self.store]
            if len(prompt_kvs) != len(keys):
                errors[request_id] = "the prompt's K/V are gone (evicted from the bounded store, or never exported)"
                continue
            entries.append((request_id, request_from_payload(payload), prompt_kvs, decode))
        try:
            errors.update(self.executor.admit(entries))
        except Exception as exc:  # noqa: BLE001 - e.g. a conditioning clip the VAE cannot encode: fail these only
            logger.exception("admission failed")
            errors.update({request_id: f"{type(exc).__name__}: {exc}" for request_id, *_ in entries})
            for request_id, *_ in entries:
                self.executor.cancel(request_id)
        admitted = [request_id for request_id, *_ in entries if request_id not in errors]
        self._send({"kind": "admitted", "ids": admitted, "errors": errors})

    def _step(self) -> None:
        """One denoising step; the requests that finish in it are collected, and the results that reached the host
        are sent. A step that fails fails every request in flight (their memory is released) and the loop goes on."""
        executor = self.executor
        try:
            started = time.perf_counter()
            progress = executor.step()
            if progress:
                self.steps += 1
                self._send({"kind": "progress", "steps": progress, "seconds": time.perf_counter() - started})
            finished = [request_id for request_id, done, total in progress if done == total]
            if finished:
                executor.collect(finished)
            outputs, decode_s = executor.ready_results(wait=not executor.active)
        except Exception as exc:  # noqa: BLE001 - a failed step must not take the server down
            logger.error("denoising step failed: %s", "".join(traceback.format_exception(exc)))
            ids = executor.cancel_all()
            if executor.device.type == "cuda":
                torch.cuda.empty_cache()
            self._send({"kind": "failed", "ids": ids, "error": f"denoising failed: {type(exc).__name__}: {exc}"})
            return
        for request_id, output in outputs.items():
            arrays = {"video": None if output.video is None else output.video.numpy(),
                      "actions": None if output.actions is None else output.actions.numpy()}  # fmt: skip
            self._send({"kind": "result", "id": request_id, "decode_s": decode_s[request_id]}, arrays, every_rank=True)

    def _send(self, header: dict[str, Any], arrays: dict[str, Any] | None = None, every_rank: bool = False) -> None:
        """Send an event: the batch's from the first rank only, `every_rank`'s (a rank's own results) from any."""
        if not (every_rank or self.group.is_leader):
            return
        with self._sending:
            if self._socket is not None:
                self._socket.send_multipart(encode_event(header, arrays), copy=False)
