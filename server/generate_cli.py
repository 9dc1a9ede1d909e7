"""`cosmos3-serve generate`: one generation on this machine, with a progress bar.

The reasoner (vLLM, with the K/V export connector) runs in this process, so the generator finds the exported
prompt K/V in the same process (single GPU or CPU; the server spreads the towers over tensor-parallel ranks).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


@dataclass(frozen=True)
class GenerateOptions:
    checkpoint: Path
    prompt: str
    out: Path
    negative_prompt: str | None = None
    num_frames: int = 1
    height: int = 720
    width: int = 1280
    fps: float = 24.0
    steps: int = 35
    guidance_scale: float = 6.0
    seed: int = 0
    image: str | None = None
    dtype: str = "bfloat16"
    device: str | None = None


def validate(options: GenerateOptions) -> str | None:
    """A message naming the bad option, or None."""
    if options.num_frames < 1 or (options.num_frames - 1) % 4:
        return f"--num-frames must be 4k + 1 (1, 5, 9, ...), got {options.num_frames}"
    if options.height % 16 or options.width % 16 or options.height <= 0 or options.width <= 0:
        return f"--height and --width must be positive multiples of 16, got {options.height}x{options.width}"
    if options.out.suffix.lower() not in (".png", ".mp4"):
        return f"--out must end in .png or .mp4, got {options.out.name}"
    if options.num_frames > 1 and options.out.suffix.lower() != ".mp4":
        return "--out must be an .mp4 file for a video (--num-frames > 1)"
    if options.steps < 1:
        return f"--steps must be >= 1, got {options.steps}"
    return None


def generate(options: GenerateOptions) -> int:
    error = validate(options)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's worker lives in this process
    import torch
    from PIL import Image
    from vllm import LLM

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.generation import Cosmos3Generator, GenerationRequest
    from cosmos3_serve.server.encoding import mp4_bytes, png_bytes

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, options.dtype)
    llm = LLM(str(options.checkpoint), dtype=options.dtype, max_model_len=8192, gpu_memory_utilization=0.3,
              kv_transfer_config=kv_export.kv_transfer_config(), enforce_eager=device == "cpu")  # fmt: skip
    generator = Cosmos3Generator(options.checkpoint, llm, dtype=dtype, device=device)
    request = GenerationRequest(
        options.prompt, options.negative_prompt, num_frames=options.num_frames, height=options.height,
        width=options.width, fps=options.fps, num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale, seed=options.seed,
        image=Image.open(options.image).convert("RGB") if options.image else None,
    )  # fmt: skip
    with tqdm(total=options.steps, desc="denoising", unit="step") as bar:
        results = generator.generate({"cli": request}, on_step=lambda _id, done, _total: bar.update(1))
    frames = generator.decode(results["cli"]).cpu().numpy()
    data = png_bytes(frames[0]) if options.num_frames == 1 else mp4_bytes(frames, options.fps)
    options.out.write_bytes(data)
    print(f"wrote {options.out} ({len(data)} bytes)")
    return 0
