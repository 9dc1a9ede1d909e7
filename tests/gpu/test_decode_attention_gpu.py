"""The single-token decode attention kernel (`model_executor/decode_attention.py`) on a CUDA GPU, and the reasoner
with it. Skipped without CUDA; run on the GPU machine with `COSMOS3_TEST_CHECKPOINT` set.

- The kernel at the 8B reasoner's attention shape (32 query heads, 8 KV heads, head dim 128, bf16, cache blocks of
  16) in both cache layouts against torch's SDPA over the gathered K / V in float32, within `BF16_REL_TOL`, at 1 to
  4096 keys (partial last blocks included), NaN in every cache slot it must not read; a CUDA graph captured once
  and replayed with new lengths, block tables and queries equals eager launches and SDPA.
- Time per launch of vLLM's FA3 (split-KV kernel + combine, FA3's own split heuristic) and of ours in a few launch
  configurations (`LAUNCH_CONFIGS`), in CUDA graphs of 36 launches over 36 layer caches: printed (`-s`), not
  asserted; every configuration's output agrees with FA3's within `BF16_REL_TOL`.
- The tiny checkpoint's greedy tokens with our attention equal those with vLLM's FA3 (fused decoder layers in
  both; one request at a time: M = 1 decode in CUDA graphs; and all at once), each engine in its own process:

      python -m tests.gpu.test_decode_attention_gpu CKPT ours|fa3 OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.greedy_probe import assert_same_greedy_up_to_ties, greedy_outputs, probe_engine, run_probe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ||ours - SDPA|| / ||SDPA||: ours is rounded to bf16 once (a few 1e-3); a wrong block, split or head gives O(1).
BF16_REL_TOL = 1e-2
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
MAX_BLOCKS = 4096 // BLOCK_SIZE  # block table columns
SCALE = HEAD_DIM**-0.5
SEQ_LENS = (1, 15, 16, 17, 100, 640, 1000, 1031, 4096)
NUM_LAYERS = 36
# (SPLITS, TILE, NUM_WARPS) of decode_attention to time; the first is its default.
LAUNCH_CONFIGS = ((16, 64, 4), (16, 64, 8), (16, 32, 4), (32, 32, 4), (8, 64, 4))


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def _nan_cache(layout: str, num_blocks: int) -> torch.Tensor:
    """A NaN cache, logically `[num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM]`, in `layout`'s memory order."""
    if layout == "HND":
        shape = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM)
        return torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM)
    return torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda").transpose(1, 2)


def _slots(block_table_row: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(seq_len, device="cuda")
    return block_table_row[positions // BLOCK_SIZE].long(), positions % BLOCK_SIZE


def _write_keys(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> None:
    """Random K and V in the slots of positions 0 .. seq_len - 1 of request `block_table_row`."""
    blocks, slots = _slots(block_table_row, seq_len)
    cache[blocks, :, slots] = torch.randn(seq_len, NUM_KV_HEADS, 2 * HEAD_DIM, device="cuda").to(cache.dtype)


def _sdpa(query: torch.Tensor, cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    blocks, slots = _slots(block_table_row, seq_len)
    kv = cache[blocks, :, slots].transpose(0, 1).float()  # [NUM_KV_HEADS, seq_len, 2 * HEAD_DIM]
    out = F.scaled_dot_product_attention(query.transpose(0, 1).float(), kv[..., :HEAD_DIM], kv[..., HEAD_DIM:],
                                         scale=SCALE, enable_gqa=True)  # fmt: skip
    return out.transpose(0, 1)


def _block_table(num_blocks: int) -> torch.Tensor:
    """Two requests' rows of MAX_BLOCKS distinct, shuffled blocks (row 0 attended)."""
    return torch.randperm(num_blocks, device="cuda")[: 2 * MAX_BLOCKS].view(2, MAX_BLOCKS).int()


@pytest.fixture(scope="module")
def decode_attention():
    from cosmos3_serve.model_executor import decode_attention

    torch.manual_seed(0)
    return decode_attention


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_matches_sdpa(decode_attention, layout: str) -> None:
    for seq_len in SEQ_LENS:
        cache, block_table = _nan_cache(layout, 2 * MAX_BLOCKS + 7), _block_table(2 * MAX_BLOCKS + 7)
        _write_keys(cache, block_table[0], seq_len)
        query = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
        seq_lens = torch.tensor([seq_len, 5], dtype=torch.int32, device="cuda")
        output = torch.full_like(query, float("nan"))
        decode_attention.decode_attention(query, cache, block_table, seq_lens, SCALE, output)
        error = _relative_error(output, _sdpa(query, cache, block_table[0], seq_len))
        assert error <= BF16_REL_TOL, (layout, seq_len, error)


def test_cuda_graph_replays_with_new_lengths_and_block_tables(decode_attention) -> None:
    num_blocks = 2 * MAX_BLOCKS + 7
    cache = torch.randn(num_blocks, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, device="cuda").bfloat16()
    # The graph's inputs, refilled before each replay like vLLM's persistent buffers.
    block_table = torch.zeros(2, MAX_BLOCKS, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(2, dtype=torch.int32, device="cuda")
    query = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
    output = torch.empty_like(query)
    decode_attention.decode_attention(query, cache, block_table, seq_lens, SCALE, output)  # compiles, allocates
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention.decode_attention(query, cache, block_table, seq_lens, SCALE, output)
    for seq_len in (1, 17, 640, 4096, 100):
        block_table.copy_(_block_table(num_blocks))
        seq_lens.copy_(torch.tensor([seq_len, 3]))
        query.copy_(torch.randn(1, NUM_Q_HEADS, HEAD_DIM, device="cuda"))
        graph.replay()
        replayed = output.clone()
        eager = torch.empty_like(output)
        decode_attention.decode_attention(query, cache, block_table, seq_lens, SCALE, eager)
        assert torch.equal(replayed, eager), seq_len
        assert _relative_error(replayed, _sdpa(query, cache, block_table[0], seq_len)) <= BF16_REL_TOL, seq_len
    workspace = decode_attention.workspace(query.device, NUM_KV_HEADS, decode_attention.SPLITS,
                                           decode_attention.group_rows(NUM_Q_HEADS // NUM_KV_HEADS), HEAD_DIM)  # fmt: skip
    assert not workspace.counters.any()


def _time_per_launch_us(launch, replays: int = 20) -> float:
    """Microseconds per launch of `launch(layer)` in a CUDA graph of NUM_LAYERS launches, one per layer."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(NUM_LAYERS):
            launch(layer)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * NUM_LAYERS)


@pytest.mark.parametrize("seq_len", [512, 768, 1024, 4096])
def test_time_against_flash_attention_3(decode_attention, monkeypatch, seq_len: int) -> None:
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    blocks_per_layer = seq_len // BLOCK_SIZE
    caches = [torch.randn(blocks_per_layer, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, device="cuda").bfloat16()
              .transpose(1, 2) for _ in range(NUM_LAYERS)]  # fmt: skip  # NHD, each layer's K / V from HBM
    block_table = torch.randperm(blocks_per_layer, device="cuda").int()[None]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    query = torch.randn(1, NUM_Q_HEADS, HEAD_DIM, device="cuda").bfloat16()
    ours, theirs = torch.empty_like(query), torch.empty_like(query)

    def ours_launch(layer: int) -> None:
        decode_attention.decode_attention(query, caches[layer], block_table, seq_lens, SCALE, ours)

    def fa3_launch(layer: int) -> None:
        key_cache, value_cache = caches[layer].transpose(1, 2).split(HEAD_DIM, dim=-1)
        flash_attn_varlen_func(q=query, k=key_cache, v=value_cache, max_seqlen_q=1, cu_seqlens_q=cu_seqlens_q,
                               max_seqlen_k=seq_len, seqused_k=seq_lens, softmax_scale=SCALE, causal=True,
                               block_table=block_table, out=theirs, fa_version=3)  # fmt: skip

    fa3_launch(0)  # warm up outside the graph; layer 0's output, the reference (the timed graphs end at the last layer)
    reference = theirs.clone()
    times = [f"FA3 {_time_per_launch_us(fa3_launch):.2f}"]
    for splits, tile, warps in LAUNCH_CONFIGS:
        for name, value in (("SPLITS", splits), ("TILE", tile), ("NUM_WARPS", warps)):
            monkeypatch.setattr(decode_attention, name, value)
        ours_launch(0)  # compile outside the graph
        assert _relative_error(ours, reference) <= BF16_REL_TOL, (splits, tile, warps)
        times.append(f"ours {splits} x {tile} x {warps} {_time_per_launch_us(ours_launch):.2f}")
    print(f"\n{torch.cuda.get_device_name()}, {seq_len} keys, us per layer: " + ", ".join(times))


def test_greedy_tokens_with_our_attention_and_with_fa3(tiny_checkpoint: Path, tmp_path: Path) -> None:
    ours = run_probe(__name__, tiny_checkpoint, "ours", tmp_path)
    fa3 = run_probe(__name__, tiny_checkpoint, "fa3", tmp_path)
    assert ours["our_attention_layers"] == ours["num_layers"] > 0 and fa3["our_attention_layers"] == 0
    assert_same_greedy_up_to_ties(ours, fa3)


def main() -> None:
    """The probe: one engine (fused decoder layers) with our attention or vLLM's FA3, its greedy outputs."""
    from cosmos3_serve.model_executor.decode_attention import Batch1AttentionImpl

    checkpoint, variant, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if variant == "fa3":
        Batch1AttentionImpl.supports = staticmethod(lambda attention: False)
    llm = probe_engine(checkpoint)

    def count_layers(worker) -> tuple[int, int]:
        layers = worker.model_runner.get_model().language_model.model.layers
        ours = sum(isinstance(layer.self_attn.attn.impl, Batch1AttentionImpl) for layer in layers)
        return ours, len(layers)

    [(our_attention_layers, num_layers)] = llm.collective_rpc(count_layers)
    Path(out).write_text(json.dumps({"our_attention_layers": our_attention_layers, "num_layers": num_layers,
                                     **greedy_outputs(llm)}))  # fmt: skip


if __name__ == "__main__":
    main()
