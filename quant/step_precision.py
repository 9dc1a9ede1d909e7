"""16-bit activations for chosen denoising steps of an FP8 generator (W8A16 instead of W8A8).

The first and last steps of a schedule are the most sensitive to activation rounding: at the first the latents are
pure noise, at the last small velocity errors land in the output unscaled. A deployment (or the checkpoint's
`runtime.diffusion_step_policy`) names how many of each run with 16-bit activations: each FP8 linear of the tower
then multiplies the activations by its weight dequantized on the fly (no second copy of the weights). The switch is
per forward: a packed batch runs in one mode (`DiffusionExecutor.next_batch` groups requests by it).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from cosmos3_serve.quant.modelopt_format import StepPolicy, read_checkpoint_quantization
from torch import nn


class StepPrecisionLinearMethod:
    """A vLLM FP8 linear method, and its 16-bit-activation twin while `switch.activation_16bit` holds."""

    def __init__(self, base, switch: ActivationSwitch, weight_in_out: bool) -> None:
        self.base = base
        self.switch = switch
        self.weight_in_out = weight_in_out  # the loaded weight is [in, out] (vLLM transposes it for its kernels)

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.switch.activation_16bit:
            return self.base.apply(layer, x, bias)
        weight = layer.weight.to(x.dtype) * layer.weight_scale.to(x.dtype)
        return F.linear(x, weight.t() if self.weight_in_out else weight, bias)


class ActivationSwitch:
    """Whether the tower's FP8 linears run with 16-bit activations in the next forward."""

    def __init__(self, policy: StepPolicy) -> None:
        self.policy = policy
        self.activation_16bit = False

    def high_precision(self, step_index: int, num_steps: int) -> bool:
        return self.policy.high_precision(step_index, num_steps)


def deployment_policy(checkpoint: str | Path, a16_steps: int | None) -> StepPolicy:
    """The first and last `a16_steps` steps at 16-bit activations; None: the checkpoint's own step policy."""
    if a16_steps is not None:
        return StepPolicy(a16_steps, a16_steps)
    quantization = read_checkpoint_quantization(Path(checkpoint))
    return StepPolicy() if quantization is None else quantization.policy


def install(tower: nn.Module, policy: StepPolicy, dtype: torch.dtype) -> ActivationSwitch | None:
    """Wrap every per-tensor FP8 linear of the loaded `tower` (after `process_weights_after_loading`; activations
    in `dtype`) so that it follows the returned switch; None when the policy has no 16-bit step or the tower no FP8
    linear."""
    from cosmos3_serve.model_executor.patches import replace_linear_method
    from vllm.model_executor.layers.linear import LinearBase

    if policy.first_steps == 0 and policy.last_steps == 0:
        return None
    switch = ActivationSwitch(policy)
    layers = [layer for layer in tower.modules() if isinstance(layer, LinearBase)
              and getattr(layer, "weight", None) is not None and layer.weight.dtype == torch.float8_e4m3fn]  # fmt: skip
    for layer in layers:
        if layer.weight_scale.numel() != 1:
            raise ValueError("16-bit activation steps need per-tensor FP8 weight scales (a ModelOpt FP8 checkpoint)")
        method = StepPrecisionLinearMethod(layer.quant_method, switch, _weight_in_out(layer, dtype))
        replace_linear_method(layer, method)
    return switch if layers else None


@torch.no_grad()
def _weight_in_out(layer: nn.Module, dtype: torch.dtype) -> bool:
    """Whether vLLM keeps `layer`'s FP8 weight as [in, out]: found by running its own kernel once on a probe input
    and comparing with both orientations (a square weight has both shapes)."""
    weight = layer.weight
    if weight.shape[0] != weight.shape[1]:
        return weight.shape[0] == layer.input_size_per_partition
    probe = torch.randn(4, weight.shape[0], device=weight.device, dtype=dtype)
    reference = layer.quant_method.apply(layer, probe).float()
    dense = weight.float() * layer.weight_scale.float()
    as_in_out = (reference - probe.float() @ dense).norm()
    as_out_in = (reference - probe.float() @ dense.t()).norm()
    return bool(as_in_out < as_out_in)
