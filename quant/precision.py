"""Per-deployment precision: the engine arguments that select it, for the reasoner and the generator alike.

- `bf16`, `fp16`, `fp32`: the checkpoint's weights in that compute dtype (fp32: CPU tests and debugging);
- `fp8`: an FP8 checkpoint as quantized, or a BF16 checkpoint quantized to FP8 (dynamic, per-tensor) at load;
- `nvfp4`: an NVFP4 checkpoint (its `quantization_config`); BF16 weights cannot be quantized to it at load;
- `auto`: whatever the checkpoint is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8", "nvfp4")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FP4_METHODS = ("modelopt_fp4", "nvfp4", "compressed-tensors")


def checkpoint_quantization(checkpoint: Path) -> str | None:
    """The `quant_method` of the checkpoint's own quantization config, if any."""
    config = json.loads((checkpoint / "config.json").read_text())
    quantization = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    return None if quantization is None else quantization.get("quant_method")


def precision_engine_args(precision: str, checkpoint: Path) -> dict[str, Any]:
    """vLLM engine arguments for `precision`; ValueError (naming the choice) if the checkpoint can't do it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    own = checkpoint_quantization(checkpoint)
    if precision in _DTYPES:
        if own is not None:
            raise ValueError(f"precision {precision}: the checkpoint is quantized ({own}); use --precision auto")
        return {"dtype": _DTYPES[precision]}
    if precision == "fp8":
        return {"dtype": "bfloat16"} if own == "fp8" else {"dtype": "bfloat16", "quantization": "fp8"}
    if precision == "nvfp4":
        if own not in _FP4_METHODS:
            raise ValueError("precision nvfp4 needs an NVFP4 checkpoint (a quantization_config of modelopt_fp4)")
        return {"dtype": "bfloat16"}
    return {"dtype": "auto"}
