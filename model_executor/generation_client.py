"""Drivers of the generator sidecar: build a request's prompts, prefill them once in vLLM, then let the generator
loop denoise it.

A request's prompts (conditional and, with classifier-free guidance, unconditional) go through the reasoner
once, as generation contexts: vLLM prefills them (its prefix cache serves shared system / negative prompts)
and the K/V export connector leaves their K/V in the worker, where the generator loop admits them
(`generator_loop`). From then on only the generator runs, on its own thread: the driver sends commands
(`cosmos3_submit`) and reads the loop's events (`EventChannel`), through `DriverCore`.

`Cosmos3Generator` drives a synchronous `vllm.LLM` (the CLI and tests); the server's asynchronous driver
(`server.generation_service`) shares `GenerationPrompts` and `DriverCore`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.admission import GenerationLimits, LatentGeometry, RequestCost
from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig
from cosmos3_serve.model_executor.event_channel import EventChannel
from cosmos3_serve.model_executor.generation_driver import DriverCore
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.wire import request_to_payload
from cosmos3_serve.sampling.prompts import (
    action_cfg_token_ids,
    augment,
    cfg_token_ids,
    chat_token_ids,
    start_of_generation,
)

StepCallback = Callable[[str, int, int], None]  # (request id, steps done, steps in total)


@dataclass
class GenerationResult:
    """What a request produced, None where its mode produces nothing: the video (normalised latents
    `[1, z_dim, T, H/16, W/16]`, or uint8 frames `[T, H, W, 3]` when decoded) and the actions
    `[chunk, raw_action_dim]` (policy, inverse dynamics)."""

    video: torch.Tensor | None
    actions: torch.Tensor | None

    @classmethod
    def from_arrays(cls, video: np.ndarray | None, actions: np.ndarray | None) -> GenerationResult:
        return cls(*(None if array is None else torch.from_numpy(array.copy()) for array in (video, actions)))


@dataclass
class PromptTokenCounts:
    """Prompt tokens prefilled for generation, and how many of them vLLM's prefix cache served."""

    total: int = 0
    cached: int = 0

    def add(self, total: int, cached: int) -> None:
        self.total += total
        self.cached += cached


class GenerationPrompts:
    """Token ids of a request's prompts, exactly as the reference pipeline builds them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def context(self, request: GenerationRequest, reasoning: list[int] | None = None) -> list[list[int]]:
        """[conditional] or [conditional, unconditional]; `reasoning` (the reasoner's answer) extends the first."""
        if request.action_mode is not None:
            cond, uncond = action_cfg_token_ids(self.tokenizer, request.prompt, request.negative_prompt, request.spec,
                                                request.action_view_point)  # fmt: skip
        else:
            cond, uncond = cfg_token_ids(self.tokenizer, request.prompt, request.negative_prompt, request.spec)
        if reasoning is not None:
            cond = self.reasoning_chat(request) + reasoning + start_of_generation(self.tokenizer)
        return [cond, uncond] if request.uses_cfg else [cond]

    def reasoning_chat(self, request: GenerationRequest) -> list[int]:
        """The conditional chat that the reasoner answers first in reason-then-generate."""
        return chat_token_ids(self.tokenizer, augment(request.prompt, request.spec), request.spec)

    def answer(self, token_ids: list[int]) -> list[int]:
        return [token for token in token_ids if token != self.tokenizer.eos_token_id]


def new_export_keys(count: int) -> list[str]:
    return [f"cosmos3-gen-{uuid.uuid4().hex}" for _ in range(count)]


EVENT_WAIT_S = 600.0  # without any event for this long, the generator is taken for gone


class Cosmos3Generator:
    """Generation on a synchronous `vllm.LLM` built with `engine_args.generation_engine_args(...)`."""

    def __init__(self, checkpoint: str | Path, llm) -> None:
        self.llm = llm
        self.tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint) / "text_tokenizer")
        self.config = GeneratorConfig.from_checkpoint(checkpoint)
        self.geometry = LatentGeometry.from_checkpoint(checkpoint)
        self.prompts = GenerationPrompts(self.tokenizer)
        self.prompt_token_counts = PromptTokenCounts()
        self.events = EventChannel()
        [self.info] = llm.collective_rpc("cosmos3_start_generator", args=(self.events.address,))[:1]
        self.limits = GenerationLimits(**{**self.info["limits"], "max_shape": tuple(self.info["limits"]["max_shape"])})
        self.core = DriverCore(self.limits.state_budget_bytes)
        self._cancelled: set[str] = set()

    def cancel(self, request_id: str) -> None:
        """Ask for `request_id` to leave the batch at the loop's next step (its K/V and latents are released)."""
        self._cancelled.add(request_id)

    @torch.no_grad()
    def generate_latents(self, request: GenerationRequest) -> torch.Tensor:
        """Normalised latents `[1, z_dim, T, H/16, W/16]` of one request, as the reference pipeline returns them."""
        [result] = self.generate({"single": request}).values()
        return result.video

    def generate(
        self,
        requests: dict[str, GenerationRequest],
        on_step: StepCallback | None = None,
        incoming: Callable[[], dict[str, GenerationRequest]] | None = None,
        decode: bool = False,
    ) -> dict[str, GenerationResult | None]:
        """Denoise `requests` together: every step is one packed forward over all requests in flight, whatever
        their modes, resolutions, frame counts, step counts and CFG. `incoming()`, asked after every event,
        admits new requests into the running batch. Returns a result per id (videos as latents, or uint8 frames
        with `decode`), None when cancelled. A request refused or failed by the generator raises ValueError (the
        others are cancelled)."""
        plans = {request_id: self._plan(request) for request_id, request in requests.items()}
        waiting, pending = dict(requests), set(requests)
        results: dict[str, GenerationResult | None] = {}
        while pending:
            arrived = incoming() if incoming is not None else {}
            plans.update({request_id: self._plan(request) for request_id, request in arrived.items()})
            waiting.update(arrived)
            pending |= set(arrived)
            self._prefill(waiting, plans, decode)
            for request_id in self._cancelled & pending:
                self.core.cancel(request_id)
                waiting.pop(request_id, None)
                results[request_id] = None
            pending -= set(results)
            self._cancelled -= set(results)
            self._flush()
            if not pending:
                break
            event = self.events.recv(EVENT_WAIT_S)
            if event is None:
                raise RuntimeError(f"no event from the generator in {EVENT_WAIT_S:.0f} s")
            for update in self.core.apply(*event):
                if update.kind == "progress" and on_step is not None:
                    on_step(update.request_id, update.steps_done, update.steps_total)
                elif update.kind == "result":
                    results[update.request_id] = GenerationResult.from_arrays(update.video, update.actions)
                    pending.discard(update.request_id)
                elif update.kind == "failed":
                    for request_id in pending - {update.request_id}:
                        self.core.cancel(request_id)
                    self._flush()
                    raise ValueError(update.error)
        return results

    def reason(self, request: GenerationRequest) -> list[int]:
        """Reason-then-generate: the reasoner's greedy answer to the conditional chat (EOS dropped).

        The answer's K/V stay in vLLM's prefix cache, so exporting chat + answer recomputes at most the last,
        partial KV block and the two tokens that open the generation."""
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(temperature=0.0, max_tokens=request.reasoning_max_tokens, stop_token_ids=[eos])
        [output] = self.llm.generate({"prompt_token_ids": self.prompts.reasoning_chat(request)}, params,
                                     use_tqdm=False)  # fmt: skip
        return self.prompts.answer(list(output.outputs[0].token_ids))

    def _prefill(self, waiting: dict[str, GenerationRequest], plans: dict[str, tuple[list[list[int]], int]],
                 decode: bool) -> None:  # fmt: skip
        """Prefill the prompts of the waiting requests that fit the state budget (in arrival order), in one batch, as
        generation contexts, and queue their admissions. `plans`: each request's `_plan`, made once on arrival."""
        from vllm import SamplingParams

        prompts, keys = {}, {}
        for request_id in waiting:
            ids, state_bytes = plans[request_id]
            if not self.core.fits(state_bytes):
                break
            prompts[request_id], keys[request_id] = ids, new_export_keys(len(ids))
            self.core.start_prefill(request_id, keys[request_id], state_bytes)
        if not prompts:
            return
        inputs = [{"prompt_token_ids": ids} for request_prompts in prompts.values() for ids in request_prompts]
        params = [SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(key))
                  for request_keys in keys.values() for key in request_keys]  # fmt: skip
        for output in self.llm.generate(inputs, params, use_tqdm=False):
            self.prompt_token_counts.add(len(output.prompt_token_ids), output.num_cached_tokens or 0)
        for request_id in prompts:
            self.core.prefilled(request_id, request_to_payload(waiting.pop(request_id)), decode)

    def _plan(self, request: GenerationRequest) -> tuple[list[list[int]], int]:
        """(its prompts' token ids, the bytes it will hold on the device); ValueError naming the field when it is
        invalid or can never run on this deployment (before anything of the call runs, for the requests given)."""
        request.validate(self.config)
        cost = RequestCost.of(request, self.geometry)
        refusal = self.limits.refusal(request, cost)
        if refusal is None:
            ids = self.prompts.context(request, self.reason(request) if request.reason_first else None)
            state_bytes = cost.state_bytes(sum(map(len, ids)), self.limits.kv_bytes_per_token)
            refusal = self.limits.prompt_refusal([len(i) for i in ids], state_bytes)
        if refusal is not None:
            raise ValueError(f"{refusal[0]}: {refusal[1]}")
        return ids, state_bytes

    def _flush(self) -> None:
        commands = self.core.take_commands()
        if commands is not None:
            self.llm.collective_rpc("cosmos3_submit", args=(commands.to_payload(),))
