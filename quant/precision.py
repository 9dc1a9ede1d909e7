"""Per-deployment precision: the engine arguments that select it, for the reasoner and the generator alike.

- `bf16`, `fp16`, `fp32`: the checkpoint's weights in that compute dtype (fp32: CPU tests and debugging);
- `fp8`: a ModelOpt FP8 checkpoint as calibrated (`cosmos3-serve quantize`), or on a GPU a 16-bit checkpoint
  quantized at load (per-tensor weight scales, dynamic activation scales);
- `nvfp4`: a ModelOpt NVFP4 checkpoint; on a GPU only (Blackwell: W4A4; Hopper: vLLM's weight-only FP4 path,
  W4A16, announced at startup and in `/v1/metadata`);
- `auto`: whatever the checkpoint is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cosmos3_serve.quant.modelopt_format import read_checkpoint_quantization

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8", "nvfp4")
# The generator's attention inputs (`serve --generator-attention`): the towers' 16-bit dtype, or e4m3.
ATTENTION_PRECISIONS = ("bf16", "fp8")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FP4_TENSOR_CORE_CAPABILITY = (10, 0)  # Blackwell


def precision_engine_args(precision: str, checkpoint: Path, on_cpu: bool = False) -> dict[str, Any]:
    """vLLM engine arguments for `precision`; ValueError (naming the choice) if the checkpoint or the platform can't
    do it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    own = read_checkpoint_quantization(checkpoint)
    own_precision = None if own is None else own.precision
    if own is not None and own_precision is None:
        raise ValueError(f"the checkpoint's quantization ({own.method} {own.algo or ''}) is not one this server "
                         "serves: fp8 or nvfp4 ModelOpt checkpoints")  # fmt: skip
    if own_precision == "nvfp4" and on_cpu:
        raise ValueError("precision nvfp4: NVFP4 runs on a CUDA GPU only (vLLM has no CPU kernel for it)")
    if precision in _DTYPES:
        if own is not None:
            raise ValueError(f"precision {precision}: the checkpoint is quantized ({own_precision}); use --precision "
                             f"{own_precision} or auto")  # fmt: skip
        return {"dtype": _DTYPES[precision]}
    if precision == "fp8":
        if own_precision == "fp8":
            return {"dtype": "bfloat16"}
        if own is not None:
            raise ValueError(f"precision fp8: the checkpoint is {own_precision}; use --precision {own_precision}")
        if on_cpu:
            raise ValueError("precision fp8: quantizing a 16-bit checkpoint at load needs a CUDA GPU; on the CPU serve "
                             "an FP8 checkpoint made by `cosmos3-serve quantize CKPT OUT --precision fp8`")  # fmt: skip
        return {"dtype": "bfloat16", "quantization": "fp8"}
    if precision == "nvfp4":
        if own_precision != "nvfp4":
            raise ValueError("precision nvfp4 needs an NVFP4 checkpoint (`cosmos3-serve quantize CKPT OUT --precision "
                             "nvfp4`); 16-bit weights are not quantized to it at load")  # fmt: skip
        return {"dtype": "bfloat16"}
    return {"dtype": "bfloat16"} if own is not None else {"dtype": "auto"}


def nvfp4_kernel(capability: tuple[int, int] | None) -> str:
    """How vLLM runs NVFP4 linears on a GPU of `capability`."""
    if capability is not None and capability >= FP4_TENSOR_CORE_CAPABILITY:
        return "W4A4 (FP4 tensor cores)"
    return "W4A16 (weight-only FP4 Marlin: no FP4 tensor cores on this GPU; activations stay 16-bit)"
