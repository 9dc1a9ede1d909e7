"""Write a random-weight Cosmos 3 checkpoint in the released unified (Diffusers) layout.

    OUT/
      model_index.json                      Cosmos3OmniDiffusersPipeline components
      config.json, generation_config.json   transformers Cosmos3OmniConfig (read by vLLM and transformers)
      tokenizer files, chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json
      transformer/                          diffusers Cosmos3OmniTransformer, flat keys (both towers)
      vision_encoder/                       transformers Qwen3VLVisionModel, flat keys
      vae/                                  diffusers AutoencoderKLWan (Wan2.2: z_dim 48, 16x / 4x)
      scheduler/                            UniPCMultistepScheduler with flow sigmas
      text_tokenizer/                       Qwen2 tokenizer with the chat template (read by diffusers)

The module structure (every key and shape) comes from the libraries' own classes, instantiated on the meta
device; only the values are ours. Each tensor is drawn from a generator seeded by (seed, key), so a checkpoint
is a pure function of its arguments. `weights=False` writes configs and tokenizer only (Nano / Super shapes for
dummy-weight benchmarks).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cosmos3_serve.model_executor.checkpoint.shapes import SHAPES, CheckpointShape
from cosmos3_serve.model_executor.checkpoint.tokenizer import VocabKind, build_tokenizer, chat_template, embedding_rows

PIPELINE_CLASS_NAME = "Cosmos3OmniDiffusersPipeline"
REASONER_ARCHITECTURE = "Cosmos3ForConditionalGeneration"
FLOW_SHIFT = 10.0
RANDOM_WEIGHT_SHAPES = ("tiny", "tiny-kv4", "small")


def write_checkpoint(
    out: str | Path,
    *,
    shape: str = "tiny",
    vocab: VocabKind = "compact",
    seed: int = 0,
    action: bool = False,
    und_k_norm_for_gen: bool = False,
    distilled: bool = False,
    weights: bool | None = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint to `out` and return its path. `weights` defaults to True for the random-weight shapes
    (`RANDOM_WEIGHT_SHAPES`) only.

    `und_k_norm_for_gen` writes the attention variant without query / key norms in which the generator
    re-normalises the reasoner's keys (`qk_norm_for_text=False`, `use_und_k_norm_for_gen=True`); `distilled`
    the few-step variant's flow-matching Euler scheduler instead of UniPC."""
    from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    dims = SHAPES[shape]
    write_weights = shape in RANDOM_WEIGHT_SHAPES if weights is None else weights
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(vocab)
    vocab_rows = embedding_rows(tokenizer)
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    dtype = "float32" if shape.startswith("tiny") else "bfloat16"

    reasoner_config = _reasoner_config(dims, tokenizer, vocab_rows, dtype)
    transformer_kwargs = _transformer_kwargs(dims, vocab_rows, action, dtype)
    if und_k_norm_for_gen:
        transformer_kwargs.update(qk_norm_for_text=False, use_und_k_norm_for_gen=True)
    vae_kwargs = _vae_kwargs(dims, seed)
    with torch.device("meta"):
        transformer = Cosmos3OmniTransformer(**transformer_kwargs)
        vae = AutoencoderKLWan(**vae_kwargs)
        vision = _vision_model(reasoner_config)

    _write_tokenizer_and_processors(out, tokenizer, dims)
    reasoner_config.save_pretrained(out)
    _write_generation_config(out, special_ids)
    _write_scheduler(out / "scheduler", distilled)
    transformer.save_config(out / "transformer")
    vae.save_config(out / "vae")
    (out / "vision_encoder").mkdir(exist_ok=True)
    reasoner_config.vision_config.save_pretrained(out / "vision_encoder")
    _write_model_index(out, distilled)

    if write_weights:
        parts = {
            "transformer/diffusion_pytorch_model.safetensors": transformer.state_dict(),
            "vision_encoder/model.safetensors": vision.state_dict(),
            "vae/diffusion_pytorch_model.safetensors": vae.state_dict(),
        }
        total = sum(len(sd) for sd in parts.values())
        with tqdm(total=total, desc=f"writing {shape} weights", unit="tensor", disable=not progress) as bar:
            for relpath, meta_state in parts.items():
                tensors = dict(_random_tensors(meta_state, seed, bar))
                save_file(tensors, out / relpath, metadata={"format": "pt"})
    return out


def _reasoner_config(dims: CheckpointShape, tokenizer, vocab_rows: int, dtype: str):
    from transformers import Cosmos3OmniConfig

    t, v = dims.tower, dims.vision
    ids = tokenizer.convert_tokens_to_ids
    config = Cosmos3OmniConfig(
        text_config={
            "model_type": "qwen3_vl_text",
            "vocab_size": vocab_rows,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 262_144,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_interleaved": True,
                "mrope_section": list(t.mrope_section),
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "dtype": dtype,
        },
        vision_config={
            "model_type": "qwen3_vl",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": 3,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "out_hidden_size": t.hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "hidden_act": "gelu_pytorch_tanh",
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.architectures = [REASONER_ARCHITECTURE]
    config.dtype = dtype
    return config


def _vision_model(reasoner_config):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLVisionModel._from_config(reasoner_config.vision_config)


def _transformer_kwargs(dims: CheckpointShape, vocab_rows: int, action: bool, dtype: str) -> dict:
    t = dims.tower
    kwargs = {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_axes_dim": list(t.mrope_section),
        "vocab_size": vocab_rows,
        "latent_channel": dims.vae.z_dim,
        "latent_patch_size": dims.vae.patch_size,
        "patch_latent_dim": dims.vae.z_dim * dims.vae.patch_size**2,
        "dtype": dtype,
    }
    if action:
        kwargs.update(
            action_gen=True, action_dim=dims.action_dim, num_embodiment_domains=dims.num_embodiment_domains
        )
    return kwargs


def _vae_kwargs(dims: CheckpointShape, seed: int) -> dict:
    vae = asdict(dims.vae)
    channels = 3 * vae["patch_size"] ** 2
    # Latent statistics are checkpoint data, not dimensions: seeded stand-ins keep the normalisation non-trivial.
    gen = torch.Generator().manual_seed(seed ^ 0x5EED)
    latents_mean = (0.5 * torch.randn(vae["z_dim"], generator=gen)).tolist()
    latents_std = (0.5 + 1.5 * torch.rand(vae["z_dim"], generator=gen)).tolist()
    return {
        **vae,
        "dim_mult": list(vae["dim_mult"]),
        "temperal_downsample": list(vae["temperal_downsample"]),
        "attn_scales": [],
        "is_residual": True,
        "in_channels": channels,
        "out_channels": channels,
        "latents_mean": [round(x, 4) for x in latents_mean],
        "latents_std": [round(x, 4) for x in latents_std],
    }


def _random_tensors(meta_state: dict[str, torch.Tensor], seed: int, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic values per key: norm scales near 1, small biases, fan-in scaled matrices."""
    for key, meta in meta_state.items():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        values = torch.randn(meta.shape, generator=gen, dtype=torch.float32)
        leaf = key.rsplit(".", 2)
        if meta.ndim == 1 and any("norm" in part for part in leaf[:-1]) and leaf[-1] in ("weight", "gamma"):
            values = 1.0 + 0.1 * values
        elif meta.ndim <= 1:
            values = 0.02 * values
        else:
            values = values / math.sqrt(math.prod(meta.shape[1:]))
        yield key, values.to(meta.dtype if meta.dtype.is_floating_point else torch.float32).contiguous()
        bar.update(1)


def _write_tokenizer_and_processors(out: Path, tokenizer, dims: CheckpointShape) -> None:
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    v, p = dims.vision, dims.processor
    image_processor = Qwen2VLImageProcessor(
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
        size={"shortest_edge": p.image_min_pixels, "longest_edge": p.image_max_pixels},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
        size={"shortest_edge": p.video_min_pixels, "longest_edge": p.video_max_pixels},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template(),
    )
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json
    video_processor.save_pretrained(out)  # video_preprocessor_config.json
    tokenizer.save_pretrained(out / "text_tokenizer")


def _write_generation_config(out: Path, special_ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        pad_token_id=special_ids["<|endoftext|>"],
    ).save_pretrained(out)


def _write_scheduler(directory: Path, distilled: bool) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if distilled:
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT).save_config(directory)
        return
    UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    ).save_config(directory)


def _write_model_index(out: Path, distilled: bool) -> None:
    import diffusers

    index = {
        "_class_name": PIPELINE_CLASS_NAME,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler" if distilled else "UniPCMultistepScheduler"],
        "text_tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Cosmos3OmniTransformer"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "vision_encoder": ["transformers", "Qwen3VLVisionModel"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
