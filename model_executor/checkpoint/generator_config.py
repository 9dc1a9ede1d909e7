"""What both towers need to know of the checkpoint's generator: its keys and `transformer/config.json`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch


# Keys of `transformer/` that belong to the generator only (the reasoner drops them, the generator loads them).
GENERATOR_ONLY_SUBSTRINGS = (
    "_moe_gen",
    ".add_q_proj.",
    ".add_k_proj.",
    ".add_v_proj.",
    ".to_add_out.",
    ".norm_added_q.",
    ".norm_added_k.",
    ".k_norm_und_for_gen.",
    # ModelOpt's own dialect of quantizer state; vLLM reads weight_scale / input_scale instead.
    ".input_quantizer.",
    ".weight_quantizer.",
    ".output_quantizer.",
)
GENERATOR_ONLY_PREFIXES = (
    "proj_in.",
    "proj_out.",
    "time_embedder.",
    "audio_proj_in.",
    "audio_proj_out.",
    "action_proj_in.",
    "action_proj_out.",
    "action_modality_embed",  # single tensors, no dot
    "audio_modality_embed",
)


def is_generator_key(key: str) -> bool:
    return key.startswith(GENERATOR_ONLY_PREFIXES) or any(s in key for s in GENERATOR_ONLY_SUBSTRINGS)


def checkpoint_file(model: str, relpath: str) -> Path:
    """A file of a checkpoint given as a local directory or a hub id (read from the local hub cache)."""
    if Path(model).is_dir():
        local = Path(model) / relpath
        if not local.is_file():
            raise FileNotFoundError(local)
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, relpath))


def mrope_section(transformer_config: dict) -> tuple[int, int, int]:
    """Rotary frequencies per position axis (T, H, W) of `transformer/config.json`."""
    rope_scaling = transformer_config.get("rope_scaling") or {}
    return tuple(transformer_config.get("rope_axes_dim") or rope_scaling.get("mrope_section", [24, 20, 20]))


def transformer_tensors(model: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `transformer/` whose keys are `wanted` (one safetensors file, or shards with an index)."""
    from safetensors import safe_open

    try:
        index = checkpoint_file(model, "transformer/diffusion_pytorch_model.safetensors.index.json")
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (FileNotFoundError, OSError):
        files = ["diffusion_pytorch_model.safetensors"]
    for file in files:
        with safe_open(checkpoint_file(model, f"transformer/{file}"), "pt") as f:
            for key in f.keys():
                if wanted(key):
                    yield key, f.get_tensor(key)


@dataclass(frozen=True)
class KeyNorms:
    """How keys are normalised on each path (diffusers `Cosmos3PackedMoTAttention`).

    `qk_norm_for_text`: the reasoner applies per-head RMS norms to its queries and keys (Qwen3 towers do).
    `und_k_norm_for_gen`: the generator's queries see the reasoner's keys through one more per-head RMS norm
    (`k_norm_und_for_gen`, applied before RoPE); only when `use_und_k_norm_for_gen` and not `qk_norm_for_text`.
    """

    qk_norm_for_text: bool = True
    und_k_norm_for_gen: bool = False

    @classmethod
    def of_checkpoint(cls, model: str) -> KeyNorms:
        config = json.loads(checkpoint_file(model, "transformer/config.json").read_text())
        qk_norm_for_text = config.get("qk_norm_for_text", True)
        return cls(
            qk_norm_for_text=qk_norm_for_text,
            und_k_norm_for_gen=config.get("use_und_k_norm_for_gen", False) and not qk_norm_for_text,
        )


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator's fields of `transformer/config.json`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_axes_dim: tuple[int, int, int]
    patch_latent_dim: int
    latent_channel: int
    latent_patch_size: int
    timestep_scale: float
    attention_bias: bool
    base_fps: float
    enable_fps_modulation: bool
    unified_3d_mrope_reset_spatial_ids: bool
    unified_3d_mrope_temporal_modality_margin: int
    action_dim: int | None  # width of the action head; None without one
    num_embodiment_domains: int

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> GeneratorConfig:
        raw = json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())
        if raw.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"generator MLP activation {raw['hidden_act']!r} is not supported yet")
        return cls(
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=raw["head_dim"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 5e6),
            rope_axes_dim=mrope_section(raw),
            patch_latent_dim=raw["patch_latent_dim"],
            latent_channel=raw["latent_channel"],
            latent_patch_size=raw["latent_patch_size"],
            timestep_scale=raw.get("timestep_scale", 0.001),
            attention_bias=raw.get("attention_bias", False),
            base_fps=float(raw.get("base_fps", 24)),
            enable_fps_modulation=raw.get("enable_fps_modulation", True),
            unified_3d_mrope_reset_spatial_ids=raw.get("unified_3d_mrope_reset_spatial_ids", True),
            unified_3d_mrope_temporal_modality_margin=raw.get("unified_3d_mrope_temporal_modality_margin", 15000),
            action_dim=raw["action_dim"] if raw.get("action_gen", False) else None,
            num_embodiment_domains=raw.get("num_embodiment_domains", 32),
        )
