"""One kernel that copies a prompt's K and V out of every layer's paged cache (the GPU half of `kv_export`).

vLLM's FlashAttention cache of one layer is logically `[num_blocks, num_kv_heads, block_size, 2 * head_dim]`
(K in the first half of the last dimension, V in the second; the physical order of the first three dimensions
depends on vLLM's cache layout, so the kernel takes the strides). Every layer's cache has the same shape and
strides, so a table of their base addresses lets one launch gather all layers: per layer two strided copies plus
a transpose would be about 5 launches, 36 times per prompt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(
    cache_ptrs,  # [layers] int64: base address of each layer's cache
    block_index,  # [num blocks of the prompt] int64: cache block of the prompt's tokens 0.., block_size each
    out_ptr,  # [layers, 2, num_tokens, heads, head_dim]: K then V of every layer
    num_tokens,
    stride_block,
    stride_head,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
    HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TOKENS: tl.constexpr,
):
    layer, kv, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cache = tl.load(cache_ptrs + layer).to(tl.pointer_type(out_ptr.dtype.element_ty))
    tokens = tile * TOKENS + tl.arange(0, TOKENS)
    heads, dims = tl.arange(0, HEADS_P2), tl.arange(0, HEAD_DIM)
    token_ok = tokens < num_tokens
    blocks = tl.load(block_index + tokens // BLOCK_SIZE, mask=token_ok, other=0)
    slots = tokens % BLOCK_SIZE
    mask = token_ok[:, None, None] & (heads < HEADS)[None, :, None]
    src = (cache + blocks[:, None, None] * stride_block + heads[None, :, None] * stride_head
           + slots[:, None, None] * stride_slot + kv * HEAD_DIM + dims[None, None, :])  # fmt: skip
    dst = (out_ptr + ((layer * 2 + kv) * num_tokens + tokens[:, None, None].to(tl.int64)) * (HEADS * HEAD_DIM)
           + heads[None, :, None] * HEAD_DIM + dims[None, None, :])  # fmt: skip
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


class PagedKVGather:
    """K and V of a prompt from all layers' FlashAttention caches (same shape, dtype and strides) in one launch."""

    TOKENS = 16  # tokens per program

    def __init__(self, caches: list[torch.Tensor]) -> None:
        first = caches[0]
        if any(c.shape != first.shape or c.stride() != first.stride() or c.dtype != first.dtype for c in caches):
            raise ValueError("every layer's cache must have the same shape, strides and dtype")
        if first.stride(3) != 1:
            raise ValueError("the cache's last dimension must be contiguous")
        self.caches = caches  # kept alive: the table below holds their addresses
        self.cache_ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=first.device)
        _, self.num_kv_heads, self.block_size, two_head_dim = first.shape
        self.head_dim = two_head_dim // 2
        self.strides = first.stride()[:3]

    def gather(self, block_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """`[layers, 2, num_tokens, num_kv_heads, head_dim]`: K (`[:, 0]`) and V (`[:, 1]`) of the first
        `num_tokens` slots of the cache blocks `block_index` (int64, on the caches' device)."""
        out = torch.empty(len(self.caches), 2, num_tokens, self.num_kv_heads, self.head_dim,
                          dtype=self.caches[0].dtype, device=self.cache_ptrs.device)  # fmt: skip
        grid = (len(self.caches), 2, triton.cdiv(num_tokens, self.TOKENS))
        _gather_kernel[grid](self.cache_ptrs, block_index, out, num_tokens, *self.strides, BLOCK_SIZE=self.block_size,
                             HEADS=self.num_kv_heads, HEADS_P2=triton.next_power_of_2(self.num_kv_heads),
                             HEAD_DIM=self.head_dim, TOKENS=self.TOKENS)  # fmt: skip
        return out
