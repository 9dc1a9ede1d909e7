"""`cosmos3-serve generate`: one generation on this machine, with a progress bar.

The reasoner (vLLM, with the K/V export connector) and the generator sidecar (in vLLM's worker) run in this
process, on the engine's device: the GPU when there is one, else the CPU build of vLLM. Images are written as PNG,
videos as MP4, actions (policy, inverse dynamics) as `.npy` or JSON (a list of `[raw_action_dim]` rows).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.sampling.schedulers import invalid_schedule, load_scheduler
from cosmos3_serve.sampling.actions import INVERSE_DYNAMICS, POLICY

ACTION_SUFFIXES = (".npy", ".json")


@dataclass(frozen=True)
class GenerateOptions:
    checkpoint: Path
    out: Path  # the image or video; the actions in inverse dynamics, which makes no video
    request: GenerationRequest
    dtype: str = "bfloat16"
    actions_out: Path | None = None  # policy's actions; default: `out` with the suffix .npy

    @property
    def actions_path(self) -> Path | None:
        """Where the request's actions go, if its mode makes any."""
        if self.request.action_mode == INVERSE_DYNAMICS:
            return self.out
        if self.request.action_mode == POLICY:
            return self.actions_out or self.out.with_suffix(".npy")
        return None


def invalid_option(options: GenerateOptions) -> str | None:
    """A message naming the bad command-line option, or None."""
    invalid = options.request.invalid_field() or invalid_schedule(load_scheduler(options.checkpoint), options.request)
    if invalid is not None:
        return option_message(*invalid)
    request, suffix = options.request, options.out.suffix.lower()
    if request.action_mode == INVERSE_DYNAMICS:
        if suffix not in ACTION_SUFFIXES:
            return f"--out must end in .npy or .json for inverse_dynamics (it makes actions), got {options.out.name}"
    elif suffix not in (".png", ".mp4"):
        return f"--out must end in .png or .mp4, got {options.out.name}"
    elif (request.num_frames > 1 or request.action_mode is not None) and suffix != ".mp4":
        return "--out must be an .mp4 file for a video (--num-frames > 1, or an action mode)"
    if options.actions_out is not None:
        if request.action_mode != POLICY:
            return "--actions-out is for --action-mode policy (the other modes write one file: --out)"
        if options.actions_out.suffix.lower() not in ACTION_SUFFIXES:
            return f"--actions-out must end in .npy or .json, got {options.actions_out.name}"
    return None


def option_message(field: str, message: str) -> str:
    """A request field's message, naming its command-line option."""
    return f"--{field.replace('_', '-')} {message}"


def read_actions(path: Path) -> np.ndarray:
    """Actions `[T, D]` from a .npy file or a JSON list of rows."""
    if path.suffix.lower() == ".json":
        return np.asarray(json.loads(path.read_text()), dtype=np.float32)
    if path.suffix.lower() == ".npy":
        return np.load(path).astype(np.float32)
    raise ValueError(f"--actions must be a .npy or .json file, got {path.name}")


def read_video(path: Path) -> list[Image.Image]:
    """The RGB frames of a video file."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def write_actions(path: Path, actions_td: np.ndarray) -> None:
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(actions_td.tolist()))
    else:
        np.save(path, actions_td)


def generate(options: GenerateOptions) -> int:
    error = invalid_option(options)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's worker lives in this process
    import torch
    from vllm import LLM

    from cosmos3_serve.model_executor.generation_client import Cosmos3Generator
    from cosmos3_serve.model_executor.engine_args import generation_engine_args
    from cosmos3_serve.server import deployment
    from cosmos3_serve.server.encoding import mp4_bytes, png_bytes

    gpu = torch.cuda.is_available()
    request = options.request
    largest = (request.width, request.height, request.num_frames) if request.action_mode is None else None
    memory = {} if gpu else {"kv_cache_memory_bytes": deployment.cpu_kv_cache_bytes()}
    llm = LLM(str(options.checkpoint), dtype=options.dtype, max_model_len=8192, enforce_eager=not gpu, **memory,
              **generation_engine_args(deployment.generator_settings(largest, gpu=gpu)))  # fmt: skip
    generator = Cosmos3Generator(options.checkpoint, llm)
    unfit = request.unfit_field(generator.config)  # what this checkpoint cannot serve (its action head)
    if unfit is not None:
        print(f"error: {option_message(*unfit)}", file=sys.stderr)
        return 2
    with tqdm(total=request.num_inference_steps, desc="denoising", unit="step") as bar:
        results = generator.generate({"cli": request}, on_step=lambda _id, done, _total: bar.update(1), decode=True)
    result = results["cli"]
    if result.video is not None:
        frames = result.video.numpy()
        data = png_bytes(frames[0]) if options.out.suffix.lower() == ".png" else mp4_bytes(frames, request.fps)
        options.out.write_bytes(data)
        print(f"wrote {options.out} ({len(data)} bytes)")
    if result.actions is not None:
        write_actions(options.actions_path, result.actions.numpy())
        print(f"wrote {options.actions_path} ({result.actions.shape[0]} actions of {result.actions.shape[1]})")
    return 0
