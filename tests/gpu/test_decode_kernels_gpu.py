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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ||fused - unfused|| / ||unfused||, both bf16. The unfused path rounds the normalized / activated input to bf16
# before its GEMV, the fused one does not: a few 1e-3 of relative difference; a wrong index gives O(1).
BF16_REL_TOL = 1e-2
HIDDEN, INTERMEDIATE, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 12288, 32, 8, 128
QKV_ROWS = (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
MROPE_SECTION = [24, 20, 20]
EPS = 1e-6
PROMPTS = ("A robot arm picks up a red cube.", "Describe the scene:", "The weather today is", "Once upon a time")
MAX_TOKENS, TOP_LOGPROBS = 24, 5
# Where the two engines' greedy tokens part, the unfused engine's logprobs of both tokens must be this close: a tie
# that bf16 rounding may break either way (random tiny weights). Before it, same top-1 logprob within this.
TIE_LOGPROB = 0.05
LOGPROB_ATOL = 0.1


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


def _greedy_run(tiny_checkpoint: Path, mode: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{mode}.json"
    torch.cuda.empty_cache()  # this process's cached blocks: the probe's engine sizes itself from free memory
    # The engine in the probe's own process (where the "unfused" probe patches the reasoner), and no compile cache:
    # vLLM would load the other probe's compiled graph (same config and sources), fused ops included.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_DISABLE_COMPILE_CACHE": "1"}
    subprocess.run([sys.executable, "-m", "tests.gpu.test_decode_kernels_gpu", str(tiny_checkpoint), mode, str(out)],
                   env=env, cwd=Path(__file__).parents[2], check=True, timeout=1200)  # fmt: skip
    return json.loads(out.read_text())


def _assert_same_greedy_up_to_ties(ours: dict, reference: dict) -> None:
    for step, (token, expected) in enumerate(zip(ours["tokens"], reference["tokens"])):
        top = {int(t): lp for t, lp in reference["logprobs"][step].items()}
        if token != expected:  # only where the reference had a near-tie, and then the sequences part
            assert token in top and top[expected] - top[token] <= TIE_LOGPROB, (step, token, expected, top)
            return
        assert abs(ours["logprobs"][step][str(token)] - top[token]) <= LOGPROB_ATOL, (step, token)


def test_greedy_tokens_with_and_without_fused_layers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fused = _greedy_run(tiny_checkpoint, "fused", tmp_path)
    unfused = _greedy_run(tiny_checkpoint, "unfused", tmp_path)
    assert fused["fused_layers"] == fused["num_layers"] > 0 and unfused["fused_layers"] == 0
    for mode in ("one_at_a_time", "batched"):
        for ours, reference in zip(fused[mode], unfused[mode], strict=True):
            _assert_same_greedy_up_to_ties(ours, reference)


def main() -> None:
    """The probe: one engine (CUDA graphs, bf16) with or without the fused decoder layers, its greedy outputs."""
    from vllm import LLM, SamplingParams

    from cosmos3_serve.model_executor import reasoner

    checkpoint, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "unfused":
        reasoner.use_batch1_decoder_layers = lambda language_model: None
    llm = LLM(checkpoint, dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.2, seed=0,
              max_num_seqs=len(PROMPTS), limit_mm_per_prompt={"image": 1, "video": 1})  # fmt: skip

    def count_layers(worker) -> tuple[int, int]:
        layers = worker.model_runner.get_model().language_model.model.layers
        return sum(isinstance(layer, reasoner.Batch1DecoderLayer) for layer in layers), len(layers)

    [(fused_layers, num_layers)] = llm.collective_rpc(count_layers)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=TOP_LOGPROBS)

    def greedy(outputs) -> list[dict]:
        return [{"tokens": list(o.outputs[0].token_ids),
                 "logprobs": [{str(t): e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs]}
                for o in outputs]  # fmt: skip

    one_at_a_time = [greedy(llm.generate([prompt], params, use_tqdm=False))[0] for prompt in PROMPTS]
    batched = greedy(llm.generate(list(PROMPTS), params, use_tqdm=False))
    Path(out).write_text(json.dumps({"fused_layers": fused_layers, "num_layers": num_layers,
                                     "one_at_a_time": one_at_a_time, "batched": batched}))  # fmt: skip


if __name__ == "__main__":
    main()
