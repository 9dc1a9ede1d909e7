"""What crosses between the drivers and the generator loop: requests and commands as plain data (vLLM's RPC bus
carries no pickles), and the loop's events as ZeroMQ multipart messages (a JSON header, then one raw frame per
array, so a video's frames cross without being encoded).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from PIL import Image

from cosmos3_serve.model_executor.request import GenerationRequest


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


@dataclasses.dataclass
class Commands:
    """What a driver asks of the generator loop, applied together at a step boundary, in this order:

    - `forget`: export keys of prompt K/V that will never be admitted (a job cancelled or failed while its prompts
      were prefilled);
    - `cancel`: requests that leave (in flight or finished): their K/V, latents and results are released;
    - `admit`: `(request id, request payload, export keys of its prompts, decode)`, admitted together (their
      conditioning clips share VAE batches); `decode`: return uint8 frames, else the latents.
    """

    admit: list[tuple[str, dict[str, Any], list[str], bool]] = dataclasses.field(default_factory=list)
    cancel: list[str] = dataclasses.field(default_factory=list)
    forget: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.admit or self.cancel or self.forget)

    def to_payload(self) -> dict[str, Any]:
        return {"admit": [list(entry) for entry in self.admit], "cancel": self.cancel, "forget": self.forget}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Commands:
        return cls([tuple(entry) for entry in payload["admit"]], list(payload["cancel"]), list(payload["forget"]))


def encode_event(header: dict[str, Any], arrays: dict[str, np.ndarray | None] | None = None) -> list[Any]:
    """A multipart message: the JSON `header` (with each array's dtype and shape under "arrays"), then the arrays'
    bytes, zero-copy."""
    frames, described = [], {}
    for name, array in (arrays or {}).items():
        if array is not None:
            array = np.ascontiguousarray(array)
            described[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "frame": len(frames) + 1}
            frames.append(memoryview(array).cast("B"))
    return [json.dumps({**header, "arrays": described}).encode(), *frames]


def decode_event(frames: list[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) of a message made by `encode_event`; the arrays view the received frames."""
    header = json.loads(bytes(frames[0]))
    arrays = {name: np.frombuffer(frames[spec["frame"]], dtype=spec["dtype"]).reshape(spec["shape"])
              for name, spec in header.pop("arrays").items()}  # fmt: skip
    return header, arrays
