"""Post-training calibration of both towers with NVIDIA ModelOpt: the diffusers reference pipeline generates from the
calibration prompts (every denoising step, both CFG branches), and ModelOpt's quantizers record the largest
magnitude of every quantized linear's input and weight meanwhile (`max` calibration)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cosmos3_serve.quant.modelopt_format import EXCLUDED_MODULES, FUSED_GROUPS
from tqdm import tqdm

DEFAULT_PROMPTS = (
    "A robot arm picks up a red cube from a wooden table and places it in a blue bowl.",
    "A car drives along a wet city street at night, neon signs reflecting on the asphalt.",
    "Close-up of a chef slicing vegetables on a cutting board, steam rising from a pot.",
    "A drone flies over a forest in autumn, the camera slowly tilting towards a river.",
)


@dataclass(frozen=True)
class CalibrationShape:
    """The output the calibration prompts generate at (frames = 1: an image)."""

    width: int = 832
    height: int = 480
    num_frames: int = 33

    @classmethod
    def parse(cls, text: str) -> CalibrationShape:
        """`WIDTHxHEIGHTxFRAMES` or `WIDTHxHEIGHT` (an image)."""
        parts = [int(part) for part in text.lower().split("x")]
        if len(parts) not in (2, 3):
            raise ValueError(f"calibration shape must be WIDTHxHEIGHT[xFRAMES], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else 1)


def modelopt_config(precision: str) -> dict[str, Any]:
    """ModelOpt's default FP8 / NVFP4 configuration with the released checkpoints' 16-bit modules disabled."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG if precision == "fp8" else mtq.NVFP4_DEFAULT_CFG)
    config["algorithm"] = "max"
    for pattern in EXCLUDED_MODULES:
        config["quant_cfg"].append({"quantizer_name": f"*{pattern.rstrip('*')}*", "enable": False})
    return config


def calibrate(pipeline, precision: str, prompts: Sequence[str], num_steps: int, shape: CalibrationShape,
              guidance_scale: float = 6.0, seed: int = 0, progress: bool = True) -> torch.nn.Module:  # fmt: skip
    """Insert ModelOpt's quantizers into `pipeline.transformer` (both towers) and calibrate them on `prompts`, each
    generated over `num_steps` denoising steps at `shape`. Returns the transformer, its quantizers calibrated and
    the members of each fused group (q/k/v, gate/up) given their group's largest weight and input range."""
    import modelopt.torch.quantization as mtq

    pipeline.set_progress_bar_config(disable=True)
    with tqdm(total=len(prompts) * num_steps, desc=f"calibrating {precision}", unit="step",
              disable=not progress) as bar:  # fmt: skip

        def on_step_end(_pipeline, _step, _timestep, callback_kwargs):
            bar.update(1)
            return callback_kwargs

        def forward_loop(_transformer) -> None:
            for i, prompt in enumerate(prompts):
                pipeline(prompt=prompt, num_frames=shape.num_frames, height=shape.height, width=shape.width,
                         num_inference_steps=num_steps, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(seed + i), output_type="latent",
                         callback_on_step_end=on_step_end, enable_safety_check=False)  # fmt: skip

        with torch.no_grad():
            transformer = mtq.quantize(pipeline.transformer, modelopt_config(precision), forward_loop)
    share_fused_ranges(transformer)
    return transformer


def share_fused_ranges(transformer: torch.nn.Module) -> None:
    """Each fused group's members get the group's largest weight and input amax: one scale per fused vLLM layer."""
    modules = dict(transformer.named_modules())
    for name, module in modules.items():
        for group in FUSED_GROUPS:
            if not name.endswith("." + group[0]):
                continue
            prefix = name[: -len(group[0])]
            members = [modules[prefix + member] for member in group]
            for quantizer in ("weight_quantizer", "input_quantizer"):
                amaxes = [getattr(m, quantizer).amax for m in members]
                if any(amax is None for amax in amaxes):
                    continue
                shared = torch.stack([amax.float().max() for amax in amaxes]).max()
                for member in members:
                    getattr(member, quantizer).amax = shared.reshape(()).clone()
