"""The batch-1 decode kernels (`model_executor/decode_kernels.py`) on a CUDA GPU, and the reasoner with and without
the fused decoder layers. Skipped without CUDA; run on the GPU machine with `COSMOS3_TEST_CHECKPOINT` set.

- Each fused op at M = 1 on the 8B reasoner's shapes in bf16 against the unfused path (vLLM's C RMSNorm / SiLU-mul
  kernels and cuBLAS, vLLM's `MRotaryEmbedding.forward_native`), within `BF16_REL_TOL`; the ops at M > 1 (their
  unfused path) likewise; the M = 1 ops replayed in a CUDA graph equal to their eager results.
- The tiny checkpoint's greedy tokens with the fused decoder layers (one request at a time: M = 1 decode in CUDA
  graphs; and all at once) equal those of the same engine without them, each engine in its own process:

      python -m tests.gpu.test_decode_kernels_gpu CKPT fused|unfused OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.greedy_probe import assert_same_greedy_up_to_ties, greedy_outputs, probe_engine, run_probe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ||fused - unfused|| / ||unfused||, both bf16. The unfused path rounds the normalized / activated input to bf16
# before its GEMV, the fused one does not: a few 1e-3 of relative difference; a wrong index gives O(1).
BF16_REL_TOL = 1e-2
HIDDEN, INTERMEDIATE, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 12288, 32, 8, 128
QKV_ROWS = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
MROPE_SECTION = [24, 20, 20]
EPS = 1e-6


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


def _unfused_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from vllm import _custom_ops

    out = torch.empty_like(x)
    _custom_ops.rms_norm(out, x.contiguous(), weight, EPS)
    return out


@pytest.fixture(scope="module")
def ops():
    from cosmos3_serve.model_executor import decode_kernels  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    return torch.ops.vllm


@pytest.mark.parametrize("num_tokens", [1, 4])
@pytest.mark.parametrize("rows", [QKV_ROWS, 2 * INTERMEDIATE])  # qkv_proj, gate_up_proj without SiLU-mul
def test_rms_norm_linear(ops, rows: int, num_tokens: int) -> None:
    x, residual, norm_weight = _randn(num_tokens, HIDDEN), _randn(num_tokens, HIDDEN), _randn(HIDDEN)
    weight = _randn(rows, HIDDEN, scale=0.02)

    y, residual_out = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, weight, False)
    assert torch.equal(residual_out, x + residual)
    assert _relative_error(y, _unfused_rms_norm(x + residual, norm_weight) @ weight.T) <= BF16_REL_TOL

    y = ops.cosmos3_rms_norm_linear(x, norm_weight, EPS, weight)  # the first layer: no residual yet
    assert _relative_error(y, _unfused_rms_norm(x, norm_weight) @ weight.T) <= BF16_REL_TOL


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_rms_norm_linear_silu_mul(ops, num_tokens: int) -> None:
    x, residual, norm_weight = _randn(num_tokens, HIDDEN), _randn(num_tokens, HIDDEN), _randn(HIDDEN)
    weight = _randn(2 * INTERMEDIATE, HIDDEN, scale=0.02)  # gate_up_proj: [gate; up]
    activation = torch.empty(num_tokens, INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
    torch.ops._C.silu_and_mul(activation, _unfused_rms_norm(x + residual, norm_weight) @ weight.T)

    y, residual_out = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, weight, True)
    assert torch.equal(residual_out, x + residual)
    assert _relative_error(y, activation) <= BF16_REL_TOL


@pytest.mark.parametrize("rows, columns", [(HIDDEN, HIDDEN), (151936, HIDDEN)])  # o_proj, lm_head
def test_batch1_linear(ops, rows: int, columns: int) -> None:
    x, weight = _randn(1, columns), _randn(rows, columns, scale=0.02)
    assert _relative_error(ops.cosmos3_batch1_linear(x, weight, None), x @ weight.T) <= BF16_REL_TOL


@pytest.fixture(scope="module")
def mrope():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    rope_parameters = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": MROPE_SECTION,
                       "mrope_interleaved": True}  # fmt: skip
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(HEAD_DIM, max_position=4096, is_neox_style=True, rope_parameters=rope_parameters,
                        dtype=torch.bfloat16)  # fmt: skip
    return rope.to("cuda")


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_mrope(ops, mrope, num_tokens: int, qk_norm: bool) -> None:
    q_size, kv_size = NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    q, k, _ = _randn(num_tokens, q_size + 2 * kv_size).split([q_size, kv_size, kv_size], dim=-1)
    q_norm, k_norm = (_randn(HEAD_DIM), _randn(HEAD_DIM)) if qk_norm else (None, None)
    # 3 x T positions as a slice of a wider buffer (vLLM's persistent one), T / H / W apart to tell the sections
    positions = torch.stack([torch.arange(100, 100 + num_tokens), torch.arange(7, 7 + num_tokens) * 3,
                             torch.arange(11, 11 + num_tokens) * 5])  # fmt: skip
    positions = torch.cat([positions, positions], dim=1).cuda()[:, :num_tokens]

    def unfused_norm(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return x if weight is None else _unfused_rms_norm(x.reshape(-1, HEAD_DIM), weight).reshape(x.shape)

    expected_q, expected_k = mrope.forward_native(positions, unfused_norm(q, q_norm), unfused_norm(k, k_norm))
    actual_q, actual_k = ops.cosmos3_qk_norm_mrope(positions, q, k, q_norm, k_norm, EPS, mrope.cos_sin_cache,
                                                   HEAD_DIM, MROPE_SECTION, True)  # fmt: skip
    assert _relative_error(actual_q, expected_q) <= BF16_REL_TOL
    assert _relative_error(actual_k, expected_k) <= BF16_REL_TOL


def test_fused_ops_replay_in_cuda_graph(ops, mrope) -> None:
    x, residual, norm_weight = _randn(1, HIDDEN), _randn(1, HIDDEN), _randn(HIDDEN)
    qkv_weight = _randn(QKV_ROWS, HIDDEN, scale=0.02)
    gate_up_weight = _randn(2 * INTERMEDIATE, HIDDEN, scale=0.02)
    positions = torch.tensor([[9], [4], [6]], device="cuda")

    def step() -> tuple[torch.Tensor, ...]:
        qkv, residual_out = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, qkv_weight, False)
        q, k, _ = qkv.split([NUM_Q_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
        q, k = ops.cosmos3_qk_norm_mrope(positions, q, k, norm_weight[:HEAD_DIM], norm_weight[:HEAD_DIM], EPS,
                                         mrope.cos_sin_cache, HEAD_DIM, MROPE_SECTION, True)  # fmt: skip
        activation, _ = ops.cosmos3_add_rms_norm_linear(x, residual, norm_weight, EPS, gate_up_weight, True)
        return residual_out, q, k, activation

    eager = step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.mul_(0.5)  # the graph reads its inputs' memory at each replay
    graph.replay()
    changed = step()
    for ours, theirs, before in zip(captured, changed, eager):
        assert torch.equal(ours, theirs) and not torch.equal(ours, before)


def test_greedy_tokens_with_and_without_fused_layers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fused = run_probe(__name__, tiny_checkpoint, "fused", tmp_path)
    unfused = run_probe(__name__, tiny_checkpoint, "unfused", tmp_path)
    assert fused["fused_layers"] == fused["num_layers"] > 0 and unfused["fused_layers"] == 0
    assert_same_greedy_up_to_ties(fused, unfused)


def main() -> None:
    """The probe: one engine with or without the fused decoder layers, its greedy outputs."""
    from cosmos3_serve.model_executor import reasoner

    checkpoint, variant, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if variant == "unfused":
        reasoner.use_batch1_decoder_layers = lambda language_model, attention=True: None
    llm = probe_engine(checkpoint)

    def count_layers(worker) -> tuple[int, int]:
        layers = worker.model_runner.get_model().language_model.model.layers
        return sum(isinstance(layer, reasoner.Batch1DecoderLayer) for layer in layers), len(layers)

    [(fused_layers, num_layers)] = llm.collective_rpc(count_layers)
    Path(out).write_text(json.dumps({"fused_layers": fused_layers, "num_layers": num_layers, **greedy_outputs(llm)}))


if __name__ == "__main__":
    main()
