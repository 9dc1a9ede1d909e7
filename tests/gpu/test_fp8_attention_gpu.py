"""FlashAttention 3's FP8 path (`serve --generator-attention fp8`) on a Hopper GPU, at a video's packed layout with
Nano's heads: against the same inputs rounded to e4m3 in float32 attention (what the CPU emulates; FA3 also rounds
its softmax probabilities to e4m3) and against bf16 attention; inside CUDA graphs its dynamic scales replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Nano's


def _layout(prompt_lens: list[int], gen_lens: list[int]):
    from cosmos3_serve.model_executor.generator import GeneratorSequence, PackedAttention
    from cosmos3_serve.model_executor.kv_export import PromptKV

    sequences = [GeneratorSequence(g, PromptKV(torch.randn(1, 2, p, KV_HEADS, HEAD_DIM, device="cuda",
                                                           dtype=torch.bfloat16)))
                 for p, g in zip(prompt_lens, gen_lens)]  # fmt: skip
    return PackedAttention.build(sequences, torch.device("cuda"))


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_fa3_fp8_attention_follows_attention_over_rounded_inputs() -> None:
    from cosmos3_serve.model_executor import varlen_attention as attention

    torch.manual_seed(0)
    layout = _layout([300, 97], [4_000, 2_600])
    q = torch.randn(6_600, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) * 2
    k, v = (torch.randn(6_600, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keys, values = layout.keys_values(0, k, v)
    fp8 = attention.varlen_attention(q, keys, values, layout, fp8=True)
    bf16 = attention.varlen_attention(q, keys, values, layout)
    rounded_inputs = [x8.float() * scale for x8, scale in map(attention.quantize_per_tensor, (q, keys, values))]
    emulated = attention._exact(*rounded_inputs, layout)  # float32
    assert fp8.dtype == torch.bfloat16 and torch.isfinite(fp8).all()
    assert _relative(fp8, emulated) < 0.04  # FA3 rounds its probabilities to e4m3 too
    assert 1e-3 < _relative(fp8, bf16) < 0.08


def test_fp8_attention_replays_in_a_cuda_graph() -> None:
    from cosmos3_serve.model_executor.varlen_attention import varlen_attention

    torch.manual_seed(1)
    layout = _layout([128], [1_024])
    q = torch.randn(1_024, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1_024, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keys, values = layout.keys_values(0, k, v)
    varlen_attention(q, keys, values, layout, fp8=True)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = varlen_attention(q, keys, values, layout, fp8=True)
    for scale in (0.5, 4.0):  # new magnitudes: the scales are computed inside the graph
        for x in (q, keys, values):
            x.mul_(scale)
        graph.replay()
        assert _relative(out, varlen_attention(q, keys, values, layout, fp8=True)) < 1e-6
