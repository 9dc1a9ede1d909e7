"""The batch-1 decode attention kernel (`model_executor/decode_attention.py`) on CPU, under Triton's interpreter.

Against independent math: q / k RMSNorm and mRoPE by vLLM's `MRotaryEmbedding.forward_native`, attention by torch's
SDPA over the keys and values gathered from the cache through the block table, in float64 (float32 tensors
within float32 rounding, float16 within a few float16 roundings). The tiny checkpoint's attention shape (6 query
heads over 2 KV heads: a group of 3, not a power of two), both cache layouts, a block table of shuffled blocks,
lengths from 1 key to several loop steps per program; the token's K and V land in its slot and nowhere else.
The GPU run in bf16, its CUDA-graph replay and its time against FA3: tests/gpu/test_decode_attention_gpu.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.test_decode_kernels import EPS, assert_close, rms_norm_reference
from tests.triton_interpreter import run_interpreted

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, SECTION = 6, 2, 64, 16, [12, 10, 10]
NUM_BLOCKS = 24
SEQ_LENS = (1, 16, 17, 100, 300)


def test_decode_attention_under_triton_interpreter() -> None:
    run_interpreted(__name__, "run_interpreted_checks")


def test_vllm_splits_compiled_graphs_at_our_attention_op() -> None:
    """Once our plugin is loaded (vLLM loads it before building any config), a default config splits at
    `cosmos3_attention` next to vLLM's own attention ops, and the reasoner routes attention through the op only
    where the graph splits there: not with a config that lists its own splitting ops without it."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode

    from cosmos3_serve.model_executor import decode_attention, plugin

    plugin.register()
    default = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    default.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    assert plugin.ATTENTION_OP in default.splitting_ops
    assert "vllm::unified_attention_with_output" in default.splitting_ops
    assert decode_attention.graph_splits_at_attention(default)
    own = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, splitting_ops=["vllm::unified_attention_with_output"])
    assert not decode_attention.graph_splits_at_attention(own)
    assert decode_attention.graph_splits_at_attention(CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                                                        splitting_ops=[]))  # fmt: skip  # no pieces


def run_interpreted_checks() -> None:
    from cosmos3_serve.model_executor import decode_attention

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for layout in ("HND", "NHD"):
            for seq_len in SEQ_LENS:
                check_decode_attention(decode_attention, dtype, layout, seq_len)
    decode_attention.SPLITS, decode_attention.TILE = 4, 16  # several loop steps per program (300 keys: 5 of 16)
    check_decode_attention(decode_attention, torch.float32, "HND", 300)
    check_decode_attention(decode_attention, torch.float16, "NHD", 300)


def rope_module(interleaved: bool):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    rope_parameters = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": SECTION,
                       "mrope_interleaved": interleaved}  # fmt: skip
    with set_current_vllm_config(VllmConfig()):
        return get_rope(HEAD_DIM, max_position=1024, is_neox_style=True, rope_parameters=rope_parameters,
                        dtype=torch.float32)  # fmt: skip


def empty_cache(layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A NaN cache, logically [NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM], in `layout`'s memory order."""
    if layout == "HND":
        return torch.full((NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM), float("nan"), dtype=dtype)
    return torch.full((NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM), float("nan"), dtype=dtype).transpose(1, 2)


def check_decode_attention(decode_attention, dtype: torch.dtype, layout: str, seq_len: int) -> None:
    case = f"{dtype} {layout} seq_len={seq_len} SPLITS={decode_attention.SPLITS} TILE={decode_attention.TILE}"
    interleaved = seq_len % 2 == 0
    rope = rope_module(interleaved)
    qkv = torch.randn(1, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=dtype)
    q_norm, k_norm = torch.randn(HEAD_DIM, dtype=dtype), torch.randn(HEAD_DIM, dtype=dtype)
    positions = torch.randint(0, 1024, (3, 1))
    block_table = torch.randperm(NUM_BLOCKS)[None].int()  # request 0's blocks, shuffled
    cache = empty_cache(layout, dtype)
    blocks, offsets = block_table[0, torch.arange(seq_len) // BLOCK_SIZE].long(), torch.arange(seq_len) % BLOCK_SIZE
    cache[blocks[:-1], :, offsets[:-1]] = torch.randn(seq_len - 1, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=dtype)
    slot = blocks[-1] * BLOCK_SIZE + offsets[-1]
    before = cache.clone()

    args = decode_attention.RopeArgs(q_norm, k_norm, EPS, rope.cos_sin_cache.to(dtype), SECTION, interleaved)
    out = decode_attention.decode_attention(
        qkv, positions, args, cache, slot.view(1), block_table, torch.tensor([seq_len], dtype=torch.int32),
        HEAD_DIM**-0.5, NUM_HEADS, NUM_KV_HEADS,
    )  # fmt: skip

    q, k, v = qkv.double().split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
    q = rms_norm_reference(q.view(NUM_HEADS, HEAD_DIM), q_norm).view(1, -1).float()
    k = rms_norm_reference(k.view(NUM_KV_HEADS, HEAD_DIM), k_norm).view(1, -1).float()
    q, k = rope.forward_native(positions, q, k)
    new_kv = torch.cat([k.view(NUM_KV_HEADS, HEAD_DIM), v.view(NUM_KV_HEADS, HEAD_DIM)], dim=-1)
    assert_close(cache[blocks[-1], :, offsets[-1]], new_kv, dtype, case + " (written K / V)")
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[blocks[-1], :, offsets[-1]] = True
    assert torch.equal(cache[~written].isnan(), before[~written].isnan()), case + ": wrote outside the token's slot"

    kv = cache[blocks, :, offsets].transpose(0, 1).double()  # [NUM_KV_HEADS, seq_len, 2 * HEAD_DIM]
    query = q.to(dtype).double().view(NUM_HEADS, 1, HEAD_DIM)
    expected = F.scaled_dot_product_attention(query, kv[..., :HEAD_DIM], kv[..., HEAD_DIM:], scale=HEAD_DIM**-0.5,
                                              enable_gqa=True)  # fmt: skip
    assert out.shape == (1, NUM_HEADS * HEAD_DIM) and out.dtype == dtype, case
    assert_close(out, expected.view(1, -1), dtype, case)
