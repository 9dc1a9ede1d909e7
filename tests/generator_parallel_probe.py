"""The generator's executor on two CPU ranks (gloo), its work split by `--generator-parallel` degrees, as vLLM's
tensor-parallel workers hold it, without a reasoner engine: each rank gets its tensor-parallel shard (heads) of
given prompt K/V, admits the given requests, steps until they finish and collects its share of the results.

    python -m tests.generator_parallel_probe CKPT IN.pt OUT DEGREES [DEGREES ...]

IN.pt: {"requests": {id: GenerationRequest}, "prompt_kv": {id: [kv [layers, 2, tokens, kv heads, head_dim]]}}.
OUT.DEGREES.RANK: for each degrees (one executor after the other) and rank, the outputs it collected
({id: (video, actions)}), its batch's tokens per request, every finished request's output (before the collection
deals them) and which splits ran.
"""

from __future__ import annotations

import os
import socket
import sys

WORLD = 2


def rank_main(rank: int, checkpoint: str, spec_path: str, out: str, all_degrees: list[str], port: int) -> None:
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
    config = EngineArgs(model=checkpoint, dtype="float32", tensor_parallel_size=WORLD, max_model_len=2048,
                        enforce_eager=True).create_engine_config()  # fmt: skip
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
        initialize_model_parallel(WORLD)
        spec = torch.load(spec_path, weights_only=False)
        for degrees in all_degrees:
            group = GeneratorGroup.of_tensor_parallel_group(torch.device("cpu"), ParallelDegrees.parse(degrees))
            torch.save(_run(DiffusionExecutor(checkpoint, config, torch.device("cpu"), group=group), spec, rank),
                       f"{out}.{degrees}.{rank}")  # fmt: skip


def _run(executor, spec: dict, rank: int) -> dict:
    from cosmos3_serve.model_executor.kv_export import PromptKV

    entries = []
    for request_id, request in spec["requests"].items():
        shards = [kv.chunk(WORLD, dim=3)[rank].contiguous() for kv in spec["prompt_kv"][request_id]]
        entries.append((request_id, request, [PromptKV(kv) for kv in shards], False))
    errors = executor.admit(entries)
    tokens = {state.request_id: state.num_tokens for state in executor.active}
    while executor.active:
        executor.step()
    finished = {request_id: (o.video, o.actions) for request_id, o in executor.finished.items()}
    executor.collect(list(executor.finished))
    collected, _ = executor.ready_results(wait=True)
    split = {"ulysses": executor.tower.ulysses is not None, "branches": executor.group.branches is not None}
    return {"errors": errors, "tokens": tokens, "finished": finished, "split": split,
            "collected": {i: (o.video, o.actions) for i, o in collected.items()}}  # fmt: skip


def main() -> None:
    import torch.multiprocessing as mp

    checkpoint, spec_path, out, *all_degrees = sys.argv[1:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.start_processes(rank_main, args=(checkpoint, spec_path, out, all_degrees, port), nprocs=WORLD, join=True,
                       start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
