"""What precision a loaded tower runs at and what its weights take, for `/v1/metadata`."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

_WEIGHT_PRECISIONS = {torch.float8_e4m3fn: "fp8", torch.uint8: "nvfp4"}


def describe_tower(tower: nn.Module) -> dict[str, Any]:
    """The tower's linear layers by precision of their stored weights ("fp8", "nvfp4", or the 16/32-bit dtype) and
    by vLLM linear method, and the bytes of all its parameters and buffers (GiB)."""
    from vllm.model_executor.layers.linear import LinearBase

    precisions: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    for layer in tower.modules():
        if isinstance(layer, LinearBase):
            weight = getattr(layer, "weight", None)
            dtype = None if weight is None else weight.dtype
            precisions[_WEIGHT_PRECISIONS.get(dtype, str(dtype).removeprefix("torch."))] += 1
            methods[type(getattr(layer.quant_method, "base", layer.quant_method)).__name__] += 1
    tensors = [*tower.parameters(), *tower.buffers()]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"linear_layers": dict(precisions), "linear_methods": dict(methods),
            "weights_gib": round(weight_bytes / 2**30, 3)}  # fmt: skip
