"""The driver's half of the generator protocol, free of I/O: one implementation for the synchronous
`Cosmos3Generator` (CLI, tests) and the asynchronous `GenerationService` (the HTTP server).

A request goes through: waiting (for the state budget) -> prefilling (its prompts through vLLM, exported under
keys) -> admitting (an `admit` command sent) -> admitted (denoising) -> finished. `DriverCore` keeps what each
request holds, turns what the drivers report (prefilled, prefill failed, cancelled) into the loop's `Commands`,
and the loop's events into `Update`s. Whatever ends a request (its result, a failure or a cancel, in any phase)
releases its exported K/V in the worker and its share of the state budget here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosmos3_serve.model_executor.wire import Commands


class Stage(str, enum.Enum):
    PREFILLING = "prefilling"
    ADMITTING = "admitting"
    ADMITTED = "admitted"
    CANCELLED = "cancelled"  # while prefilling: its keys are forgotten once the prefill ends


@dataclass
class Update:
    """What an event of the loop means for one request."""

    request_id: str
    kind: str  # "admitted", "progress", "result", "failed"
    steps_done: int = 0
    steps_total: int = 0
    step_s: float = 0.0  # the step's host seconds (progress)
    video: np.ndarray | None = None  # uint8 frames [T, H, W, 3] or latents (result)
    actions: np.ndarray | None = None
    decode_s: float = 0.0
    error: str | None = None


@dataclass
class DriverCore:
    state_budget_bytes: int  # bytes the requests between their prefill and their result may hold on the device
    held: dict[str, int] = field(default_factory=dict)  # request id -> bytes it holds (`RequestCost.state_bytes`)
    stages: dict[str, Stage] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)  # request id -> export keys of its prompts
    commands: Commands = field(default_factory=Commands)

    @property
    def held_bytes(self) -> int:
        return sum(self.held.values())

    def fits(self, state_bytes: int) -> bool:
        """Whether a request holding `state_bytes` may start its prefill now (always when nothing is held)."""
        return not self.held or self.held_bytes + state_bytes <= self.state_budget_bytes

    def start_prefill(self, request_id: str, keys: list[str], state_bytes: int) -> None:
        self.held[request_id], self.keys[request_id] = state_bytes, keys
        self.stages[request_id] = Stage.PREFILLING

    def prefilled(self, request_id: str, request_payload: dict[str, Any], decode: bool) -> None:
        """Its prompts are exported: admit it, or forget its K/V if it was cancelled meanwhile."""
        if self.stages.get(request_id) is Stage.PREFILLING:
            self.commands.admit.append((request_id, request_payload, self.keys[request_id], decode))
            self.stages[request_id] = Stage.ADMITTING
        else:
            self._release(request_id, forget=True)

    def prefill_failed(self, request_id: str) -> None:
        """Some of its prompts may be exported: forget them all."""
        self._release(request_id, forget=True)

    def cancel(self, request_id: str) -> None:
        """Drop a request in any phase (unknown ids are ignored)."""
        stage = self.stages.get(request_id)
        if stage is Stage.PREFILLING:
            self.stages[request_id] = Stage.CANCELLED
        elif any(entry[0] == request_id for entry in self.commands.admit):  # its admission is not sent yet
            self.commands.admit = [entry for entry in self.commands.admit if entry[0] != request_id]
            self._release(request_id, forget=True)
        elif stage in (Stage.ADMITTING, Stage.ADMITTED):
            self.commands.cancel.append(request_id)
            self._release(request_id, forget=False)

    def take_commands(self) -> Commands | None:
        commands, self.commands = self.commands, Commands()
        return commands if commands else None

    def apply(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[Update]:
        """The updates an event of the loop (`generator_loop`) makes, for requests this driver still follows."""
        kind = header["kind"]
        if kind == "admitted":
            updates = [Update(i, "admitted") for i in header["ids"] if self._advance(i, Stage.ADMITTED)]
            return updates + self._fail(header["errors"].items())
        if kind == "progress":
            return [Update(i, "progress", done, total, step_s=header["seconds"])
                    for i, done, total in header["steps"] if self.stages.get(i) is Stage.ADMITTED]  # fmt: skip
        if kind == "result":
            if self.stages.get(header["id"]) is not Stage.ADMITTED:
                return []
            self._release(header["id"], forget=False)
            return [Update(header["id"], "result", video=arrays.get("video"), actions=arrays.get("actions"),
                           decode_s=header["decode_s"])]  # fmt: skip
        if kind == "failed":
            return self._fail((i, header["error"]) for i in header["ids"])
        if kind == "fatal":
            following = [i for i, stage in self.stages.items() if stage in (Stage.ADMITTING, Stage.ADMITTED)]
            return self._fail((i, f"the generator stopped: {header['error']}") for i in following)
        raise ValueError(f"unknown generator event {kind!r}")

    def _advance(self, request_id: str, stage: Stage) -> bool:
        if request_id not in self.stages or self.stages[request_id] is Stage.CANCELLED:
            return False
        self.stages[request_id] = stage
        return True

    def _fail(self, errors) -> list[Update]:
        updates = []
        for request_id, error in errors:
            if request_id in self.stages:
                self._release(request_id, forget=False)
                updates.append(Update(request_id, "failed", error=error))
        return updates

    def _release(self, request_id: str, forget: bool) -> None:
        keys = self.keys.pop(request_id, [])
        if forget:
            self.commands.forget.extend(keys)
        self.held.pop(request_id, None)
        self.stages.pop(request_id, None)
