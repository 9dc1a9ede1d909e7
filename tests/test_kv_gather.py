"""The GPU export kernel (`kv_gather`) against a gather written here in torch, for both of vLLM's FlashAttention
cache layouts (logical `[blocks, heads, slots, 2 * head_dim]`: K then V in the last dimension), under Triton's
interpreter (`tests/triton_interpreter.py`). On the GPU, tests/gpu checks the exported K/V against diffusers'."""

from __future__ import annotations

import torch

from tests.triton_interpreter import run_interpreted


def test_one_kernel_gathers_every_layers_prompt_kv() -> None:
    run_interpreted(__name__, "check_gather")


def check_gather() -> None:
    """Entry point of the interpreter subprocess."""
    from cosmos3_serve.model_executor.kv_gather import PagedKVGather

    torch.manual_seed(0)
    num_blocks, heads, block_size, head_dim, layers, tokens = 6, 3, 16, 32, 4, 37
    index = torch.tensor([4, 1, 3])  # a prompt's blocks, out of order, the last one partly filled
    for layout in ("HND", "NHD"):  # either physical order of the first three dimensions
        if layout == "HND":
            caches = [torch.randn(num_blocks, heads, block_size, 2 * head_dim) for _ in range(layers)]
        else:
            caches = [torch.randn(num_blocks, block_size, heads, 2 * head_dim).transpose(1, 2) for _ in range(layers)]
        caches = [cache.to(torch.bfloat16) for cache in caches]
        kv = PagedKVGather(caches).gather(index, tokens)
        assert kv.shape == (layers, 2, tokens, heads, head_dim)
        for layer, cache in enumerate(caches):
            for position in range(tokens):
                slot = cache[index[position // block_size], :, position % block_size]  # [heads, 2 * head_dim]
                assert torch.equal(kv[layer, 0, position], slot[:, :head_dim]), (layout, layer, position)
                assert torch.equal(kv[layer, 1, position], slot[:, head_dim:]), (layout, layer, position)
