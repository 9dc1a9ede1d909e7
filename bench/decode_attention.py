"""Batch-1 decode attention: our one kernel against vLLM's four at the 8B reasoner's attention shape.

    python bench/decode_attention.py [--seq-lens 512,768,1024,4096] [--json OUT]

Needs a CUDA GPU and vLLM's FA3. Per layer, from the raw qkv row [1, (32 + 2 x 8) x 128] to the attention output:
vLLM's path as the fused decoder layers ran it before `decode_attention` (our q / k norm + mRoPE kernel, vLLM's
`reshape_and_cache_flash`, FA3's split-KV kernel + combine) against `decode_attention.decode_attention` in several
launch configurations (splits per KV head, keys per loop step, warps). Each is timed as 36 launches over 36 layer
caches of `seq_len` keys in one CUDA graph (every layer's K/V from HBM, as in a decode step); every configuration's
output is checked against vLLM's path (relative L2 error, bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cosmos3_serve.model_executor import decode_attention, decode_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemv import graph_seconds  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, LAYERS = 32, 8, 128, 16, 36
MROPE_SECTION = [24, 20, 20]
EPS, SCALE = 1e-6, HEAD_DIM**-0.5
# (SPLITS, TILE, NUM_WARPS) of decode_attention to time; the first is its default.
CONFIGS = ((32, 32, 4), (16, 32, 4), (32, 32, 8), (32, 16, 4), (16, 64, 4))


class Layers:
    """36 layers' caches (NHD, vLLM's default layout) of `seq_len` keys, one token's qkv row and metadata."""

    def __init__(self, seq_len: int):
        blocks = -(-seq_len // BLOCK_SIZE)
        self.seq_len = seq_len
        self.caches = [torch.randn(blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, device="cuda").bfloat16()
                       .transpose(1, 2) for _ in range(LAYERS)]  # fmt: skip  # logical [blocks, heads, slots, 2D]
        self.block_table = torch.randperm(blocks, device="cuda").int()[None]
        last = seq_len - 1
        self.slot = (self.block_table[0, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE).view(1)
        self.seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
        self.cu_seqlens_q = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        self.qkv = torch.randn(1, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda").bfloat16()
        self.positions = torch.full((3, 1), last, dtype=torch.long, device="cuda")
        self.norm = torch.rand(HEAD_DIM, device="cuda").bfloat16() + 0.5
        inv_freq = 1.0 / 5e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
        angles = torch.arange(8192, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).bfloat16()
        self.rope = decode_attention.RopeArgs(self.norm, self.norm, EPS, self.cos_sin, MROPE_SECTION, True)
        self.scale_one = torch.ones(1, device="cuda")

    def vllm_path(self, layer: int) -> torch.Tensor:
        from vllm._custom_ops import reshape_and_cache_flash
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        q, k, v = self.qkv.split([NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM], dim=-1)
        q, k = decode_kernels.qk_norm_mrope(self.positions, q, k, self.norm, self.norm, EPS, self.cos_sin, HEAD_DIM,
                                            MROPE_SECTION, True)  # fmt: skip
        key_cache, value_cache = self.caches[layer].transpose(1, 2).split(HEAD_DIM, dim=-1)
        reshape_and_cache_flash(k.view(1, NUM_KV_HEADS, HEAD_DIM), v.view(1, NUM_KV_HEADS, HEAD_DIM), key_cache,
                                value_cache, self.slot, "auto", self.scale_one, self.scale_one)  # fmt: skip
        out = torch.empty(1, NUM_HEADS, HEAD_DIM, dtype=q.dtype, device="cuda")
        flash_attn_varlen_func(q=q.view(1, NUM_HEADS, HEAD_DIM), k=key_cache, v=value_cache, max_seqlen_q=1,
                               cu_seqlens_q=self.cu_seqlens_q, max_seqlen_k=self.seq_len, seqused_k=self.seq_lens,
                               softmax_scale=SCALE, causal=True, block_table=self.block_table, out=out,
                               fa_version=3)  # fmt: skip
        return out.view(1, -1)

    def ours(self, layer: int) -> torch.Tensor:
        return decode_attention.decode_attention(self.qkv, self.positions, self.rope, self.caches[layer], self.slot,
                                                 self.block_table, self.seq_lens, SCALE, NUM_HEADS,
                                                 NUM_KV_HEADS)  # fmt: skip


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


def measure(seq_len: int) -> dict:
    layers = Layers(seq_len)
    reference = layers.vllm_path(0)
    vllm_seconds = graph_seconds(lambda: [layers.vllm_path(i) for i in range(LAYERS)], replays=20)
    row = {"seq_len": seq_len, "vllm_us": vllm_seconds * 1e6 / LAYERS, "ours": []}
    saved = decode_attention.SPLITS, decode_attention.TILE, decode_attention.NUM_WARPS
    for splits, tile, warps in CONFIGS:
        decode_attention.SPLITS, decode_attention.TILE, decode_attention.NUM_WARPS = splits, tile, warps
        error = relative_error(layers.ours(0), reference)
        seconds = graph_seconds(lambda: [layers.ours(i) for i in range(LAYERS)], replays=20)
        row["ours"].append({"config": [splits, tile, warps], "us": seconds * 1e6 / LAYERS, "rel_error": error})
    decode_attention.SPLITS, decode_attention.TILE, decode_attention.NUM_WARPS = saved
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", default="512,768,1024,4096")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(int(n)) for n in args.seq_lens.split(",")]
    report = {"device": torch.cuda.get_device_name(), "layers": LAYERS, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nbatch-1 decode attention (q / k norm + mRoPE, K/V write, attention), {report['device']}, us per layer "
          f"in graphs of {LAYERS}; ours as splits x keys per step x warps (relative error to vLLM's path)")  # fmt: skip
    configs = [" x ".join(map(str, c)) for c in CONFIGS]
    print(f"{'keys':>6}{'vLLM path':>11}" + "".join(f"{c:>18}" for c in configs))
    for row in rows:
        cells = "".join(f"{o['us']:9.2f} ({o['rel_error']:.0e})" for o in row["ours"])
        print(f"{row['seq_len']:6d}{row['vllm_us']:11.2f}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
