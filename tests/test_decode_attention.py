"""The single-token decode attention kernel (`model_executor/decode_attention.py`) on CPU.

The Triton kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, set in a subprocess so it stays there) on
synthetic paged caches in both of vLLM's FlashAttention layouts (HND and NHD strides), with out-of-order block
tables of two requests (row 0 attended) and NaN in every slot not attended, against torch's
`scaled_dot_product_attention` (`enable_gqa`, float64) over the gathered keys and values: float32 within float32
rounding, float16 within a few float16 roundings (the interpreter rounds bfloat16 by truncation, so bfloat16 is
left to tests/gpu/test_decode_attention_gpu.py). Every launch must leave the workspace's counters at 0 (the next
launch, or a CUDA-graph replay, relies on it), and the launches of a run follow each other on the same workspace.
In this process: the metadata check of `vllm_compat`, and the class swap and dispatch of a real `FlashAttentionImpl`.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tests.triton_interpreter import run_interpreted

REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # relative L2 error to the float64 reference
NUM_BLOCKS = 192  # two requests' block table rows of 96 blocks


def test_kernel_under_triton_interpreter() -> None:
    run_interpreted(__name__, "run_interpreted_checks")


def run_interpreted_checks() -> None:
    """Entry point of the interpreter subprocess."""
    from cosmos3_serve.model_executor import decode_attention

    torch.manual_seed(0)
    splits = decode_attention.SPLITS
    # 1 token; exactly one block; a partial last block with most splits empty; more blocks than splits (several
    # per split); enough for more than one loop step per split.
    seq_lens = (1, 16, 37, 16 * (splits + 1) + 5, 16 * 5 * splits - 3)
    for dtype in (torch.float32, torch.float16):
        for layout in ("HND", "NHD"):
            for num_heads, num_kv_heads, head_dim, block_size in ((8, 2, 64, 16), (6, 2, 64, 32), (2, 2, 128, 16)):
                check_decode_attention(decode_attention, dtype, layout, num_heads, num_kv_heads, head_dim,
                                       block_size, seq_lens)  # fmt: skip


def paged_cache(
    layout: str, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, block_table_row: torch.Tensor,
    seq_len: int,
) -> torch.Tensor:  # fmt: skip
    """A cache, logically `[NUM_BLOCKS, num_kv_heads, block_size, 2 * head_dim]`, in `layout`'s memory order
    (vLLM's FLASH_ATTN stride orders): random K and V in the slots of positions 0 .. seq_len - 1 of the blocks of
    `block_table_row`, NaN everywhere else (what must not be read, or must not count)."""
    if layout == "HND":
        cache = torch.full((NUM_BLOCKS, num_kv_heads, block_size, 2 * head_dim), float("nan"), dtype=dtype)
    else:
        cache = torch.full((NUM_BLOCKS, block_size, num_kv_heads, 2 * head_dim), float("nan"), dtype=dtype)
        cache = cache.transpose(1, 2)
    positions = torch.arange(seq_len)
    blocks, slots = block_table_row[positions // block_size].long(), positions % block_size
    cache[blocks, :, slots] = torch.randn(seq_len, num_kv_heads, 2 * head_dim, dtype=dtype)
    return cache


def reference_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, scale: float
) -> torch.Tensor:
    """Attention of query `[1, num_heads, head_dim]` to the first `seq_len` keys of the blocks of
    `block_table_row`, in float64: `[1, num_heads, head_dim]`."""
    head_dim = query.shape[-1]
    block_size = kv_cache.shape[2]
    positions = torch.arange(seq_len)
    slots = kv_cache[block_table_row[positions // block_size].long(), :, positions % block_size]  # [L, Hkv, 2D]
    keys, values = slots[..., :head_dim].transpose(0, 1).double(), slots[..., head_dim:].transpose(0, 1).double()
    out = F.scaled_dot_product_attention(query.transpose(0, 1).double(), keys, values, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def check_decode_attention(
    decode_attention, dtype: torch.dtype, layout: str, num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, seq_lens: tuple[int, ...],
) -> None:  # fmt: skip
    block_table = torch.randperm(NUM_BLOCKS, dtype=torch.int32).view(2, -1)
    scale = head_dim**-0.5
    block_g = decode_attention.group_rows(num_heads // num_kv_heads)
    counters = decode_attention.workspace(torch.device("cpu"), num_kv_heads, decode_attention.SPLITS, block_g,
                                          head_dim).counters  # fmt: skip
    for seq_len in seq_lens:
        assert seq_len <= block_table.shape[1] * block_size
        case = f"{dtype} {layout} heads {num_heads}/{num_kv_heads} dim {head_dim} block {block_size} len {seq_len}"
        kv_cache = paged_cache(layout, num_kv_heads, block_size, head_dim, dtype, block_table[0], seq_len)
        # The query heads of one token of a qkv row, like vLLM's view of the q projection.
        qkv = torch.randn(1, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
        query = qkv[:, : num_heads * head_dim].view(1, num_heads, head_dim)
        output = torch.full_like(query, float("nan"))
        seq_lens_t = torch.tensor([seq_len, 5], dtype=torch.int32)  # request 1 is not attended
        decode_attention.decode_attention(query, kv_cache, block_table, seq_lens_t, scale, output)
        expected = reference_attention(query, kv_cache, block_table[0], seq_len, scale)
        error = float((output.double() - expected).norm() / expected.norm())
        assert error <= REL_TOL[dtype], f"{case}: relative error {error:.2e} > {REL_TOL[dtype]:.0e}"
        assert not counters.any(), f"{case}: counters {counters.tolist()} not reset"


def flash_metadata(**changes):
    """This vLLM's `FlashAttentionMetadata` of one request decoding one token, with `changes`."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    fields = {field.name for field in dataclasses.fields(FlashAttentionMetadata)}
    one = torch.ones(1, dtype=torch.int32)
    required = {"num_actual_tokens": 1, "max_query_len": 1, "query_start_loc": one, "max_seq_len": 7,
                "seq_lens": one, "block_table": one.view(1, 1), "slot_mapping": one}  # fmt: skip
    if "use_cascade" in fields:  # vLLM 0.26
        required.update(use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None, prefix_kv_lens=None,
                        suffix_kv_lens=None)  # fmt: skip
    return dataclasses.replace(FlashAttentionMetadata(**required), **changes)


def test_plain_causal_flash_attention_metadata() -> None:
    """`vllm_compat.is_plain_causal_flash_attention` on this vLLM's `FlashAttentionMetadata`."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    from cosmos3_serve.model_executor import vllm_compat

    one = torch.ones(1, dtype=torch.int32)
    assert vllm_compat.is_plain_causal_flash_attention(flash_metadata())
    assert not vllm_compat.is_plain_causal_flash_attention(flash_metadata(causal=one.bool()))
    assert not vllm_compat.is_plain_causal_flash_attention(flash_metadata(rswa_prefix_lens=one))
    fields = {field.name for field in dataclasses.fields(FlashAttentionMetadata)}
    ranges = "mm_prefix_query_range_tensor" if "mm_prefix_query_range_tensor" in fields else "mm_prefix_range_tensor"
    assert not vllm_compat.is_plain_causal_flash_attention(flash_metadata(**{ranges: one}))


class CudaTensor(torch.Tensor):
    """A CPU tensor that says it is on CUDA (the kernel is replaced by a recorder below)."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_flash_attention_impl_takes_the_single_token_forward(monkeypatch) -> None:
    """A real `FlashAttentionImpl` of this vLLM takes the class the reasoner swaps in; its forward runs
    `decode_attention` on one token of a plain causal batch with a CUDA cache of the query's dtype, FlashAttention's
    own forward otherwise."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl

    from cosmos3_serve.model_executor import decode_attention, reasoner

    num_heads, num_kv_heads, head_dim = 8, 2, 64
    with set_current_vllm_config(VllmConfig()):
        impl = FlashAttentionImpl(num_heads, head_dim, head_dim**-0.5, num_kv_heads, None, None, "auto")
    attention = SimpleNamespace(impl=impl, attn_backend=FlashAttentionBackend)  # vLLM's `Attention` layer
    assert decode_attention.Batch1AttentionImpl.supports(attention)
    impl.__class__ = reasoner._batch1_attention_impl_class(FlashAttentionImpl)
    assert isinstance(impl, FlashAttentionImpl) and isinstance(impl, decode_attention.Batch1AttentionImpl)

    calls = []
    monkeypatch.setattr(FlashAttentionImpl, "forward", lambda self, *args, **kwargs: calls.append("flash"))
    monkeypatch.setattr(decode_attention, "decode_attention", lambda *args: calls.append(args))
    query, output = torch.zeros(2, num_heads, head_dim), torch.zeros(2, num_heads, head_dim)
    cache = torch.zeros(4, num_kv_heads, 16, 2 * head_dim)
    one_token, cuda_cache, metadata = query[:1], cache.as_subclass(CudaTensor), flash_metadata()
    impl.forward(attention, one_token, one_token, one_token, cuda_cache, metadata, output[:1])
    [args] = calls
    expected = (one_token, cuda_cache, metadata.block_table, metadata.seq_lens, impl.scale)
    assert all(arg is value for arg, value in zip(args, expected)) and args[5].data_ptr() == output.data_ptr()
    falls_back = [
        (query, cuda_cache, flash_metadata(num_actual_tokens=2)),
        (one_token, cuda_cache, flash_metadata(num_actual_tokens=0)),  # a padding-only batch
        (one_token, cache, metadata),
        (one_token, cache.half().as_subclass(CudaTensor), metadata),
        (one_token, cuda_cache, flash_metadata(rswa_prefix_lens=torch.ones(1, dtype=torch.int32))),
        (one_token, cuda_cache, None),  # vLLM's profiling run
    ]
    for q, kv_cache, md in falls_back:
        impl.forward(attention, q, q, q, kv_cache, md, output[: len(q)])
        assert calls[-1] == "flash"
