"""The batch-1 decode kernels of `model_executor/decode_kernels.py` on CPU.

Each Triton kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, set in a subprocess so it stays there)
against plain torch math, and for mRoPE against vLLM's own `MRotaryEmbedding.forward_native`: float32 within
float32 rounding, float16 within a few float16 roundings (the interpreter rounds bfloat16 by truncation, so
bfloat16 is left to tests/gpu/test_decode_kernels_gpu.py). The custom ops' unfused path (what M > 1 and CPU
tensors take) is checked in this process against the same math.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tests.triton_interpreter import run_interpreted

EPS = 1e-6
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}  # relative L2 error to the float64 / float32 reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, case: str = "") -> None:
    error = (actual.double() - expected.double()).norm() / expected.double().norm()
    assert error <= REL_TOL[dtype], f"{case}: relative error {error:.2e} > {REL_TOL[dtype]:.0e}"


def test_kernels_under_triton_interpreter() -> None:
    run_interpreted(__name__, "run_interpreted_checks")


def run_interpreted_checks() -> None:
    """Entry point of the interpreter subprocess."""
    from cosmos3_serve.model_executor import decode_kernels

    torch.manual_seed(0)
    small_blocks = ((0, (8, 64, 4)),)  # K loops of several steps
    for tables in ((decode_kernels.GEMV_BLOCKS, decode_kernels.NORM_GEMV_BLOCKS), (small_blocks, small_blocks)):
        decode_kernels.GEMV_BLOCKS, decode_kernels.NORM_GEMV_BLOCKS = tables
        for dtype in (torch.float32, torch.float16):
            for n, k in ((64, 256), (50, 200)):  # even; N and K not multiples of the blocks
                check_gemv_kernels(decode_kernels, n, k, dtype)
    for dtype in (torch.float32, torch.float16):
        for interleaved in (True, False):
            check_qk_norm_mrope_kernel(decode_kernels, dtype, interleaved)
        for num_tokens, k in ((3, 256), (2, 200)):
            check_add_rms_norm_rows(decode_kernels, num_tokens, k, dtype)


def check_add_rms_norm_rows(decode_kernels, num_tokens: int, k: int, dtype: torch.dtype) -> None:
    """M > 1 on CUDA: the residual add and RMSNorm of every row in one kernel."""
    x, residual = torch.randn(num_tokens, k, dtype=dtype), torch.randn(num_tokens, k, dtype=dtype)
    weight = torch.randn(k, dtype=dtype)
    out, residual_out = decode_kernels.add_rms_norm_rows(x, residual, weight, EPS)
    assert torch.equal(residual_out, x + residual), (num_tokens, k, dtype)
    assert_close(out, rms_norm_reference(x + residual, weight), dtype, f"add_rms_norm_rows M={num_tokens} K={k}")


def check_gemv_kernels(decode_kernels, n: int, k: int, dtype: torch.dtype) -> None:
    x, residual, norm_weight = (torch.randn(1, k, dtype=dtype) for _ in range(3))
    norm_weight = norm_weight[0]
    weight = torch.randn(n, k, dtype=dtype)
    blocks = decode_kernels.gemv_blocks(n, k), decode_kernels.gemv_blocks(n, k, rms_norm=True)
    case = f"N={n} K={k} {dtype} blocks {blocks}"

    y, residual_out = decode_kernels.gemv(x, weight)
    assert residual_out is None
    assert_close(y, x.double() @ weight.double().T, dtype, case)

    y, _ = decode_kernels.gemv(x, weight, norm_weight=norm_weight, eps=EPS)
    assert_close(y, rms_norm_reference(x, norm_weight) @ weight.double().T, dtype, case)

    y, residual_out = decode_kernels.gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=EPS)
    assert torch.equal(residual_out, x + residual), case
    assert_close(y, rms_norm_reference(x + residual, norm_weight) @ weight.double().T, dtype, case)

    # gate_up_proj: weight [gate; up] of 2n rows, SiluAndMul of the GEMV's output in the epilogue
    gate_up_weight = torch.randn(2 * n, k, dtype=dtype)
    y, residual_out = decode_kernels.gemv(x, gate_up_weight, residual, norm_weight, EPS, silu_mul=True)
    gate_up = (rms_norm_reference(x + residual, norm_weight) @ gate_up_weight.double().T).to(dtype).float()
    assert torch.equal(residual_out, x + residual), case
    assert_close(y, F.silu(gate_up[:, :n]) * gate_up[:, n:], dtype, case)


def check_qk_norm_mrope_kernel(decode_kernels, dtype: torch.dtype, interleaved: bool) -> None:
    """The tiny checkpoint's attention shape with 6 query heads (not a power of two), q and k as strided views of
    qkv, positions as a slice of a wider buffer like vLLM's persistent one, with and without q / k norm, 3 x T and
    1-D positions."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    head_dim, num_q_heads, num_k_heads, section, num_tokens = 64, 6, 2, [12, 10, 10], 3
    rope_parameters = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": section,
                       "mrope_interleaved": interleaved}  # fmt: skip
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(head_dim, max_position=1024, is_neox_style=True, rope_parameters=rope_parameters,
                        dtype=torch.float32)  # fmt: skip
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, dtype=dtype)
    q, k, _ = qkv.split([num_q_heads * head_dim, num_k_heads * head_dim, num_k_heads * head_dim], dim=-1)
    q_norm, k_norm = torch.randn(head_dim, dtype=dtype), torch.randn(head_dim, dtype=dtype)

    def per_head(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        heads = x.float().view(num_tokens, -1, head_dim)
        return (heads if weight is None else rms_norm_reference(heads, weight).float()).view(num_tokens, -1)

    mrope_positions = torch.randint(0, 4096, (3, 2 * num_tokens))[:, :num_tokens]
    for positions in (mrope_positions, torch.randint(0, 4096, (num_tokens,))):
        for q_weight, k_weight in ((q_norm, k_norm), (None, None)):
            case = f"{dtype} interleaved={interleaved} positions {tuple(positions.shape)} norm={q_weight is not None}"
            expected_q, expected_k = rope.forward_native(positions, per_head(q, q_weight), per_head(k, k_weight))
            actual_q, actual_k = decode_kernels.qk_norm_mrope(
                positions, q, k, q_weight, k_weight, EPS, rope.cos_sin_cache, head_dim, section, interleaved
            )
            assert actual_q.shape == q.shape and actual_k.shape == k.shape and actual_q.is_contiguous(), case
            assert_close(actual_q, expected_q, dtype, case)
            assert_close(actual_k, expected_k, dtype, case)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_ops_unfused_path_on_cpu(num_tokens: int) -> None:
    """CPU tensors take the unfused math of every GEMV op, for one token as for several."""
    from cosmos3_serve.model_executor import decode_kernels  # noqa: F401  (registers the ops)

    torch.manual_seed(1)
    n, k = 48, 32
    x, residual = torch.randn(num_tokens, k), torch.randn(num_tokens, k)
    norm_weight, weight = torch.randn(k), torch.randn(n, k)
    ops = torch.ops.vllm

    assert_close(ops.cosmos3_batch1_linear(x, weight, None), x @ weight.T, torch.float32)
    assert_close(ops.cosmos3_rms_norm_linear(x, norm_weight, EPS, weight),
                 rms_norm_reference(x, norm_weight) @ weight.double().T, torch.float32)  # fmt: skip
    y, residual_out = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, weight, False)
    assert torch.equal(residual_out, x + residual)
    assert_close(y, rms_norm_reference(x + residual, norm_weight) @ weight.double().T, torch.float32)
    y, residual_out = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, weight, True)
    gate_up = rms_norm_reference(x + residual, norm_weight) @ weight.double().T
    assert torch.equal(residual_out, x + residual)
    assert_close(y, F.silu(gate_up[:, : n // 2]) * gate_up[:, n // 2 :], torch.float32)
