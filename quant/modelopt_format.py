"""The on-disk ModelOpt format of a quantized Cosmos 3 checkpoint, in the released unified layout.

    transformer/config.json       `quantization_config` (quant_method "modelopt", quant_algo, ignore, the step policy)
    transformer/*.safetensors     per quantized linear of both towers, under its diffusers key `X`:
                                    FP8:   X.weight float8_e4m3fn [out, in], X.weight_scale, X.input_scale (fp32, 0-d)
                                    NVFP4: X.weight uint8 [out, in / 2] (two e2m1 per byte, the even element low),
                                           X.weight_scale float8_e4m3fn [out, in / 16], X.weight_scale_2 and
                                           X.input_scale (fp32, 0-d)
    config.json                   the same `quantization_config` without the step policy (read by vLLM)
    hf_quant_config.json          ModelOpt's own summary (producer, quant_algo, exclude_modules)

Both towers' projections and MLPs are quantized; the embedders, the small projections of the generator (patches in
and out, time, action, audio), the LM head and the vision encoder stay 16-bit, as in the released checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

FP8_MAX = 448.0  # float8_e4m3fn
FP4_MAX = 6.0  # e2m1
NVFP4_GROUP_SIZE = 16
QUANT_ALGOS = {"fp8": "FP8", "nvfp4": "NVFP4"}
EXCLUDED_MODULES = ("proj_in", "proj_out", "time_embedder*", "audio_proj_in", "audio_proj_out", "action_proj_in",
                    "action_proj_out", "lm_head", "model.visual*", "visual*")  # fmt: skip
# Linears one fused vLLM layer holds (q/k/v, gate/up): one weight scale (FP8) or global scale (NVFP4) for all, so
# that loading them fused needs no requantization.
FUSED_GROUPS = (
    ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v"),
    ("self_attn.add_q_proj", "self_attn.add_k_proj", "self_attn.add_v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj"),
)
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")


@dataclass(frozen=True)
class StepPolicy:
    """The first and last `count` denoising steps at 16-bit activations (W8A16 / W4A16), the others at the
    checkpoint's own (W8A8 / W4A4)."""

    first_steps: int = 0
    last_steps: int = 0

    def high_precision(self, step_index: int, num_steps: int) -> bool:
        return step_index < self.first_steps or step_index >= num_steps - self.last_steps

    def to_json(self) -> dict[str, Any]:
        """The released checkpoints' `runtime.diffusion_step_policy`."""
        return {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
                "scope": ["transformer"], "default_mode": "native",
                "first_steps": {"count": self.first_steps, "mode": "a16"},
                "last_steps": {"count": self.last_steps, "mode": "a16"},
                "overlap": "a16", "reasoner": "a16"}  # fmt: skip

    @classmethod
    def from_json(cls, policy: dict[str, Any] | None) -> StepPolicy:
        if not policy:
            return cls()
        return cls(first_steps=int(policy.get("first_steps", {}).get("count", 0)),
                   last_steps=int(policy.get("last_steps", {}).get("count", 0)))  # fmt: skip


def is_excluded(module_name: str) -> bool:
    """Whether the linear `module_name` (a diffusers key without `.weight`) stays 16-bit."""
    return any(fnmatch(module_name, pattern) or fnmatch(module_name, f"*.{pattern}") for pattern in EXCLUDED_MODULES)


def fused_group(module_name: str) -> str | None:
    """The name shared by the members of `module_name`'s fused group (its first member), or None."""
    for group in FUSED_GROUPS:
        for member in group:
            if module_name.endswith("." + member):
                return module_name[: -len(member)] + group[0]
    return None


def quantization_config(precision: str, producer_version: str, policy: StepPolicy | None = None) -> dict[str, Any]:
    """The `quantization_config` of `transformer/config.json` (with `policy`) and of the root `config.json`."""
    bits = 8 if precision == "fp8" else 4
    tensor = {"dynamic": False, "num_bits": bits, "type": "float"}
    if precision == "nvfp4":
        tensor["group_size"] = NVFP4_GROUP_SIZE
    config: dict[str, Any] = {
        "config_groups": {"group_0": {"input_activations": dict(tensor), "weights": dict(tensor),
                                      "targets": ["Linear"]}},  # fmt: skip
        "ignore": list(EXCLUDED_MODULES),
        "quant_algo": QUANT_ALGOS[precision],
        "producer": {"name": "modelopt", "version": producer_version},
        "quant_method": "modelopt",
    }
    if precision == "nvfp4":
        config["group_size"] = NVFP4_GROUP_SIZE
    if policy is not None:
        config["runtime"] = {"diffusion_step_policy": policy.to_json()}
    return config


def hf_quant_config(precision: str, producer_version: str) -> dict[str, Any]:
    """ModelOpt's `hf_quant_config.json`."""
    quantization: dict[str, Any] = {"quant_algo": QUANT_ALGOS[precision], "kv_cache_quant_algo": None,
                                    "exclude_modules": list(EXCLUDED_MODULES)}  # fmt: skip
    if precision == "nvfp4":
        quantization["group_size"] = NVFP4_GROUP_SIZE
    return {"producer": {"name": "modelopt", "version": producer_version}, "quantization": quantization}


@dataclass(frozen=True)
class CheckpointQuantization:
    """What a checkpoint's own quantization is: `method` ("modelopt", "fp8", ...), ModelOpt's `algo` ("FP8",
    "NVFP4", ...) and its denoising step `policy`."""

    method: str
    algo: str | None = None
    policy: StepPolicy = StepPolicy()

    @property
    def precision(self) -> str | None:
        """"fp8", "nvfp4" or None (a method this server does not name)."""
        algo = (self.algo or "").upper()
        if self.method in ("fp8",) or (self.method == "modelopt" and algo.startswith("FP8")):
            return "fp8"
        if self.method == "modelopt_fp4" or "FP4" in algo:
            return "nvfp4"
        return None


def read_checkpoint_quantization(checkpoint: Path) -> CheckpointQuantization | None:
    """The checkpoint's quantization: from `config.json`, else `hf_quant_config.json` (as vLLM reads them), with the
    step policy of `transformer/config.json`; None for a 16-bit checkpoint."""
    config = json.loads((checkpoint / "config.json").read_text())
    quantization = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    summary = checkpoint / "hf_quant_config.json"
    if quantization is None and summary.exists():
        legacy = json.loads(summary.read_text()).get("quantization", {})
        quantization = {"quant_method": "modelopt", "quant_algo": legacy.get("quant_algo")}
    if quantization is None:
        return None
    transformer_config = checkpoint / "transformer" / "config.json"
    runtime = {}
    if transformer_config.exists():
        own = json.loads(transformer_config.read_text()).get("quantization_config") or {}
        runtime = own.get("runtime", {})
    return CheckpointQuantization(method=str(quantization.get("quant_method", "")),
                                  algo=quantization.get("quant_algo"),
                                  policy=StepPolicy.from_json(runtime.get("diffusion_step_policy")))  # fmt: skip
