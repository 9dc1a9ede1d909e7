"""Batch-1 decode attention in one Triton kernel: q / k RMSNorm + mRoPE, the K/V-cache write and attention.

At M = 1 vLLM's path after the qkv GEMV is four kernels per layer: q / k norm + mRoPE (ours), the K/V-cache write,
FA3's split-KV attention and its combine, 2-8 us each on an H200 and all bound by latency (docs/benchmarks.md).
`decode_attention` launches one kernel for all of it. Program (kv_head, split) normalizes and rotates the token's
GQA group of query heads and its key head from the raw qkv row (as `decode_kernels.qk_norm_mrope` does), program
(kv_head, 0) writes the key and value into the token's cache slot, and every program attends the group to its
range of cache blocks, the token's own key and value taken from registers rather than from the slot being
written. Scores and the weighted values run on the tensor cores (`tl.dot`, the group padded to 16 rows); each
program stores its partial softmax state and takes a ticket, and the kv head's last program merges them.

The cache is vLLM's FLASH_ATTN one: logical `[num_blocks, num_kv_heads, block_size, 2 * head_dim]` (K in
`[..., :head_dim]`, V in `[..., head_dim:]`), any order of the first three dimensions, hence strides.

`cosmos3_attention` is the decoder layer's whole step from the qkv row to the attention output, a vLLM custom op
that finds its attention layer, cache and metadata in vLLM's forward context: `decode_attention` for one token
of plain causal FLASH_ATTN attention with an unquantized cache, otherwise `qk_norm_mrope` and the layer's own
forward (vLLM's K/V-cache write and FA3). The op hides attention from torch.compile, so it is one of vLLM's
splitting ops (the plugin registers it): piecewise CUDA graphs must not capture FA3 at M > 1.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
from torch import nn
from vllm.config import CompilationConfig
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.triton_utils import tl, triton
from vllm.utils.torch_utils import direct_register_custom_op, is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType

from cosmos3_serve.model_executor import vllm_compat
from cosmos3_serve.model_executor.decode_kernels import (
    HALF_DTYPES,
    mrope_cos_sin,
    norm_rope,
    programmatic_launch,
    qk_norm_mrope,
)
from cosmos3_serve.model_executor.kv_export import Cosmos3KVExportConnector
from cosmos3_serve.model_executor.plugin import ATTENTION_OP, DECODE_ATTENTION

# Launch configuration, read at each launch (bench/decode_attention.py times others).
SPLITS = 32  # programs per kv head
TILE = 32  # keys per loop step (up to 1024 cached tokens: one step per program)
NUM_WARPS = 4
MIN_DOT_ROWS = 16  # tl.dot's smallest M: the group's query heads are padded to it


@triton.jit
def _load_tile(
    head_cache_ptr, block_table_ptr, tile_start, end, last, block_size, stride_block, stride_slot,
    TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Positions tile_start + [0, TILE) and their cached keys (halves [TILE, HEAD_DIM / 2]) and values
    [TILE, HEAD_DIM]: those below min(end, last), zero from there (the token's own slot, `last`, is being written
    by this launch: never read)."""
    half, dims = tl.arange(0, HEAD_DIM // 2), tl.arange(0, HEAD_DIM)
    positions = tile_start + tl.arange(0, TILE)
    cached = positions < tl.minimum(end, last)
    blocks = tl.load(block_table_ptr + positions // block_size, mask=cached, other=0).to(tl.int64)
    slots = head_cache_ptr + (blocks * stride_block + (positions % block_size) * stride_slot)[:, None]
    key1 = tl.load(slots + half[None, :], mask=cached[:, None], other=0.0)
    key2 = tl.load(slots + HEAD_DIM // 2 + half[None, :], mask=cached[:, None], other=0.0)
    value = tl.load(slots + HEAD_DIM + dims[None, :], mask=cached[:, None], other=0.0)
    return positions, key1, key2, value


@triton.jit
def _attend_tile(m, l, acc, q1, q2, k1, k2, v, positions, key1, key2, value, end, last, score_scale):
    """Online softmax over one tile: running max score m and sum l [BLOCK_G], weighted values acc
    [BLOCK_G, HEAD_DIM], the token's own key (k1, k2) and value v put in at position `last`, positions >= end
    masked."""
    own = (positions == last)[:, None]
    key1, key2, value = tl.where(own, k1, key1), tl.where(own, k2, key2), tl.where(own, v[None, :], value)
    scores = (tl.dot(q1, tl.trans(key1)) + tl.dot(q2, tl.trans(key2))) * score_scale  # [BLOCK_G, TILE]
    scores = tl.where((positions < end)[None, :], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(value.dtype), value)


@triton.jit(do_not_specialize=["stride_positions"])  # compiled at load with other strides than vLLM's buffer
def _decode_attention_kernel(
    qkv_ptr, q_norm_ptr, k_norm_ptr, cos_sin_ptr, positions_ptr, cache_ptr, slot_mapping_ptr, block_table_ptr,
    seq_lens_ptr, out_ptr, partial_out_ptr, partial_stats_ptr, counters_ptr,
    stride_positions, stride_cos_sin, stride_block, stride_head, stride_slot, block_size, eps, scale,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_PARTS: tl.constexpr, HEAD_DIM: tl.constexpr, SECTION_T: tl.constexpr, SECTION_H: tl.constexpr,
    SECTION_W: tl.constexpr, INTERLEAVED: tl.constexpr, RMS_NORM: tl.constexpr, SPLITS: tl.constexpr,
    TILE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (kv_head, split). qkv row [NUM_Q_HEADS + 2 * NUM_KV_HEADS heads of HEAD_DIM]; the token is at
    position seq_len - 1 of request 0 (seq_len = seq_lens[0]) and goes to cache slot slot_mapping[0] (< 0: none).
    Scores are in log2 units (scaled by scale * log2(e)). Query rows g < GROUP of the [BLOCK_G, .] tiles are heads
    kv_head * GROUP + g, the rest zero. The first tile's cache loads are issued before the token's norms and
    rotation, so that the two chains of dependent loads (block table -> cache; positions -> cos / sin) overlap.
    PDL (a programmatic dependent launch): the next kernel may launch once every program here has started, and
    all that does not depend on the kernel before (the qkv GEMV) is loaded before waiting for it: lengths, block
    table, the first tile of cached keys and values (written by earlier steps), positions and cos / sin."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    kv_head, split = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr)
    last = seq_len - 1  # the token's own position
    num_blocks = tl.cdiv(seq_len, block_size)
    blocks_per_split = tl.maximum(tl.cdiv(num_blocks, SPLITS), 1)
    start = split * blocks_per_split * block_size
    end = tl.minimum(start + blocks_per_split * block_size, seq_len)
    head_cache_ptr = cache_ptr + kv_head.to(tl.int64) * stride_head
    positions, key1, key2, value = _load_tile(head_cache_ptr, block_table_ptr, start, end, last, block_size,
                                              stride_block, stride_slot, TILE, HEAD_DIM)  # fmt: skip

    g, half, dims = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM // 2), tl.arange(0, HEAD_DIM)
    dtype = cache_ptr.dtype.element_ty
    cos, sin = mrope_cos_sin(positions_ptr, cos_sin_ptr, 0, stride_positions, stride_cos_sin, HEAD_DIM,
                             SECTION_T, SECTION_H, SECTION_W, INTERLEAVED)  # fmt: skip
    q_offsets = (kv_head * GROUP + g)[:, None] * HEAD_DIM + half[None, :]  # [BLOCK_G, HEAD_DIM / 2]
    q_mask = (g < GROUP)[:, None]
    if PDL:
        tl.extra.cuda.gdc_wait()  # the qkv row is complete; the workspace and counters are free
    q1 = tl.load(qkv_ptr + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(qkv_ptr + HEAD_DIM // 2 + q_offsets, mask=q_mask, other=0.0).to(tl.float32)
    q1, q2 = norm_rope(q1, q2, q_norm_ptr, cos, sin, eps, HEAD_DIM, RMS_NORM)  # the padding rows stay zero
    q1, q2 = q1.to(dtype), q2.to(dtype)
    k_row = qkv_ptr + (NUM_Q_HEADS + kv_head) * HEAD_DIM
    k1 = tl.load(k_row + half[None, :]).to(tl.float32)  # [1, HEAD_DIM / 2]
    k2 = tl.load(k_row + HEAD_DIM // 2 + half[None, :]).to(tl.float32)
    k1, k2 = norm_rope(k1, k2, k_norm_ptr, cos, sin, eps, HEAD_DIM, RMS_NORM)
    k1, k2 = k1.to(dtype), k2.to(dtype)
    v = tl.load(qkv_ptr + (NUM_Q_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM + dims).to(dtype)  # [HEAD_DIM]
    if split == 0:
        slot = tl.load(slot_mapping_ptr).to(tl.int64)
        if slot >= 0:
            own_slot = head_cache_ptr + (slot // block_size) * stride_block + (slot % block_size) * stride_slot
            tl.store(own_slot + half[None, :], k1)
            tl.store(own_slot + HEAD_DIM // 2 + half[None, :], k2)
            tl.store(own_slot + HEAD_DIM + dims, v)

    # Running max score (finite: no inf - inf), running sum of exp2(score - m), and of that times values.
    m = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    score_scale = scale * 1.4426950408889634
    m, l, acc = _attend_tile(m, l, acc, q1, q2, k1, k2, v, positions, key1, key2, value, end, last, score_scale)
    for tile_start in range(start + TILE, end, TILE):
        positions, key1, key2, value = _load_tile(head_cache_ptr, block_table_ptr, tile_start, end, last,
                                                  block_size, stride_block, stride_slot, TILE, HEAD_DIM)  # fmt: skip
        m, l, acc = _attend_tile(m, l, acc, q1, q2, k1, k2, v, positions, key1, key2, value, end, last,
                                 score_scale)  # fmt: skip

    # This program's partial state (the group's rows only), then a ticket; the kv head's last program merges.
    part = kv_head * SPLITS + split
    rows = g[:, None] < GROUP
    tl.store(partial_out_ptr + (part * GROUP + g)[:, None] * HEAD_DIM + dims[None, :], acc, mask=rows)
    tl.store(partial_stats_ptr + part * 2 * GROUP + g, m, mask=g < GROUP)
    tl.store(partial_stats_ptr + (part * 2 + 1) * GROUP + g, l, mask=g < GROUP)
    tl.debug_barrier()  # every thread's stores issued before the (single-thread) release below
    ticket = tl.atomic_add(counters_ptr + kv_head, 1, sem="acq_rel")
    if ticket == SPLITS - 1:  # all partials are in L2: load them from there (.cg), not from this SM's L1
        parts = kv_head * SPLITS + tl.arange(0, SPLITS)
        group = tl.arange(0, BLOCK_PARTS)
        in_group = group[None, :] < GROUP
        stats = partial_stats_ptr + (parts * 2 * GROUP)[:, None] + group[None, :]  # [SPLITS, BLOCK_PARTS]
        m_parts = tl.load(stats, mask=in_group, other=-1.0e30, cache_modifier=".cg")
        weights = tl.exp2(m_parts - tl.max(m_parts, 0)[None, :])  # splits without keys: l = 0, acc = 0 anyway
        l_total = tl.sum(weights * tl.load(stats + GROUP, mask=in_group, other=0.0, cache_modifier=".cg"), 0)
        acc_ptrs = partial_out_ptr + ((parts * GROUP)[:, None, None] + group[None, :, None]) * HEAD_DIM + dims
        acc_parts = tl.load(acc_ptrs, mask=in_group[:, :, None], other=0.0, cache_modifier=".cg")
        out = tl.sum(weights[:, :, None] * acc_parts, 0) / tl.where(l_total > 0, l_total, 1.0)[:, None]
        out_ptrs = out_ptr + (kv_head * GROUP + group)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(group < GROUP)[:, None])
        tl.store(counters_ptr + kv_head, 0)


class Workspace(NamedTuple):
    """Scratch of the kernel, reused by every launch of its shape on its device (allocated before CUDA-graph capture:
    graphs keep its addresses)."""

    partial_out: torch.Tensor  # [num_kv_heads, splits, group, head_dim] fp32: sum of exp2(score - max) * value
    partial_stats: torch.Tensor  # [num_kv_heads, splits, 2, group] fp32: max score (log2 units), sum of exp2
    counters: torch.Tensor  # [num_kv_heads] int32: programs done; 0 between launches


@functools.cache
def workspace(device: torch.device, num_kv_heads: int, splits: int, group: int, head_dim: int) -> Workspace:
    return Workspace(
        torch.empty(num_kv_heads, splits, group, head_dim, dtype=torch.float32, device=device),
        torch.empty(num_kv_heads, splits, 2, group, dtype=torch.float32, device=device),
        torch.zeros(num_kv_heads, dtype=torch.int32, device=device),
    )


class RopeArgs(NamedTuple):
    """The layer's q / k norms and mRoPE, as `decode_kernels.qk_norm_mrope` takes them."""

    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    eps: float
    cos_sin_cache: torch.Tensor  # [max_position, head_dim]: cos | sin
    mrope_section: list[int]  # (T, H, W), sums to head_dim / 2
    mrope_interleaved: bool


def decode_attention(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    rope: RopeArgs,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_heads: int,
    num_kv_heads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output [1, num_heads * head_dim] of one token (written into `out` if given), its K and V written
    to the cache.

    qkv [1, (num_heads + 2 * num_kv_heads) * head_dim] contiguous, as the qkv GEMV leaves it (before q / k norm and
    mRoPE); positions [3, 1] (or [1]); kv_cache logical [num_blocks, num_kv_heads, block_size, 2 * head_dim] with a
    contiguous last dimension, qkv's dtype; slot_mapping [>= 1] (the token's slot, < 0 for none); block_table
    [num_reqs, max_blocks] and seq_lens [num_reqs] int32, of which request 0 is the token's: keys 0 .. seq_lens[0] - 1,
    the token's own the last. Reads lengths and slots on the device: replayable in a CUDA graph."""
    _, num_kv_cache_heads, block_size, kv_dim = kv_cache.shape
    head_dim = kv_dim // 2
    assert num_kv_cache_heads == num_kv_heads and qkv.shape[-1] == (num_heads + 2 * num_kv_heads) * head_dim
    group = num_heads // num_kv_heads
    scratch = workspace(qkv.device, num_kv_heads, SPLITS, group, head_dim)
    out = qkv.new_empty(1, num_heads * head_dim) if out is None else out
    rms_norm = rope.q_norm_weight is not None
    pdl = programmatic_launch(qkv.device)
    section_t, section_h, section_w = rope.mrope_section
    _decode_attention_kernel[(num_kv_heads, SPLITS)](
        qkv, rope.q_norm_weight if rms_norm else qkv, rope.k_norm_weight if rms_norm else qkv, rope.cos_sin_cache,
        positions, kv_cache, slot_mapping, block_table, seq_lens, out, scratch.partial_out, scratch.partial_stats,
        scratch.counters, positions.stride(0) if positions.dim() == 2 else 0, rope.cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_size, rope.eps, scale,
        NUM_Q_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group,
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), BLOCK_PARTS=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, SECTION_T=section_t, SECTION_H=section_h, SECTION_W=section_w,
        INTERLEAVED=rope.mrope_interleaved, RMS_NORM=rms_norm, SPLITS=SPLITS, TILE=TILE, PDL=pdl,
        num_warps=NUM_WARPS, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return out


def supports(attention: nn.Module) -> bool:
    """Whether vLLM attention layer `attention` runs FLASH_ATTN decoder attention that `decode_attention` computes:
    no ALiBi, sliding window, logits soft cap, sinks, K/V scales or context parallelism, a power-of-two head size
    of at least 32 (`tl.dot` over half heads)."""
    impl = attention.impl
    return (
        attention.attn_backend.get_name() == "FLASH_ATTN"
        and impl.attn_type == AttentionType.DECODER
        and not is_quantized_kv_cache(impl.kv_cache_dtype)
        and not getattr(attention, "calculate_kv_scales", False)
        and getattr(attention, "query_quant", None) is None
        and getattr(attention, "kv_sharing_target_layer_name", None) is None
        and impl.alibi_slopes is None
        and tuple(impl.sliding_window) == (-1, -1)
        and not impl.logits_soft_cap
        and getattr(impl, "sinks", None) is None
        and getattr(impl, "dcp_world_size", 1) == 1
        and getattr(impl, "pcp_world_size", 1) == 1
        and impl.head_size >= 32
        and impl.head_size & (impl.head_size - 1) == 0
    )


def _runs_fused(qkv: torch.Tensor, attention: nn.Module, metadata: Any, kv_cache: torch.Tensor, slots: Any) -> bool:
    """Whether this call is one token that `decode_attention` attends exactly as vLLM's layer would (the layer
    passed `supports` when the op was given to it)."""
    head_dim = attention.impl.head_size
    return (
        qkv.shape[0] == 1
        and qkv.is_cuda
        and qkv.is_contiguous()
        and qkv.dtype in HALF_DTYPES
        and metadata is not None
        and metadata.num_actual_tokens == 1
        and isinstance(slots, torch.Tensor)
        and kv_cache.dtype == qkv.dtype
        and kv_cache.dim() == 4
        and kv_cache.shape[1] == attention.num_kv_heads
        and kv_cache.shape[3] == 2 * head_dim
        and kv_cache.stride(3) == 1
        and vllm_compat.is_plain_causal_flash_attention(metadata)
        and _no_per_layer_kv_transfer()
    )


def _no_per_layer_kv_transfer() -> bool:
    """Whether no KV connector waits for or saves each layer's K/V around vLLM's attention op (ours reads the whole
    cache after the forward)."""
    return not has_kv_transfer_group() or isinstance(get_kv_transfer_group(), Cosmos3KVExportConnector)


def attention(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    output: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    mrope_section: list[int],
    mrope_interleaved: bool,
    layer_name: str,
) -> None:
    """Attention layer `layer_name` on qkv [M, (num_heads + 2 * num_kv_heads) * head_dim], written into output
    [M, num_heads * head_dim]: q / k RMSNorm (none when the weights are None) and neox mRoPE at positions [3, M]
    (or [M]), the K/V-cache write, causal attention over the paged cache. Like vLLM's attention ops it writes a
    buffer the caller allocated: in piecewise CUDA graphs the next piece reads the address it was captured with
    (at M > 1 that costs a copy of vLLM's attention output)."""
    metadata, layer, kv_cache, slots = get_attention_context(layer_name)
    rope = RopeArgs(q_norm_weight, k_norm_weight, eps, cos_sin_cache, mrope_section, mrope_interleaved)
    if _runs_fused(qkv, layer, metadata, kv_cache, slots):
        decode_attention(qkv, positions, rope, kv_cache, slots, metadata.block_table, metadata.seq_lens,
                         layer.impl.scale, num_heads, num_kv_heads, out=output)  # fmt: skip
        return
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = qk_norm_mrope(positions, q, k, q_norm_weight, k_norm_weight, eps, cos_sin_cache, head_dim,
                         mrope_section, mrope_interleaved)  # fmt: skip
    output.copy_(layer(q, k, v))


def _attention_fake(*args: Any) -> None:
    return None


direct_register_custom_op(ATTENTION_OP.removeprefix("vllm::"), attention, mutates_args=["output"],
                          fake_impl=_attention_fake)  # fmt: skip


def graph_splits_at_attention(compilation_config: CompilationConfig) -> bool:
    """Whether a compiled forward may call `cosmos3_attention`: it is on (see the plugin) and vLLM splits its graph
    at our op wherever it splits at its own attention (the plugin adds it to the default splitting ops; a config
    listing its own may lack it)."""
    ops = compilation_config.splitting_ops or []
    return DECODE_ATTENTION and (ATTENTION_OP in ops or "vllm::unified_attention_with_output" not in ops)
