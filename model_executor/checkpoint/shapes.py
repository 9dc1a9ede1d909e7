"""Dimensions of the Cosmos 3 checkpoints: the real Nano and Super, a tiny one for tests and a small one for
quality benchmarks on the CPU.

Both towers of the Mixture-of-Transformers share one shape (the generator's `add_*_proj` and `mlp_moe_gen`
mirror the reasoner's attention and MLP), so one `TowerShape` describes the text layers of both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TowerShape:
    """Text layers of one tower (Qwen3-shaped)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]  # (T, H, W) rotary frequencies; sums to head_dim // 2
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class VisionShape:
    """Qwen3-VL vision encoder (used by the reasoner only)."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    deepstack_visual_indexes: tuple[int, ...]
    num_position_embeddings: int = 2304
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2


@dataclass(frozen=True)
class VaeShape:
    """Wan2.2-style `AutoencoderKLWan`: 16x spatial, 4x temporal, 48 latent channels."""

    base_dim: int
    decoder_base_dim: int
    num_res_blocks: int
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    scale_factor_spatial: int = 16
    scale_factor_temporal: int = 4


@dataclass(frozen=True)
class ProcessorShape:
    """Pixel budgets of the reasoner's image and video processors."""

    image_min_pixels: int
    image_max_pixels: int
    video_min_pixels: int
    video_max_pixels: int


@dataclass(frozen=True)
class CheckpointShape:
    tower: TowerShape
    vision: VisionShape
    vae: VaeShape
    processor: ProcessorShape
    action_dim: int
    num_embodiment_domains: int


_REAL_PROCESSOR = ProcessorShape(
    image_min_pixels=65_536, image_max_pixels=16_777_216, video_min_pixels=4_096, video_max_pixels=25_165_824
)
_REAL_VAE = VaeShape(base_dim=160, decoder_base_dim=256, num_res_blocks=2)
_QWEN3_VL_VISION = VisionShape(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, deepstack_visual_indexes=(8, 16, 24)
)

# The random-weight checkpoints' vision encoder, VAE and pixel budgets: small enough for seconds on two cores.
_SMALL_VISION = VisionShape(depth=2, hidden_size=128, intermediate_size=256, num_heads=2, deepstack_visual_indexes=(1,))
_SMALL_VAE = VaeShape(base_dim=16, decoder_base_dim=16, num_res_blocks=1)
_SMALL_PROCESSOR = ProcessorShape(
    image_min_pixels=32 * 32, image_max_pixels=128 * 128, video_min_pixels=32 * 32, video_max_pixels=32 * 64 * 64
)

# The tests' checkpoint. Head dims of 64 keep vLLM's CPU attention (needs head_dim >= 32) and real mRoPE
# interleaving.
_TINY = CheckpointShape(
    tower=TowerShape(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mrope_section=(12, 10, 10),
    ),
    vision=_SMALL_VISION,
    vae=_SMALL_VAE,
    processor=_SMALL_PROCESSOR,
    action_dim=8,  # pusht (2 wide) fits; its domain id is 4
    num_embodiment_domains=32,
)

SHAPES: dict[str, CheckpointShape] = {
    "tiny": _TINY,
    # Four key / value heads: enough for tests that shard heads over four ranks (tower shards x Ulysses ranks).
    "tiny-kv4": replace(_TINY, tower=replace(_TINY.tower, num_key_value_heads=4)),
    # Nano's head layout on a narrower, shallower tower: the largest random stand-in the CPU machine runs in
    # seconds per step (quality benchmarks of quantized checkpoints).
    "small": CheckpointShape(
        tower=TowerShape(
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            mrope_section=(24, 20, 20),
        ),
        vision=_SMALL_VISION,
        vae=_SMALL_VAE,
        processor=_SMALL_PROCESSOR,
        action_dim=32,
        num_embodiment_domains=32,
    ),
    "nano": CheckpointShape(
        tower=TowerShape(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=(24, 20, 20),
        ),
        vision=_QWEN3_VL_VISION,
        vae=_REAL_VAE,
        processor=_REAL_PROCESSOR,
        action_dim=32,
        num_embodiment_domains=32,
    ),
    "super": CheckpointShape(
        tower=TowerShape(
            hidden_size=5120,
            intermediate_size=25600,
            num_hidden_layers=64,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            mrope_section=(24, 20, 20),
        ),
        vision=_QWEN3_VL_VISION,
        vae=_REAL_VAE,
        processor=_REAL_PROCESSOR,
        action_dim=32,
        num_embodiment_domains=32,
    ),
}
