"""The batch-1 decode attention kernel (`model_executor/decode_attention.py`) on a CUDA GPU, and the reasoner with it.
Skipped without CUDA; run on the GPU machine with `COSMOS3_TEST_CHECKPOINT` set.

- At the 8B reasoner's attention shape in bf16, both cache layouts, 1 to 4096 keys: the output equals vLLM's path
  (our q / k norm + mRoPE kernel, vLLM's `reshape_and_cache_flash`, FA3) within `BF16_REL_TOL`, and the token's
  K / V land in its slot as vLLM's cache write puts them.
- A CUDA graph captured once and replayed with new lengths, block tables, slots and qkv rows equals eager launches.
- Decoder layers of programmatic dependent launches (the GEMVs and this kernel, each waiting for the one before
  only where it reads its output) replayed in a CUDA graph equal the same kernels launched plainly and eagerly.
- The tiny checkpoint's greedy tokens with the kernel equal those with vLLM's path (fused decoder layers in both;
  one request at a time: M = 1 decode in CUDA graphs; and all at once), each engine in its own process:

      python -m tests.gpu.test_decode_attention_gpu CKPT ours|vllm OUT.json

Its speed against vLLM's path: bench/decode_attention.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.greedy_probe import assert_same_greedy_up_to_ties, greedy_outputs, probe_engine, run_probe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ||ours - vLLM's|| / ||vLLM's||: both bf16 outputs of fp32 softmax; a wrong block, split, slot or head gives O(1).
BF16_REL_TOL = 1e-2
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
MAX_BLOCKS = 4096 // BLOCK_SIZE
NUM_BLOCKS = 2 * MAX_BLOCKS + 7
MROPE_SECTION = [24, 20, 20]
EPS, SCALE = 1e-6, HEAD_DIM**-0.5


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


class Token:
    """One decode token of request 0 (block table row 0, shuffled blocks) at `seq_len` keys, its rope and cache."""

    def __init__(self, seq_len: int, layout: str = "NHD"):
        self.seq_len = seq_len
        if layout == "HND":
            self.cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device="cuda").bfloat16()
        else:
            self.cache = (torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, device="cuda").bfloat16()
                          .transpose(1, 2))  # fmt: skip
        self.block_table = torch.randperm(NUM_BLOCKS, device="cuda")[: 2 * MAX_BLOCKS].view(2, MAX_BLOCKS).int()
        last = seq_len - 1
        self.slot = (self.block_table[0, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE).view(1)
        self.seq_lens = torch.tensor([seq_len, 5], dtype=torch.int32, device="cuda")
        self.qkv = torch.randn(1, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda").bfloat16()
        self.positions = torch.randint(0, 8192, (3, 1), device="cuda")
        self.norm = (torch.rand(HEAD_DIM, device="cuda") + 0.5).bfloat16()
        inv_freq = 1.0 / 5e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
        angles = torch.arange(8192, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).bfloat16()

    def ours(self, cache: torch.Tensor) -> torch.Tensor:
        from cosmos3_serve.model_executor import decode_attention

        rope = decode_attention.RopeArgs(self.norm, self.norm, EPS, self.cos_sin, MROPE_SECTION, True)
        return decode_attention.decode_attention(self.qkv, self.positions, rope, cache, self.slot, self.block_table,
                                                 self.seq_lens, SCALE, NUM_HEADS, NUM_KV_HEADS)  # fmt: skip

    def vllm_path(self, cache: torch.Tensor) -> torch.Tensor:
        from vllm._custom_ops import reshape_and_cache_flash
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        from cosmos3_serve.model_executor import decode_kernels

        q, k, v = self.qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
        q, k = decode_kernels.qk_norm_mrope(self.positions, q, k, self.norm, self.norm, EPS, self.cos_sin, HEAD_DIM,
                                            MROPE_SECTION, True)  # fmt: skip
        key_cache, value_cache = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
        scale_one = torch.ones(1, device="cuda")
        reshape_and_cache_flash(k.view(1, NUM_KV_HEADS, HEAD_DIM), v.view(1, NUM_KV_HEADS, HEAD_DIM), key_cache,
                                value_cache, self.slot, "auto", scale_one, scale_one)  # fmt: skip
        out = torch.empty(1, NUM_HEADS, HEAD_DIM, dtype=q.dtype, device="cuda")
        flash_attn_varlen_func(q=q.view(1, NUM_HEADS, HEAD_DIM), k=key_cache, v=value_cache, max_seqlen_q=1,
                               cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                               max_seqlen_k=self.seq_len, seqused_k=self.seq_lens[:1], softmax_scale=SCALE,
                               causal=True, block_table=self.block_table[:1], out=out, fa_version=3)  # fmt: skip
        return out.view(1, -1)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("seq_len", [1, 17, 640, 1000, 4096])
def test_matches_vllm_path(layout: str, seq_len: int) -> None:
    torch.manual_seed(seq_len)
    token = Token(seq_len, layout)
    our_cache, vllm_cache = token.cache.clone(), token.cache.clone()
    ours, expected = token.ours(our_cache), token.vllm_path(vllm_cache)
    assert _relative_error(ours, expected) <= BF16_REL_TOL
    slot = _slot_mask(token)
    assert _relative_error(our_cache[slot], vllm_cache[slot]) <= BF16_REL_TOL  # the token's K / V
    assert torch.equal(our_cache[~slot], token.cache[~slot])  # nothing else written


def _slot_mask(token: Token) -> torch.Tensor:
    mask = torch.zeros_like(token.cache, dtype=torch.bool)
    block, offset = divmod(int(token.slot), BLOCK_SIZE)
    mask[block, :, offset] = True
    return mask


def test_cuda_graph_replays_with_new_lengths_slots_and_rows() -> None:
    torch.manual_seed(0)
    token = Token(4096)
    eager_cache = token.cache.clone()
    token.ours(token.cache)  # compiles, allocates the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = token.ours(token.cache)
    for seq_len in (1, 17, 640, 4096, 100):
        fresh = Token(seq_len)  # new inputs, copied into the graph's buffers like vLLM's persistent ones
        for name in ("block_table", "slot", "seq_lens", "qkv", "positions"):
            getattr(token, name).copy_(getattr(fresh, name))
        token.seq_len = seq_len
        graph.replay()
        eager = token.ours(eager_cache)
        assert torch.equal(captured, eager), seq_len
        assert _relative_error(captured, token.vllm_path(token.cache.clone())) <= BF16_REL_TOL, seq_len


def test_programmatic_launches_in_a_graph_equal_plain_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    from cosmos3_serve.model_executor import decode_attention, decode_kernels

    if not decode_kernels.programmatic_launch(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or later")
    torch.manual_seed(0)
    token, hidden, intermediate, num_layers = Token(1000), NUM_HEADS * HEAD_DIM, 12288, 4
    qkv_rows = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    layers = [[torch.randn(rows, columns, device="cuda").bfloat16() * columns**-0.5 for rows, columns in
               ((qkv_rows, hidden), (hidden, hidden), (2 * intermediate, hidden), (hidden, intermediate))]
              for _ in range(num_layers)]  # fmt: skip
    x, residual = torch.randn(1, hidden, device="cuda").bfloat16(), torch.randn(1, hidden, device="cuda").bfloat16()
    norm_weight = token.norm.repeat(hidden // HEAD_DIM)

    def forward(cache: torch.Tensor) -> torch.Tensor:
        hidden_states, residual_states = x, residual
        for qkv_weight, o_weight, gate_up_weight, down_weight in layers:
            token.qkv, residual_states = decode_kernels.gemv(hidden_states, qkv_weight, residual_states, norm_weight,
                                                             EPS)  # fmt: skip
            attention = decode_kernels.gemv(token.ours(cache), o_weight)[0]
            activation, residual_states = decode_kernels.gemv(attention, gate_up_weight, residual_states, norm_weight,
                                                              EPS, True)  # fmt: skip
            hidden_states = decode_kernels.gemv(activation, down_weight)[0]
        return torch.cat([hidden_states, residual_states])

    graph_cache, plain_cache = token.cache.clone(), token.cache.clone()
    forward(token.cache)  # compiles, allocates the workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward(graph_cache)
    graph.replay()
    monkeypatch.setattr(decode_kernels, "programmatic_launch", lambda device: False)
    monkeypatch.setattr(decode_attention, "programmatic_launch", lambda device: False)
    plain = forward(plain_cache)
    assert captured.isfinite().all() and captured.abs().max() > 0
    assert torch.equal(captured, plain) and torch.equal(graph_cache, plain_cache)


def test_greedy_tokens_with_our_attention_and_with_vllms(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ours = run_probe(__name__, tiny_checkpoint, "ours", tmp_path)
    reference = run_probe(__name__, tiny_checkpoint, "vllm", tmp_path)
    assert ours["fused_attention_launches"] > 0 and reference["fused_attention_launches"] == 0
    assert_same_greedy_up_to_ties(ours, reference)


def main() -> None:
    """The probe: one engine (fused decoder layers, in this process) with our attention or vLLM's path, its greedy
    outputs and how often `cosmos3_attention` chose the kernel (at CUDA-graph capture and in eager steps)."""
    from cosmos3_serve.model_executor import decode_attention

    checkpoint, variant, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if variant == "vllm":
        decode_attention.supports = lambda attention: False
    launches = [0]
    runs_fused = decode_attention._runs_fused

    def counted(*args) -> bool:
        fused = runs_fused(*args)
        launches[0] += fused
        return fused

    decode_attention._runs_fused = counted
    llm = probe_engine(checkpoint)
    outputs = greedy_outputs(llm)
    Path(out).write_text(json.dumps({"fused_attention_launches": launches[0], **outputs}))


if __name__ == "__main__":
    main()
