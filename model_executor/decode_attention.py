"""Attention of a single query token over vLLM's FlashAttention paged K/V cache in one Triton kernel.

At batch-1 decode FA3 runs a split-KV kernel and a combine kernel per layer (8.4-9.8 + 2.6 us on an H200 at 512 to
768 cached tokens, docs/benchmarks.md): latency, not bandwidth (the layer's K/V is 2-3 MB there). Here one
launch does both: program (kv_head, split) attends the GQA group of query heads of `kv_head` to a contiguous range
of whole cache blocks (computed on the device from `seq_lens[0]`, so a CUDA graph captured once replays at any
length), writes its partial softmax state to a persistent fp32 workspace and takes a ticket from a per-kv-head
counter; the program that takes the last ticket merges the group's partials into the output and zeroes the
counter for the next launch. Scores and the weighted sum of values are `tl.dot`s (the group's query heads padded
to the tensor cores' 16 rows), accumulated in fp32.

The cache is vLLM's FLASH_ATTN one: logical `[num_blocks, num_kv_heads, block_size, 2 * head_dim]` (K in
`[..., :head_dim]`, V in `[..., head_dim:]`), physical order of the first three dimensions per vLLM's cache layout,
hence strides. `Batch1AttentionImpl` routes vLLM's FlashAttention forward here at one query token.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from vllm.triton_utils import tl, triton
from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from cosmos3_serve.model_executor import vllm_compat

if TYPE_CHECKING:
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

# Launch configuration, read at each launch; tests/gpu/test_decode_attention_gpu.py times others.
SPLITS = 16  # programs per kv head: 8 kv heads x 16 ~ the 132 SMs of an H100 / H200
TILE = 64  # keys per loop step (512 to 768 cached tokens: 32 to 48 keys per program, one step)
NUM_WARPS = 4
MIN_DOT_ROWS = 16  # tl.dot's smallest M: a GQA group's query heads are padded to it


@triton.jit
def _decode_attention_kernel(
    q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr, partial_out_ptr, partial_stats_ptr, counters_ptr,
    stride_q_head, stride_out_head, stride_block, stride_head, stride_slot, block_size, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (kv_head, split): query heads kv_head * GROUP + [0, GROUP) (rows of a [BLOCK_G, HEAD_DIM] tile, the
    rows past GROUP zero) against keys [start, end) of sequence 0, TILE keys per step on the tensor cores, then
    (last program of kv_head) the merge. Scores are in log2 units (scaled by scale * log2(e))."""
    kv_head, split = tl.program_id(0), tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr)
    num_blocks = tl.cdiv(seq_len, block_size)
    blocks_per_split = tl.maximum(tl.cdiv(num_blocks, SPLITS), 1)
    start = split * blocks_per_split * block_size
    end = tl.minimum(start + blocks_per_split * block_size, seq_len)

    g, dims, keys = tl.arange(0, BLOCK_G), tl.arange(0, HEAD_DIM), tl.arange(0, TILE)
    q = tl.load(q_ptr + (kv_head * GROUP + g)[:, None] * stride_q_head + dims[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # fmt: skip  # [BLOCK_G, HEAD_DIM]
    score_scale = scale * 1.4426950408889634
    head_base = cache_ptr + kv_head.to(tl.int64) * stride_head
    # Running max score (finite: no inf - inf), running sum of exp2(score - m), and of that times values.
    m = tl.full((BLOCK_G,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    for tile_start in range(start, end, TILE):
        positions = tile_start + keys  # [TILE]
        valid = positions < end
        blocks = tl.load(block_table_ptr + positions // block_size, mask=valid, other=0).to(tl.int64)
        slots = head_base + (blocks * stride_block + (positions % block_size) * stride_slot)[:, None] + dims[None, :]
        k = tl.load(slots, mask=valid[:, None], other=0.0)  # [TILE, HEAD_DIM]
        v = tl.load(slots + HEAD_DIM, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * score_scale  # [BLOCK_G, TILE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    # Store this program's partial state, then take a ticket; the last of the kv head's SPLITS programs merges.
    part = kv_head * SPLITS + split
    tl.store(partial_out_ptr + (part * BLOCK_G + g)[:, None] * HEAD_DIM + dims[None, :], acc)
    tl.store(partial_stats_ptr + part * 2 * BLOCK_G + g, m)
    tl.store(partial_stats_ptr + (part * 2 + 1) * BLOCK_G + g, l)
    tl.debug_barrier()  # every thread's stores issued before the (single-thread) release below
    ticket = tl.atomic_add(counters_ptr + kv_head, 1, sem="acq_rel")
    if ticket == SPLITS - 1:  # all partials are in L2: load them from there (.cg), not from this SM's L1
        parts = kv_head * SPLITS + tl.arange(0, SPLITS)
        stats = partial_stats_ptr + (parts * 2 * BLOCK_G)[:, None] + g[None, :]  # [SPLITS, BLOCK_G]
        m_parts = tl.load(stats, cache_modifier=".cg")
        weights = tl.exp2(m_parts - tl.max(m_parts, 0)[None, :])  # splits without keys: 0 (l = 0, acc = 0 anyway)
        l_total = tl.sum(weights * tl.load(stats + BLOCK_G, cache_modifier=".cg"), 0)
        acc_ptrs = partial_out_ptr + ((parts * BLOCK_G)[:, None, None] + g[None, :, None]) * HEAD_DIM + dims
        acc_parts = tl.load(acc_ptrs, cache_modifier=".cg")  # [SPLITS, BLOCK_G, HEAD_DIM]
        out = tl.sum(weights[:, :, None] * acc_parts, 0) / tl.where(l_total > 0, l_total, 1.0)[:, None]
        out_ptrs = out_ptr + (kv_head * GROUP + g)[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
        tl.store(counters_ptr + kv_head, 0)


class Workspace(NamedTuple):
    """Per-launch scratch of the kernel, reused by every launch of its shape on its device (allocate it before
    CUDA-graph capture: graphs keep its addresses)."""

    partial_out: torch.Tensor  # [num_kv_heads, splits, BLOCK_G, head_dim] fp32: sum of exp2(score - max) * value
    partial_stats: torch.Tensor  # [num_kv_heads, splits, 2, BLOCK_G] fp32: max score (log2 units), sum of exp2
    counters: torch.Tensor  # [num_kv_heads] int32: programs done; 0 between launches


def group_rows(group: int) -> int:
    """Rows of the kernel's query tile for a GQA group of `group` query heads (BLOCK_G)."""
    return max(MIN_DOT_ROWS, triton.next_power_of_2(group))


@functools.cache
def workspace(device: torch.device, num_kv_heads: int, splits: int, block_g: int, head_dim: int) -> Workspace:
    return Workspace(
        torch.empty(num_kv_heads, splits, block_g, head_dim, dtype=torch.float32, device=device),
        torch.empty(num_kv_heads, splits, 2, block_g, dtype=torch.float32, device=device),
        torch.zeros(num_kv_heads, dtype=torch.int32, device=device),
    )


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    output: torch.Tensor,
) -> None:
    """Causal attention of one query token, written into `output`. query, output `[1, num_heads, head_dim]`
    (last dimension contiguous); kv_cache logical `[num_blocks, num_kv_heads, block_size, 2 * head_dim]` with a
    contiguous last dimension; block_table `[num_reqs, max_blocks]` and seq_lens `[num_reqs]` int32, of which
    request 0 is attended: its keys 0 .. seq_lens[0] - 1 (the query's own included) sit in cache blocks
    block_table[0, position // block_size]. Reads seq_lens on the device: replayable in a CUDA graph."""
    _, num_heads, head_dim = query.shape
    _, num_kv_heads, block_size, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_g = group_rows(group)
    scratch = workspace(query.device, num_kv_heads, SPLITS, block_g, head_dim)
    _decode_attention_kernel[(num_kv_heads, SPLITS)](
        query, kv_cache, block_table, seq_lens, output, scratch.partial_out, scratch.partial_stats, scratch.counters,
        query.stride(1), output.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_size,
        scale, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, SPLITS=SPLITS, TILE=TILE,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS,
    )  # fmt: skip


class Batch1AttentionImpl(AttentionImpl):
    """Mixin for vLLM's `FlashAttentionImpl`: a forward of one query token (batch-1 decode) runs `decode_attention`,
    any other FlashAttention's own. A subclass of `AttentionImpl` (as `FlashAttentionImpl` is) so that a subclass of
    both has the instance layout of `FlashAttentionImpl` and its instances can take that class."""

    @staticmethod
    def supports(attention: nn.Module) -> bool:
        """Whether vLLM attention layer `attention` runs FLASH_ATTN decoder attention that `decode_attention`
        computes: unquantized cache, no ALiBi, sliding window, logits soft cap or sinks, no context parallelism,
        a power-of-two head size."""
        impl = attention.impl
        return (
            attention.attn_backend.get_name() == "FLASH_ATTN"
            and impl.attn_type == AttentionType.DECODER
            and not is_quantized_kv_cache(impl.kv_cache_dtype)
            and impl.alibi_slopes is None
            and tuple(impl.sliding_window) == (-1, -1)
            and not impl.logits_soft_cap
            and impl.sinks is None
            and impl.dcp_world_size == 1
            and impl.pcp_world_size == 1
            and impl.head_size & (impl.head_size - 1) == 0
        )

    def compile_kernel(self, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the kernel for this layer's shapes and allocate its workspace now, before CUDA-graph capture: one
        launch on a zero cache of one block (its strides are multiples of 16 like any FLASH_ATTN cache's, so Triton
        specializes it alike)."""
        query = torch.zeros(1, self.num_heads, self.head_size, dtype=dtype, device=device)
        kv_cache = torch.zeros(1, self.num_kv_heads, 16, 2 * self.head_size, dtype=dtype, device=device)
        block_table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        seq_lens = torch.ones(1, dtype=torch.int32, device=device)
        decode_attention(query, kv_cache, block_table, seq_lens, self.scale, torch.empty_like(query))

    def forward(
        self,
        layer: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlashAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query `[num_tokens, num_heads, head_size]`, output the same (written); K and V of the new tokens are
        already in kv_cache (vLLM's `unified_kv_cache_update` runs before)."""
        if (
            attn_metadata is None
            or query.shape[0] != 1
            or attn_metadata.num_actual_tokens != 1
            or output_scale is not None
            or output_block_scale is not None
            or kv_cache.dtype != query.dtype
            or not kv_cache.is_cuda
            or not vllm_compat.is_plain_causal_flash_attention(attn_metadata)
        ):
            return super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output=output, output_scale=output_scale,
                output_block_scale=output_block_scale,
            )  # fmt: skip
        decode_attention(query, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens, self.scale, output)
        return output
