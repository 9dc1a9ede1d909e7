"""The generator tower's attention: each packed sequence's queries over its own keys (prompt K/V, then its
generator K/V), non-causal, in the towers' 16-bit dtype or in FP8.

16-bit: FlashAttention 3's varlen kernel on CUDA; on the CPU an exact per-sequence SDPA.

FP8 (a deployment's opt-in, `serve --generator-attention fp8`): at 720p and 189 frames attention is about two
thirds of a tower forward, and FP8 GEMMs leave it as it is. A layer's queries, keys and values go to float8 e4m3
with one dynamic scale each (their largest magnitude over the batch maps to e4m3's largest value) and FA3's FP8
kernel runs (Hopper and later), its output in the 16-bit dtype. The scales stay on the device: no host sync, and
CUDA graphs capture them. Where FA3's FP8 path does not run (the CPU, older GPUs) the quantization is emulated:
the inputs rounded to e4m3 and back, then exact attention in float32. The emulation leaves out what FA3 also
rounds (its softmax probabilities go to e4m3 for the second GEMM), so the GPU's error is somewhat larger;
tests/gpu bounds it against 16-bit attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from cosmos3_serve.model_executor.generator import PackedAttention

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max


def varlen_attention(q_nhd: torch.Tensor, keys_nhd: torch.Tensor, values_nhd: torch.Tensor, layout: PackedAttention,
                     fp8: bool = False) -> torch.Tensor:  # fmt: skip
    """`[Nq, heads, head_dim]` in q's dtype: each sequence's queries (rows `cu_seqlens_q`) over its keys and values
    (rows `cu_seqlens_k`); with `fp8`, its inputs in e4m3."""
    if fp8:
        return _fp8_attention(q_nhd, keys_nhd, values_nhd, layout)
    if q_nhd.is_cuda:
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q_nhd, keys_nhd, values_nhd, max_seqlen_q=layout.max_seqlen_q, cu_seqlens_q=layout.cu_seqlens_q,
            max_seqlen_k=layout.max_seqlen_k, cu_seqlens_k=layout.cu_seqlens_k, causal=False, fa_version=3,
        )  # fmt: skip
    return _exact(q_nhd, keys_nhd, values_nhd, layout)


def quantize_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x_fp8, scale)` with `x ~= x_fp8 * scale`: e4m3 with one dynamic scale, a float32 scalar on x's device."""
    if x.is_cuda:
        from vllm import _custom_ops as ops

        x_fp8, scale = ops.scaled_fp8_quant(x.reshape(x.shape[0], -1))
        return x_fp8.view(x.shape), scale.reshape(())
    low, high = torch.aminmax(x)
    scale = (torch.maximum(high, -low).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fa3_runs_fp8(device: torch.device) -> bool:
    """FA3's FP8 kernel is built for Hopper (compute capability 9.0) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _fp8_attention(q_nhd: torch.Tensor, keys_nhd: torch.Tensor, values_nhd: torch.Tensor,
                   layout: PackedAttention) -> torch.Tensor:  # fmt: skip
    (q8, q_scale), (k8, k_scale), (v8, v_scale) = (quantize_per_tensor(t) for t in (q_nhd, keys_nhd, values_nhd))
    if fa3_runs_fp8(q_nhd.device):
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        descale_shape = (layout.cu_seqlens_q.shape[0] - 1, keys_nhd.shape[1])  # [sequences, kv heads]
        out = flash_attn_varlen_func(
            q8, k8, v8, max_seqlen_q=layout.max_seqlen_q, cu_seqlens_q=layout.cu_seqlens_q,
            max_seqlen_k=layout.max_seqlen_k, cu_seqlens_k=layout.cu_seqlens_k, causal=False, fa_version=3,
            q_descale=q_scale.expand(descale_shape), k_descale=k_scale.expand(descale_shape),
            v_descale=v_scale.expand(descale_shape),
        )  # fmt: skip
        return out.to(q_nhd.dtype)
    dequantized = (q8.float() * q_scale, k8.float() * k_scale, v8.float() * v_scale)
    return _exact(*dequantized, layout).to(q_nhd.dtype)


def _exact(q_nhd: torch.Tensor, keys_nhd: torch.Tensor, values_nhd: torch.Tensor,
           layout: PackedAttention) -> torch.Tensor:  # fmt: skip
    """Per-sequence SDPA (the CPU's path)."""
    out = torch.empty_like(q_nhd)
    cu_q, cu_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        q_i, k_i, v_i = (t.transpose(0, 1) for t in (q_nhd[cu_q[i] : cu_q[i + 1]], keys_nhd[cu_k[i] : cu_k[i + 1]],
                                                     values_nhd[cu_k[i] : cu_k[i + 1]]))  # fmt: skip
        out[cu_q[i] : cu_q[i + 1]] = F.scaled_dot_product_attention(q_i, k_i, v_i, enable_gqa=True).transpose(0, 1)
    return out
