"""`cosmos3-serve generate`: one generation on this machine, with a progress bar.

The reasoner (vLLM, with the K/V export connector) and the generator sidecar (in vLLM's worker) run in this
process, on the engine's device: the GPU when there is one, else the CPU build of vLLM.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cosmos3_serve.model_executor.generation import GenerationRequest


@dataclass(frozen=True)
class GenerateOptions:
    checkpoint: Path
    out: Path
    request: GenerationRequest
    dtype: str = "bfloat16"


def invalid_option(options: GenerateOptions) -> str | None:
    """A message naming the bad command-line option, or None."""
    invalid = options.request.invalid_field()
    if invalid is not None:
        field, message = invalid
        return f"--{field.replace('_', '-')} {message}"
    if options.out.suffix.lower() not in (".png", ".mp4"):
        return f"--out must end in .png or .mp4, got {options.out.name}"
    if options.request.num_frames > 1 and options.out.suffix.lower() != ".mp4":
        return "--out must be an .mp4 file for a video (--num-frames > 1)"
    return None


def generate(options: GenerateOptions) -> int:
    error = invalid_option(options)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's worker lives in this process
    import torch
    from vllm import LLM

    from cosmos3_serve.model_executor.generation_client import Cosmos3Generator
    from cosmos3_serve.model_executor.worker_extension import generation_engine_args
    from cosmos3_serve.server.encoding import mp4_bytes, png_bytes

    llm = LLM(str(options.checkpoint), dtype=options.dtype, max_model_len=8192, gpu_memory_utilization=0.3,
              enforce_eager=not torch.cuda.is_available(), **generation_engine_args())  # fmt: skip
    generator = Cosmos3Generator(options.checkpoint, llm)
    request = options.request
    with tqdm(total=request.num_inference_steps, desc="denoising", unit="step") as bar:
        results = generator.generate({"cli": request}, on_step=lambda _id, done, _total: bar.update(1), decode=True)
    frames = results["cli"].numpy()
    data = png_bytes(frames[0]) if request.num_frames == 1 else mp4_bytes(frames, request.fps)
    options.out.write_bytes(data)
    print(f"wrote {options.out} ({len(data)} bytes)")
    return 0
