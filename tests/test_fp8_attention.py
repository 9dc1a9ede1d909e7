"""FP8 attention of the generator (`serve --generator-attention fp8`) on the CPU: the emulation of FA3's FP8 path
against attention over inputs rounded to e4m3 by hand, and a whole denoising run against diffusers' pipeline with
its attention inputs rounded the same way (tests/oracle.py). FA3's own FP8 kernel is compared in tests/gpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.oracle import FLOAT8_E4M3_MAX, hand_written_fp8_attention, load_diffusers_pipeline

PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry, low quality"


def _packed(prompt_lens: list[int], gen_lens: list[int], heads: int, kv_heads: int, head_dim: int, seed: int):
    from cosmos3_serve.model_executor.generator import GeneratorSequence, PackedAttention
    from cosmos3_serve.model_executor.kv_export import PromptKV

    generator = torch.Generator().manual_seed(seed)
    sequences = [GeneratorSequence(g, PromptKV(torch.randn(1, 2, p, kv_heads, head_dim, generator=generator)))
                 for p, g in zip(prompt_lens, gen_lens)]  # fmt: skip
    layout = PackedAttention.build(sequences, torch.device("cpu"))
    q = torch.randn(sum(gen_lens), heads, head_dim, generator=generator) * 3
    k = torch.randn(sum(gen_lens), kv_heads, head_dim, generator=generator)
    v = torch.randn(sum(gen_lens), kv_heads, head_dim, generator=generator) * 0.5
    keys, values = layout.keys_values(0, k, v)
    return q, keys, values, layout


def _by_hand(q, keys, values, layout, rounded: bool) -> torch.Tensor:
    """Softmax attention per sequence in float64 written out, on inputs rounded to e4m3 with one scale each."""

    def to_e4m3(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().max().double() / FLOAT8_E4M3_MAX
        return (x.double() / scale).to(torch.float8_e4m3fn).double() * scale if rounded else x.double()

    q, keys, values = to_e4m3(q), to_e4m3(keys), to_e4m3(values)
    group = q.shape[1] // keys.shape[1]
    out = torch.empty_like(q)
    cu_q, cu_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        q_i = q[cu_q[i] : cu_q[i + 1]]
        k_i = keys[cu_k[i] : cu_k[i + 1]].repeat_interleave(group, dim=1)
        v_i = values[cu_k[i] : cu_k[i + 1]].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_i, k_i) / q.shape[-1] ** 0.5
        out[cu_q[i] : cu_q[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_i)
    return out


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def test_fp8_attention_is_attention_over_inputs_rounded_to_e4m3() -> None:
    from cosmos3_serve.model_executor.varlen_attention import varlen_attention

    q, keys, values, layout = _packed([7, 12], [20, 9], heads=4, kv_heads=2, head_dim=16, seed=0)
    ours = varlen_attention(q, keys, values, layout, fp8=True)
    exact = _by_hand(q, keys, values, layout, rounded=False)
    assert ours.dtype == q.dtype
    assert _relative(ours, _by_hand(q, keys, values, layout, rounded=True)) < 1e-5
    assert 1e-3 < _relative(ours, exact) < 0.08  # e4m3 keeps 3 mantissa bits: rounded, but close
    assert _relative(varlen_attention(q, keys, values, layout), exact) < 1e-5  # 16-bit path: exact


def test_per_tensor_scale_maps_the_largest_magnitude_to_e4m3_max() -> None:
    from cosmos3_serve.model_executor.varlen_attention import quantize_per_tensor

    x = torch.randn(64, 4, 16) * 7
    x[3, 1, 2] = -50.0
    x8, scale = quantize_per_tensor(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == ()
    assert float(scale) == pytest.approx(50.0 / FLOAT8_E4M3_MAX, rel=1e-6)
    assert float(x8.float()[3, 1, 2]) == -FLOAT8_E4M3_MAX
    normal = x.abs() > 2**-6 * scale  # e4m3's normal range: relative rounding error at most 2^-4
    assert ((x8.float() * scale - x).abs()[normal] <= x.abs()[normal] * 2**-4).all()


def test_denoising_with_fp8_attention_follows_diffusers_with_rounded_attention_inputs(
    tiny_checkpoint: Path, vllm_reasoner
) -> None:
    from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
    from cosmos3_serve.model_executor.request import GenerationRequest
    from tests.test_generation import run_alone

    [device] = vllm_reasoner.collective_rpc(lambda worker: worker.device)
    executor = DiffusionExecutor(tiny_checkpoint, vllm_reasoner.llm_engine.vllm_config, device,
                                 attention_precision="fp8")  # fmt: skip
    request = GenerationRequest(PROMPT, NEGATIVE, height=32, width=64, num_inference_steps=3, seed=7,
                                guidance_scale=1.0)  # fmt: skip
    ours = run_alone(executor, vllm_reasoner, tiny_checkpoint, request).video

    pipeline = load_diffusers_pipeline(tiny_checkpoint)
    arguments = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=1, height=32, width=64,
                     num_inference_steps=3, guidance_scale=1.0, output_type="latent")  # fmt: skip
    sixteen = pipeline(**arguments, generator=torch.Generator().manual_seed(7)).video
    with hand_written_fp8_attention():
        by_hand = pipeline(**arguments, generator=torch.Generator().manual_seed(7)).video
    assert _relative(by_hand, sixteen) > 1e-4  # the rounding shows in the latents
    assert _relative(ours, by_hand) < 0.1 * _relative(by_hand, sixteen)  # and ours rounds as the oracle does
