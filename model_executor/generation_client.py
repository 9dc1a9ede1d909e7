"""Drivers of the generator sidecar: build a request's prompts, prefill them once in vLLM, then step it.

A request's prompts (conditional and, with classifier-free guidance, unconditional) go through the reasoner
once, as generation contexts: vLLM prefills them (its prefix cache serves shared system / negative prompts)
and the K/V export connector leaves their K/V in the worker, where `worker_extension` admits them into the
diffusion executor. From then on only the generator runs: one `cosmos3_tick` call per denoising step, which also
admits the requests that arrived and returns those that finished.

`Cosmos3Generator` drives a synchronous `vllm.LLM` (the CLI and tests); the server's asynchronous driver
shares `GenerationPrompts`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.generation import GenerationRequest
from cosmos3_serve.model_executor.generator import GeneratorConfig
from cosmos3_serve.model_executor.worker_extension import request_to_payload, tensor_from_payload
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
    def from_payload(cls, payload: dict) -> GenerationResult:
        return cls(*(None if payload[key] is None else tensor_from_payload(payload[key]) for key in ("video", "actions")))


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


class Cosmos3Generator:
    """Generation on a synchronous `vllm.LLM` built with `worker_extension.generation_engine_args()`."""

    def __init__(self, checkpoint: str | Path, llm) -> None:
        self.llm = llm
        self.tokenizer = AutoTokenizer.from_pretrained(Path(checkpoint) / "text_tokenizer")
        self.config = GeneratorConfig.from_checkpoint(checkpoint)
        self.prompts = GenerationPrompts(self.tokenizer)
        self.prompt_token_counts = PromptTokenCounts()
        [self.info] = llm.collective_rpc("cosmos3_load_generator")[:1]
        self._cancelled: set[str] = set()

    def cancel(self, request_id: str) -> None:
        """Ask for `request_id` to leave the batch before its next step (its K/V and latents are released)."""
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
        their modes, resolutions, frame counts, step counts and CFG. `incoming()`, asked at every step boundary,
        admits new requests into the running batch. Returns a result per id (videos as latents, or uint8 frames
        with `decode`), None when cancelled."""
        admit = self._prefill(requests)
        pending = set(requests)
        results: dict[str, GenerationResult | None] = {}
        while pending:
            arrived = incoming() if incoming is not None else {}
            if arrived:
                admit += self._prefill(arrived)
                pending |= set(arrived)
            cancel = sorted(self._cancelled & pending)
            results.update((request_id, None) for request_id in cancel)
            pending -= set(cancel)
            self._cancelled -= set(results)
            if not pending:
                if cancel:
                    self.llm.collective_rpc("cosmos3_tick", args=([], cancel))
                break
            [tick] = self.llm.collective_rpc("cosmos3_tick", args=(admit, cancel, [], decode))[:1]
            admit = []
            if tick["errors"]:  # all or none: the batch's other requests leave too
                self.llm.collective_rpc("cosmos3_tick", args=([], sorted(pending)))
                raise ValueError("; ".join(tick["errors"].values()))
            for request_id, done, total in tick["progress"]:
                if on_step is not None:
                    on_step(request_id, done, total)
            results.update((i, GenerationResult.from_payload(payload)) for i, payload in tick["results"].items())
            pending -= set(tick["results"])
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

    def _prefill(self, requests: dict[str, GenerationRequest]) -> list[tuple[str, dict[str, Any], list[str]]]:
        """Prefill every request's prompts in one batch as generation contexts: the requests' admission entries for
        `cosmos3_tick`. Invalid requests are refused (ValueError naming the field) before anything runs."""
        from vllm import SamplingParams

        for request in requests.values():
            request.validate(self.config)
        prompts = {request_id: self.prompts.context(request, self.reason(request) if request.reason_first else None)
                   for request_id, request in requests.items()}  # fmt: skip
        keys = {request_id: new_export_keys(len(ids)) for request_id, ids in prompts.items()}
        inputs = [{"prompt_token_ids": ids} for request_prompts in prompts.values() for ids in request_prompts]
        params = [SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(key))
                  for request_keys in keys.values() for key in request_keys]  # fmt: skip
        for output in self.llm.generate(inputs, params, use_tqdm=False):
            self.prompt_token_counts.add(len(output.prompt_token_ids), output.num_cached_tokens or 0)
        return [(request_id, request_to_payload(request), keys[request_id]) for request_id, request in requests.items()]
