"""Block shapes of the batch-1 decode GEMV (`model_executor/decode_kernels.py`): a sweep at the 8B reasoner's shapes.

    python bench/decode_gemv.py [--layers 36] [--json OUT]

Needs a CUDA GPU. For each GEMV of a decode step, as the fused decoder layers launch it (qkv_proj with the residual
add + RMSNorm prologue, o_proj, gate_up_proj with the prologue and SiLU-mul, down_proj, lm_head), every candidate
(rows per program, K per loop step, warps) is timed as `--layers` launches on distinct weights replayed in one
CUDA graph: the weights stream from HBM as in a decode step, none is left in the L2. Candidates: tiles of 2k to
16k weights with 4 warps, 8 as well from 8k. Printed per GEMV: the current table's time per launch and read bandwidth, and the fastest candidate's.
Then the whole step's GEMVs (`--layers` x 4 projections + lm_head, one graph) with the current tables and with the
fastest shapes, against the weights' bytes over the copy bandwidth (the reasoner bench's roofline) and over the read
bandwidth (a sum over 2 GiB), both measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from cosmos3_serve.model_executor import decode_kernels

HIDDEN, INTERMEDIATE, QKV_ROWS, VOCAB = 4096, 12288, 6144, 151936  # Qwen3-8B-shaped Nano reasoner
EPS = 1e-6
Blocks = tuple[int, int, int]  # rows per program, K per loop step, warps


class Projection:
    """One GEMV of the decode step: weight [rows, cols] and the prologue / epilogue the fused layers give it."""

    def __init__(self, name: str, rows: int, cols: int, rms_norm: bool, residual: bool, silu_mul: bool, count: int):
        self.name, self.rows, self.cols = name, rows, cols
        self.rms_norm, self.residual, self.silu_mul = rms_norm, residual, silu_mul
        self.weights = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]
        self.x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        self.norm_weight = torch.ones(cols, device="cuda", dtype=torch.bfloat16) if rms_norm else None

    @property
    def bytes(self) -> int:
        return self.rows * self.cols * 2

    def launch(self, weight: torch.Tensor) -> None:
        decode_kernels.gemv(self.x, weight, residual=self.x if self.residual else None, norm_weight=self.norm_weight,
                            eps=EPS, silu_mul=self.silu_mul)  # fmt: skip


def projections(layers: int) -> list[Projection]:
    return [
        Projection("qkv_proj + norm", QKV_ROWS, HIDDEN, rms_norm=True, residual=True, silu_mul=False, count=layers),
        Projection("o_proj", HIDDEN, HIDDEN, rms_norm=False, residual=False, silu_mul=False, count=layers),
        Projection("gate_up + norm + silu", 2 * INTERMEDIATE, HIDDEN, True, True, True, count=layers),
        Projection("down_proj", HIDDEN, INTERMEDIATE, rms_norm=False, residual=False, silu_mul=False, count=layers),
        Projection("lm_head", VOCAB, HIDDEN, rms_norm=False, residual=False, silu_mul=False, count=2),
    ]


def graph_seconds(launches: Callable[[], None], replays: int = 10) -> float:
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


class BlockTables:
    """Sets `decode_kernels`' block tables for the duration of a `with` (one shape for everything, or a table)."""

    def __init__(self, plain: tuple, norm: tuple):
        self.tables = plain, norm

    def __enter__(self) -> None:
        self.saved = decode_kernels.GEMV_BLOCKS, decode_kernels.NORM_GEMV_BLOCKS
        decode_kernels.GEMV_BLOCKS, decode_kernels.NORM_GEMV_BLOCKS = self.tables

    def __exit__(self, *exc) -> None:
        decode_kernels.GEMV_BLOCKS, decode_kernels.NORM_GEMV_BLOCKS = self.saved


def candidates(cols: int) -> list[Blocks]:
    shapes = []
    for rows in (2, 4, 8, 16, 32, 64):
        for step in (128, 256, 512, 1024, 2048):
            tile = rows * step
            if step <= cols and 2048 <= tile <= 16384:
                shapes += [(rows, step, 4)] + ([(rows, step, 8)] if tile >= 8192 else [])
    return shapes


def time_blocks(projection: Projection, blocks: Blocks) -> float:
    """Seconds per launch of `projection` with `blocks`."""
    table = ((0, blocks),)
    with BlockTables(table, table):
        return graph_seconds(lambda: [projection.launch(w) for w in projection.weights]) / len(projection.weights)


def current_blocks(projection: Projection) -> Blocks:
    return decode_kernels.gemv_blocks(projection.rows, projection.cols, rms_norm=projection.rms_norm)


def sweep(projection: Projection) -> dict:
    """Every candidate's seconds per launch."""
    times = {}
    for blocks in candidates(projection.cols) + [current_blocks(projection)]:
        times.setdefault(blocks, time_blocks(projection, blocks))
    best = min(times, key=times.get)
    current = current_blocks(projection)
    return {"name": projection.name, "shape": [projection.rows, projection.cols], "bytes": projection.bytes,
            "current": list(current), "current_s": times[current], "best": list(best), "best_s": times[best],
            "all": {str(k): v for k, v in sorted(times.items(), key=lambda kv: kv[1])}}  # fmt: skip


def step_seconds(projections: list[Projection], blocks: list[Blocks]) -> float:
    """One graph of the whole step's GEMVs in decode order, each projection with its `blocks`."""
    *layer_projections, lm_head = projections
    tables = [((0, b),) for b in blocks]

    def launches() -> None:
        for layer in range(len(layer_projections[0].weights)):
            for projection, table in zip(layer_projections, tables):
                with BlockTables(table, table):
                    projection.launch(projection.weights[layer])
        with BlockTables(tables[-1], tables[-1]):
            lm_head.launch(lm_head.weights[0])

    return graph_seconds(launches)


def read_bandwidth(num_bytes: int = 2 << 30) -> float:
    x = torch.ones(num_bytes // 2, device="cuda", dtype=torch.bfloat16)
    return num_bytes / graph_seconds(lambda: x.sum(dtype=torch.float32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reasoner_throughput import copy_bandwidth_bytes_per_s

    torch.manual_seed(0)
    gemvs = projections(args.layers)
    results = [sweep(projection) for projection in gemvs]
    step_bytes = sum(p.bytes * len(p.weights) for p in gemvs[:-1]) + gemvs[-1].bytes
    report = {
        "device": torch.cuda.get_device_name(),
        "layers": args.layers,
        "copy_bytes_per_s": copy_bandwidth_bytes_per_s(),
        "read_bytes_per_s": read_bandwidth(),
        "gemvs": results,
        "step_bytes": step_bytes,
        "step_current_s": step_seconds(gemvs, [tuple(r["current"]) for r in results]),
        "step_best_s": step_seconds(gemvs, [tuple(r["best"]) for r in results]),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def print_report(report: dict) -> None:
    copy_bw, read_bw = report["copy_bytes_per_s"], report["read_bytes_per_s"]
    print(f"\nbatch-1 GEMV block shapes, {report['device']}: copy {copy_bw / 1e12:.2f} TB/s, read (sum) "
          f"{read_bw / 1e12:.2f} TB/s; us per launch, {report['layers']} distinct weights per graph")  # fmt: skip
    print(f"{'GEMV':24}{'N x K':>14}{'ideal':>8}{'current':>9}{'blocks':>20}{'TB/s':>6}{'best':>8}{'blocks':>20}"
          f"{'TB/s':>6}")  # fmt: skip
    for r in report["gemvs"]:
        ideal = r["bytes"] / copy_bw
        print(f"{r['name']:24}{'%d x %d' % tuple(r['shape']):>14}{ideal * 1e6:8.1f}{r['current_s'] * 1e6:9.1f}"
              f"{str(tuple(r['current'])):>20}{r['bytes'] / r['current_s'] / 1e12:6.2f}{r['best_s'] * 1e6:8.1f}"
              f"{str(tuple(r['best'])):>20}{r['bytes'] / r['best_s'] / 1e12:6.2f}")  # fmt: skip
    total = report["step_bytes"]
    print(f"\nstep GEMVs ({total / 1e9:.2f} GB): current {report['step_current_s'] * 1e3:.3f} ms, fastest shapes "
          f"{report['step_best_s'] * 1e3:.3f} ms; at the copy bandwidth {total / copy_bw * 1e3:.3f} ms, at the read "
          f"bandwidth {total / read_bw * 1e3:.3f} ms")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
