"""Triton kernels for the reasoner's single-token (batch-1) decode step, each behind a vLLM custom op.

Custom ops are opaque to torch.compile, whose one graph serves every batch size, so each op decides where it runs:
at CUDA-graph capture, or per call outside graphs. A single bf16 / fp16 row on CUDA (M = 1) takes the Triton GEMV
with the op's prologue; any other input (M > 1, CPU, a bias, mismatched dtypes) takes the unfused math: on CUDA
the residual add + RMSNorm as one Triton kernel (`add_rms_norm_rows`), vLLM's C `rms_norm` / `silu_and_mul` and
`F.linear`; vLLM's reference ops elsewhere.

- `cosmos3_batch1_linear`: y = W x.
- `cosmos3_rms_norm_linear`, `cosmos3_add_rms_norm_linear`: vLLM's `RMSNorm` (with residual: residual_out =
  x + residual, h = rmsnorm(residual_out) * g) fused into the prologue of the next GEMV: y = W h = inv_rms * W (z * g)
  where z is x or residual_out; the sum of squares of z is accumulated in the GEMV's own K loop, and program 0
  stores residual_out.
  With `silu_mul` (gate_up_proj), vLLM's `SiluAndMul` runs in the GEMV's epilogue: each program multiplies
  matching gate and up rows, and down_proj reads the activation [I] (a prologue in down_proj's GEMV would compute
  each sigmoid once per program: slower than the separate kernel on an H200).
- On Hopper and later the GEMVs (and `decode_attention`'s kernel) are programmatic dependent launches: the next
  kernel launches once every program of this one has started, takes the SMs this one's programs leave and loads
  what does not depend on this one (a GEMV its first weight tile) before it waits for it (`gdc_wait`).
  `COSMOS3_DISABLE_PDL=1` turns that off.
- `cosmos3_qk_norm_mrope`: per-head q / k RMSNorm and neox-style mRoPE (3 x T positions, sectioned or interleaved
  like vLLM's `MRotaryEmbedding`) in one kernel, one program per token, for any number of tokens.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from vllm import _custom_ops as vllm_ops  # loads vLLM's C kernels (torch.ops._C)
from vllm import ir
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.triton_utils import tl, triton
from vllm.utils.torch_utils import direct_register_custom_op

HALF_DTYPES = (torch.bfloat16, torch.float16)

# (rows per program, K per loop step, warps) by weight rows, the fastest on an H200 for the 8B reasoner's shapes
# (lm_head, gate_up_proj, qkv_proj, o_proj and down_proj); the first entry whose bound is <= the rows applies.
# `bench/decode_gemv.py` sweeps them (docs/benchmarks.md).
GEMV_BLOCKS = ((65536, (16, 512, 4)), (16384, (4, 1024, 4)), (4097, (8, 512, 4)), (0, (16, 1024, 8)))
# The same with the RMSNorm prologue (qkv_proj, gate_up_proj), whose programs also load the residual and the norm
# weight: gate_up wants more rows per program to share those loads. H200, weights streamed from HBM: qkv 14.2 us
# (unfused C add + RMSNorm and GEMV 15.6, the GEMV alone 13.7); gate_up with SiLU-mul 49.1 (unfused 52.9, 47.2).
NORM_GEMV_BLOCKS = ((16384, (32, 128, 4)), (4097, (8, 512, 4)), (0, (16, 512, 4)))


@triton.jit
def _load_k(ptr, offsets, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        values = tl.load(ptr + offsets)
    else:
        values = tl.load(ptr + offsets, mask=offsets < K, other=0.0)
    return values


@triton.jit
def _gemv_tile(
    acc, sum_sq, w, x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, ks, K, pid,
    RMS_NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One K step of `_gemv_kernel`: the activation at columns ks (with its prologue) times the weight tile w
    [BLOCK_N, BLOCK_K], added to acc; the sum of squares of z added to sum_sq."""
    a = _load_k(x_ptr, ks, K, EVEN_K).to(tl.float32)
    if ADD_RESIDUAL:
        z = (a + _load_k(residual_ptr, ks, K, EVEN_K).to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + ks, z, mask=ks < tl.where(pid == 0, K, 0))
        a = z.to(tl.float32)
    if RMS_NORM:
        sum_sq += a * a
        a = a * _load_k(norm_weight_ptr, ks, K, EVEN_K).to(tl.float32)
    return acc + w.to(tl.float32) * a[None, :], sum_sq


@triton.jit
def _load_w(w_ptrs, k, row_outputs, ks, N, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    """The weight tile [BLOCK_N, BLOCK_K] at column k, each weight read once per token (evict first)."""
    if EVEN_N and EVEN_K:
        w = tl.load(w_ptrs + k, eviction_policy="evict_first")
    else:
        w_mask = (row_outputs[:, None] < N) & (ks[None, :] < K)
        w = tl.load(w_ptrs + k, mask=w_mask, other=0.0, eviction_policy="evict_first")
    return w


@triton.jit
def _gemv_kernel(
    x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, w_ptr, y_ptr, N, K, stride_w, eps,
    RMS_NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y[outputs] = w[rows, :K] @ a for this program's BLOCK_N rows, N outputs in all. The activation a[:K] is x,
    or (RMS_NORM) z * norm_weight with the result scaled by rsqrt(mean(z^2) + eps), z = x or (ADD_RESIDUAL)
    x + residual rounded to x's dtype, stored by program 0 to residual_out. SILU_MUL: w is [gate; up] (2N rows),
    the program's rows are BLOCK_N / 2 (gate, up) pairs and y = silu(gate) * up, each rounded to y's dtype.
    PDL (launched as a programmatic dependent launch): the next kernel may launch as soon as every program here
    has started, and this one's first weight tile is loaded before it waits for the kernel before it (whose
    outputs x and residual it reads, and whose inputs it may overwrite, only after the wait)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if SILU_MUL:  # local row 2i is gate row `outputs[i]`, 2i + 1 the up row N + outputs[i]
        local = tl.arange(0, BLOCK_N)
        row_outputs = pid * (BLOCK_N // 2) + local // 2
        rows = row_outputs + (local % 2) * N
    else:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_outputs = rows
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    sum_sq = tl.zeros((BLOCK_K,), tl.float32)
    # The weights first: their loads are in flight while the activation's are made (~10 % faster on an H200).
    w = _load_w(w_ptrs, 0, row_outputs, cols, N, K, EVEN_N, EVEN_K)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before this one has finished; its writes are visible
    acc, sum_sq = _gemv_tile(acc, sum_sq, w, x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, cols, K, pid,
                             RMS_NORM, ADD_RESIDUAL, EVEN_K)  # fmt: skip
    for k in range(BLOCK_K, K, BLOCK_K):
        ks = k + cols
        w = _load_w(w_ptrs, k, row_outputs, ks, N, K, EVEN_N, EVEN_K)
        acc, sum_sq = _gemv_tile(acc, sum_sq, w, x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, ks, K,
                                 pid, RMS_NORM, ADD_RESIDUAL, EVEN_K)  # fmt: skip
    y = tl.sum(acc, 1)
    if RMS_NORM:
        y = y * tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
    if SILU_MUL:
        gate, up = tl.split(tl.reshape(y.to(y_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N // 2, 2)))
        y = gate * tl.sigmoid(gate) * up
        outputs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    else:
        outputs = rows
    if EVEN_N:
        tl.store(y_ptr + outputs, y.to(y_ptr.dtype.element_ty))
    else:
        tl.store(y_ptr + outputs, y.to(y_ptr.dtype.element_ty), mask=outputs < N)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, K, eps, BLOCK_K: tl.constexpr):
    """Row `program_id` of [M, K]: residual_out = x + residual rounded to its dtype, out = rmsnorm(residual_out)
    rounded, times weight (vLLM's `fused_add_rms_norm`, out of place)."""
    offsets = tl.program_id(0).to(tl.int64) * K + tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_K)
    mask = cols < K
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = (z + tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + offsets, z, mask=mask)
    z = z.to(tl.float32)
    normed = (z * tl.rsqrt(tl.sum(z * z, 0) / K + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = normed * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_rows(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_add_rms_norm_kernel` over contiguous rows x, residual [M, K]: (rmsnorm(x + residual) * weight, x + residual)
    in one kernel, where vLLM's C kernel works in place."""
    k = x.shape[-1]
    out, residual_out = x.new_empty(x.shape), x.new_empty(x.shape)
    block = _next_power_of_2(k)
    _add_rms_norm_kernel[(x.numel() // k,)](x, residual, weight, out, residual_out, k, eps, BLOCK_K=block,
                                            num_warps=min(max(block // 512, 1), 16))  # fmt: skip
    return out, residual_out


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def gemv_blocks(n: int, k: int, rms_norm: bool = False) -> tuple[int, int, int]:
    """(rows per program, K per loop step, warps) of an [n, k] weight: `GEMV_BLOCKS` (`NORM_GEMV_BLOCKS` with the
    RMSNorm prologue), clipped to small shapes."""
    table = NORM_GEMV_BLOCKS if rms_norm else GEMV_BLOCKS
    rows, step, warps = next(blocks for bound, blocks in table if n >= bound)
    return min(rows, _next_power_of_2(n)), min(step, _next_power_of_2(k)), warps


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch `_gemv_kernel` on one row x [1, K] and weight [N, K] -> (y [1, N] ([1, N / 2] with `silu_mul`:
    silu(y[:N / 2]) * y[N / 2:]), residual_out [1, K] if `residual` else None). `norm_weight` turns on the RMSNorm
    prologue."""
    n, k = weight.shape
    rows, step, warps = gemv_blocks(n, k, rms_norm=norm_weight is not None)
    pdl = programmatic_launch(x.device)
    outputs, outputs_per_program = (n // 2, rows // 2) if silu_mul else (n, rows)
    y = x.new_empty(*x.shape[:-1], outputs)
    residual_out = None if residual is None else x.new_empty(x.shape)
    _gemv_kernel[(triton.cdiv(outputs, outputs_per_program),)](
        x, x if residual is None else residual, x if norm_weight is None else norm_weight,
        x if residual_out is None else residual_out, weight, y, outputs, k, weight.stride(0), eps,
        RMS_NORM=norm_weight is not None, ADD_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        BLOCK_N=rows, BLOCK_K=step, EVEN_N=outputs % outputs_per_program == 0, EVEN_K=k % step == 0,
        PDL=pdl, num_warps=warps, num_stages=1, **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return y, residual_out


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch as programmatic dependent launches (PDL): on Hopper and later, unless
    `COSMOS3_DISABLE_PDL=1`. Read at each launch, so a CUDA graph keeps what held at its capture."""
    return device.type == "cuda" and _supports_programmatic_launch(device.index or 0)


@functools.cache
def _supports_programmatic_launch(device_index: int) -> bool:
    return os.environ.get("COSMOS3_DISABLE_PDL", "0") != "1" and torch.cuda.get_device_capability(device_index)[0] >= 9


def _is_gemv_row(x: torch.Tensor, width: int, weight: torch.Tensor) -> bool:
    """Whether x is a single contiguous bf16 / fp16 CUDA row of `width` elements for `weight`'s dtype and layout."""
    return (x.is_cuda and x.numel() == width and x.is_contiguous() and x.dtype in HALF_DTYPES
            and weight.dtype == x.dtype and weight.stride(1) == 1)  # fmt: skip


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not x.is_cuda:
        return ir.ops.rms_norm(x, weight, eps)
    out = x.new_empty(x.shape)
    vllm_ops.rms_norm(out, x, weight, eps)
    return out


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual) * weight, x + residual), out of place."""
    if not x.is_cuda:
        return ir.ops.fused_add_rms_norm(x, residual, weight, eps)
    if x.is_contiguous() and residual.is_contiguous() and x.dtype == residual.dtype == weight.dtype:
        return add_rms_norm_rows(x, residual, weight, eps)
    residual_out = x + residual
    return _rms_norm(residual_out, weight, eps), residual_out


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        return SiluAndMul.forward_native(x)
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    torch.ops._C.silu_and_mul(out, x)
    return out


def batch1_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`."""
    if bias is not None or not _is_gemv_row(x, weight.shape[1], weight):
        return F.linear(x, weight, bias)
    return gemv(x, weight)[0]


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(rmsnorm(x) * norm_weight, weight)`: x [M, K], weight [N, K] -> [M, N]."""
    if not _is_gemv_row(x, weight.shape[1], weight):
        return F.linear(_rms_norm(x, norm_weight, eps), weight)
    return gemv(x, weight, norm_weight=norm_weight, eps=eps)[0]


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    silu_mul: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x + residual) with y = `F.linear(rmsnorm(x + residual) * norm_weight, weight)`, then with `silu_mul`
    vLLM's `SiluAndMul` of y: x, residual [M, K], weight [N, K] -> [M, N] ([M, N / 2]), [M, K]."""
    if not _is_gemv_row(x, weight.shape[1], weight) or not _is_gemv_row(residual, weight.shape[1], weight):
        h, residual_out = _add_rms_norm(x, residual, norm_weight, eps)
        y = F.linear(h, weight)
        return _silu_mul(y) if silu_mul else y, residual_out
    return gemv(x, weight, residual=residual, norm_weight=norm_weight, eps=eps, silu_mul=silu_mul)


@triton.jit
def mrope_cos_sin(
    positions_ptr, cos_sin_ptr, token, stride_positions, stride_cos_sin,
    HEAD_DIM: tl.constexpr, SECTION_T: tl.constexpr, SECTION_H: tl.constexpr, SECTION_W: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    """(cos, sin) [HEAD_DIM / 2] fp32 of `token`: each rotary frequency at the position of its section (T, H or W;
    row `section * stride_positions` of positions, 0 for 1-D positions)."""
    freq = tl.arange(0, HEAD_DIM // 2)
    if INTERLEAVED:  # T H W T H W ... T T: frequency i is H if i % 3 == 1 and i < 3 * H, W likewise, else T
        is_h = (freq % 3 == 1) & (freq < 3 * SECTION_H)
        is_w = (freq % 3 == 2) & (freq < 3 * SECTION_W)
        section = tl.where(is_h, 1, tl.where(is_w, 2, 0))
    else:  # T ... T H ... H W ... W
        section = tl.where(freq < SECTION_T, 0, tl.where(freq < SECTION_T + SECTION_H, 1, 2))
    position = tl.load(positions_ptr + section.to(tl.int64) * stride_positions + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + freq).to(tl.float32)
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HEAD_DIM // 2 + freq).to(tl.float32)
    return cos, sin


@triton.jit
def norm_rope(x1, x2, norm_weight_ptr, cos, sin, eps, HEAD_DIM: tl.constexpr, RMS_NORM: tl.constexpr):
    """Heads [H, HEAD_DIM] given as fp32 halves x1, x2 [H, HEAD_DIM / 2]: per-head RMSNorm times the norm weight
    (RMS_NORM), then neox rotation by cos, sin [HEAD_DIM / 2]; the rotated halves, fp32."""
    half = tl.arange(0, HEAD_DIM // 2)
    if RMS_NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        x1 = x1 * inv_rms * tl.load(norm_weight_ptr + half).to(tl.float32)[None, :]
        x2 = x2 * inv_rms * tl.load(norm_weight_ptr + HEAD_DIM // 2 + half).to(tl.float32)[None, :]
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _norm_rope_heads(
    in_ptr, out_ptr, norm_weight_ptr, stride_in, token, cos, sin, eps,
    NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, RMS_NORM: tl.constexpr,
):  # fmt: skip
    """Normalize and rotate one token's NUM_HEADS heads of in_ptr's row into out_ptr's (contiguous) row."""
    heads = tl.arange(0, BLOCK_HEADS)
    half = tl.arange(0, HEAD_DIM // 2)
    mask = (heads < NUM_HEADS)[:, None]
    offsets = heads[:, None] * HEAD_DIM + half[None, :]
    row = in_ptr + token.to(tl.int64) * stride_in
    x1 = tl.load(row + offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HEAD_DIM // 2 + offsets, mask=mask, other=0.0).to(tl.float32)
    x1, x2 = norm_rope(x1, x2, norm_weight_ptr, cos, sin, eps, HEAD_DIM, RMS_NORM)
    out = out_ptr + token.to(tl.int64) * (NUM_HEADS * HEAD_DIM)
    dtype = out_ptr.dtype.element_ty
    tl.store(out + offsets, x1.to(dtype), mask=mask)
    tl.store(out + HEAD_DIM // 2 + offsets, x2.to(dtype), mask=mask)


@triton.jit(do_not_specialize=["stride_positions"])
def _qk_norm_mrope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_norm_ptr, k_norm_ptr, cos_sin_ptr, positions_ptr,
    stride_q, stride_k, stride_positions, stride_cos_sin, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, SECTION_T: tl.constexpr, SECTION_H: tl.constexpr, SECTION_W: tl.constexpr,
    INTERLEAVED: tl.constexpr, RMS_NORM: tl.constexpr,
):  # fmt: skip
    """One token per program: its mRoPE cos / sin, then q's and k's heads."""
    token = tl.program_id(0)
    cos, sin = mrope_cos_sin(positions_ptr, cos_sin_ptr, token, stride_positions, stride_cos_sin, HEAD_DIM,
                             SECTION_T, SECTION_H, SECTION_W, INTERLEAVED)  # fmt: skip
    _norm_rope_heads(q_ptr, q_out_ptr, q_norm_ptr, stride_q, token, cos, sin, eps,
                     NUM_Q_HEADS, BLOCK_Q_HEADS, HEAD_DIM, RMS_NORM)  # fmt: skip
    _norm_rope_heads(k_ptr, k_out_ptr, k_norm_ptr, stride_k, token, cos, sin, eps,
                     NUM_K_HEADS, BLOCK_K_HEADS, HEAD_DIM, RMS_NORM)  # fmt: skip


def qk_norm_mrope(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
    mrope_section: list[int],
    mrope_interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) after per-head RMSNorm (skipped when the weights are None) and neox-style mRoPE, new contiguous
    tensors. positions [3, T] (or [T]), q [T, Hq * D], k [T, Hk * D] (rows may be strided, e.g. views of qkv),
    cos_sin_cache [max_position, D] (cos | sin, rotary dim = head dim D), mrope_section (T, H, W) sums to D / 2."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    q_out, k_out = q.new_empty(q.shape), k.new_empty(k.shape)
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return q_out, k_out
    num_q_heads, num_k_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    rms_norm = q_norm_weight is not None
    section_t, section_h, section_w = mrope_section
    _qk_norm_mrope_kernel[(num_tokens,)](
        q, k, q_out, k_out, q_norm_weight if rms_norm else q, k_norm_weight if rms_norm else k, cos_sin_cache,
        positions, q.stride(0), k.stride(0), positions.stride(0) if positions.dim() == 2 else 0,
        cos_sin_cache.stride(0), eps, NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
        BLOCK_Q_HEADS=_next_power_of_2(num_q_heads), BLOCK_K_HEADS=_next_power_of_2(num_k_heads), HEAD_DIM=head_dim,
        SECTION_T=section_t, SECTION_H=section_h, SECTION_W=section_w, INTERLEAVED=mrope_interleaved,
        RMS_NORM=rms_norm, num_warps=4,
    )  # fmt: skip
    return q_out, k_out


# Output shapes for torch.compile's tracing (the ops' fake implementations).
def _linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _rms_norm_linear_shape(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _add_rms_norm_linear_shape(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    silu_mul: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    return x.new_empty(*x.shape[:-1], outputs), x.new_empty(x.shape)


def _qk_norm_mrope_shape(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *rest) -> tuple[torch.Tensor, ...]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


direct_register_custom_op("cosmos3_batch1_linear", batch1_linear, fake_impl=_linear_shape)
direct_register_custom_op("cosmos3_rms_norm_linear", rms_norm_linear, fake_impl=_rms_norm_linear_shape)
direct_register_custom_op("cosmos3_add_rms_norm_linear", add_rms_norm_linear, fake_impl=_add_rms_norm_linear_shape)
direct_register_custom_op("cosmos3_qk_norm_mrope", qk_norm_mrope, fake_impl=_qk_norm_mrope_shape)
