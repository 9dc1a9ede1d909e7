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
