"""The generator sidecar's door into vLLM's workers (`worker_extension_cls`).

vLLM mixes `Cosmos3WorkerExtension` into its worker class, so the diffusion executor lives in each worker
process, next to the reasoner's model runner and the K/V export connector: the prompt K/V never leave the
process (or the GPU). Drivers call the methods below through `collective_rpc` (`LLM.collective_rpc`, or the
async engine client's); the engine core runs such calls between its own steps, so reasoner batches and
denoising steps interleave on the device. A driver makes one call per denoising step, `cosmos3_tick`, which also
admits, cancels and returns results: each round trip through the engine core costs milliseconds, as much as a
small step's GPU work. With tensor parallelism every rank runs the same calls on its shard;
rank 0 answers.

Arguments and results cross the engine's message bus, which carries plain data only (no pickling): requests
travel as `request_to_payload` dicts, tensors and arrays as `tensor_to_payload` / `array_to_payload` dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image

from cosmos3_serve.model_executor import kv_export
from cosmos3_serve.model_executor.generation import DEFAULT_MAX_BATCH_TOKENS, DiffusionExecutor, GenerationRequest

WORKER_EXTENSION_CLS = f"{__name__}.Cosmos3WorkerExtension"


def generation_engine_args() -> dict[str, Any]:
    """vLLM engine arguments of a reasoner that feeds the generator: K/V export and this worker extension."""
    return {"kv_transfer_config": kv_export.kv_transfer_config(), "worker_extension_cls": WORKER_EXTENSION_CLS}


def _image_to_payload(image: Image.Image) -> dict[str, Any]:
    rgb = image.convert("RGB")
    return {"width": rgb.width, "height": rgb.height, "rgb": rgb.tobytes()}


def _image_from_payload(payload: dict[str, Any]) -> Image.Image:
    return Image.frombytes("RGB", (payload["width"], payload["height"]), payload["rgb"])


def request_to_payload(request: GenerationRequest) -> dict[str, Any]:
    payload = {field.name: getattr(request, field.name) for field in dataclasses.fields(request)}
    payload["condition_frame_indexes"] = list(request.condition_frame_indexes)
    if request.image is not None:
        payload["image"] = _image_to_payload(request.image)
    if request.video is not None:
        payload["video"] = [_image_to_payload(frame) for frame in request.video]
    if request.actions is not None:
        payload["actions"] = array_to_payload(np.asarray(request.actions))
    return payload


def request_from_payload(payload: dict[str, Any]) -> GenerationRequest:
    fields = dict(payload, condition_frame_indexes=tuple(payload["condition_frame_indexes"]))
    if payload.get("image") is not None:
        fields["image"] = _image_from_payload(payload["image"])
    if payload.get("video") is not None:
        fields["video"] = [_image_from_payload(frame) for frame in payload["video"]]
    if payload.get("actions") is not None:
        fields["actions"] = array_from_payload(payload["actions"])
    return GenerationRequest(**fields)


def array_to_payload(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": array.tobytes()}


def array_from_payload(payload: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(payload["data"], dtype=payload["dtype"]).reshape(payload["shape"]).copy()


def tensor_to_payload(tensor: torch.Tensor) -> dict[str, Any]:
    return array_to_payload(tensor.detach().cpu().numpy())


def tensor_from_payload(payload: dict[str, Any]) -> torch.Tensor:
    return torch.from_numpy(array_from_payload(payload))


class Cosmos3WorkerExtension:
    """RPC surface of the diffusion executor in a vLLM worker (every name is prefixed: vLLM forbids clashes)."""

    def cosmos3_load_generator(self, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                               vae_dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
        """Build the generator tower and VAE (in `vae_dtype`, a torch dtype's name) of the served checkpoint on
        this worker's device (idempotent)."""
        if getattr(self, "cosmos3_executor", None) is None:
            self.cosmos3_executor = DiffusionExecutor(self.vllm_config.model_config.model, self.vllm_config, self.device,
                                                      max_batch_tokens, getattr(torch, vae_dtype))  # fmt: skip
        executor = self.cosmos3_executor
        return {"dtype": str(executor.dtype).removeprefix("torch."), "device": str(executor.device),
                "vae_dtype": str(executor.vae.dtype).removeprefix("torch."),
                "generator_parameters": sum(p.numel() for p in executor.tower.parameters()),
                "max_batch_tokens": executor.max_batch_tokens}  # fmt: skip

    def cosmos3_tick(self, admit: list[tuple[str, dict[str, Any], list[str]]] = (), cancel: list[str] = (),
                     forget: list[str] = (), decode: bool = True) -> dict[str, Any] | None:  # fmt: skip
        """Everything a driver does between two denoising steps, in one call:

        - `forget`: exported prompt K/V that will not be admitted (the request was cancelled during its prefill);
        - `cancel`: requests that leave (in flight or finished); their K/V and latents are released;
        - `admit`: requests `(request id, request payload, export keys of its prompts)`, admitted together (their
          conditioning clips share VAE batches);
        - one denoising step of the next batch (`DiffusionExecutor.next_batch`), returning once the device has
          finished the work before it (one step in flight: the device never waits for the driver's next call);
        - the requests that finished in it are collected: their decode and copies to the host queued behind it;
        - the collected results that have reached the host (all of them when nothing is left to step).

        Returns {"errors": {request id: why it was not admitted}, "progress": [(request id, steps done, total)],
        "results": {request id: {"video": uint8 frames `[T, H, W, 3]` if `decode` (one VAE batch per shape), else
        latents; "actions": `[chunk, raw_action_dim]`}, each a tensor payload or None where its mode makes none},
        "decode_s": {request id: seconds of its VAE decode batch on the device}}.
        """
        executor, store = self.cosmos3_executor, kv_export.PROMPT_KV_STORE
        for key in forget:
            store.discard(key)
        for request_id in cancel:
            executor.cancel(request_id)
        errors = executor.admit([(request_id, request_from_payload(payload), [store.take(key) for key in keys])
                                 for request_id, payload, keys in admit]) if admit else {}  # fmt: skip
        progress = executor.step()
        finished = [request_id for request_id, done, total in progress if done == total]
        if finished:
            executor.collect(finished, decode)
        outputs, decode_s = executor.ready_results(wait=not executor.active)
        if self.rank != 0:
            return None
        results = {request_id: {"video": None if out.video is None else tensor_to_payload(out.video),
                                "actions": None if out.actions is None else tensor_to_payload(out.actions)}
                   for request_id, out in outputs.items()}  # fmt: skip
        return {"errors": errors, "progress": progress, "results": results, "decode_s": decode_s}
