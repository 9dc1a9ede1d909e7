"""The L2 prefetch of o_proj's weight by the q / k norm + mRoPE kernel at batch-1 decode: does o_proj then read the L2?

    python bench/l2_prefetch.py [--layers 36] [--attention-us 11] [--json OUT]

Needs a CUDA GPU (sm_90+). One CUDA graph replays, per layer of the 8B reasoner's shapes, what the fused decoder
layer launches between its qkv and gate_up GEMVs: `qk_norm_mrope` on one token (q 32 x 128, k 8 x 128), a stand-in
for attention that leaves HBM idle (`torch.cuda._sleep` for `--attention-us`, FA3's split + combine take about 11 us
at batch 1), then the o_proj GEMV (4096 x 4096) on that layer's own weight. Rows: without the prefetch, then with it
for each prefetch variant (bulk `cp.async.bulk.prefetch.L2` chunks of 1-16 KiB, or a `prefetch.global.L2` per
128-byte line). o_proj's time per layer = the graph's time minus a graph without the GEMV.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from cosmos3_serve.model_executor import decode_kernels

HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4096, 32, 8, 128
MROPE_SECTION = [24, 20, 20]
VARIANTS = {  # name: (chunk bytes, bulk)
    "bulk 1 KiB": (1024, True),
    "bulk 4 KiB": (4096, True),
    "bulk 16 KiB": (16384, True),
    "line 128 B": (4096, False),
}


def graph_seconds(launches: Callable[[], None], replays: int = 20) -> float:
    """Mean seconds of one replay of `launches` captured in a CUDA graph (after a warm-up run and replay)."""
    launches()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


class DecodeLayers:
    """`layers` layers' inputs and o_proj weights; `launches` is one decode step's slice of them."""

    def __init__(self, layers: int, sleep_cycles: int):
        self.sleep_cycles = sleep_cycles
        self.o_proj = [torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        self.q = torch.randn(1, NUM_Q_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.k = torch.randn(1, NUM_KV_HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.norm = torch.ones(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        self.positions = torch.full((3, 1), 700, device="cuda", dtype=torch.long)
        inv_freq = 1.0 / 1e6 ** (torch.arange(0, HEAD_DIM, 2, device="cuda", dtype=torch.float32) / HEAD_DIM)
        angles = torch.arange(4096, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)

    def launches(self, prefetch: bool, o_proj: bool) -> Callable[[], None]:
        def step() -> None:
            for weight in self.o_proj:
                q, _ = decode_kernels.qk_norm_mrope(self.positions, self.q, self.k, self.norm, self.norm, 1e-6,
                                                    self.cos_sin, HEAD_DIM, MROPE_SECTION, True,
                                                    weight if prefetch else None)  # fmt: skip
                torch.cuda._sleep(self.sleep_cycles)
                if o_proj:
                    decode_kernels.gemv(q, weight)

        return step


def sleep_cycles_for(us: float) -> int:
    """Cycles of `torch.cuda._sleep` that take about `us` microseconds, calibrated in a graph of 100."""
    cycles = 10000
    seconds = graph_seconds(lambda: [torch.cuda._sleep(cycles) for _ in range(100)]) / 100
    return int(cycles * us * 1e-6 / seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--attention-us", type=float, default=11.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = DecodeLayers(args.layers, sleep_cycles_for(args.attention_us))
    per_layer = 1e6 / args.layers
    rows = {}
    saved = decode_kernels.L2_PREFETCH_CHUNK, decode_kernels.L2_PREFETCH_BULK
    for name, (chunk, bulk) in {"no prefetch": saved, **VARIANTS}.items():
        decode_kernels.L2_PREFETCH_CHUNK, decode_kernels.L2_PREFETCH_BULK = chunk, bulk
        prefetch = name != "no prefetch"
        with_gemv = graph_seconds(layers.launches(prefetch, o_proj=True)) * per_layer
        without_gemv = graph_seconds(layers.launches(prefetch, o_proj=False)) * per_layer
        rows[name] = {"layer_us": with_gemv, "without_o_proj_us": without_gemv, "o_proj_us": with_gemv - without_gemv}
    decode_kernels.L2_PREFETCH_CHUNK, decode_kernels.L2_PREFETCH_BULK = saved
    properties = torch.cuda.get_device_properties(0)
    report = {"device": properties.name, "l2_bytes": properties.L2_cache_size, "layers": args.layers,
              "attention_us": args.attention_us, "o_proj_bytes": HIDDEN * HIDDEN * 2, "rows": rows}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nL2 prefetch of o_proj at batch-1 decode, {report['device']} (L2 {report['l2_bytes'] / 2**20:.0f} MiB), "
          f"{args.layers} layers, attention stand-in {args.attention_us} us; us per layer")  # fmt: skip
    print(f"{'variant':16}{'layer':>9}{'without o_proj':>16}{'o_proj':>9}{'o_proj TB/s':>13}")
    for name, row in rows.items():
        bandwidth = report["o_proj_bytes"] / row["o_proj_us"] / 1e6
        print(f"{name:16}{row['layer_us']:9.2f}{row['without_o_proj_us']:16.2f}{row['o_proj_us']:9.2f}{bandwidth:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
