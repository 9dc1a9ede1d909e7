"""Serve a quantized checkpoint with vLLM on the CPU in its own process (one engine with the K/V connector per
process): the latents of generation requests and the reasoner's teacher-forced top-1 token at every position of a
text.

    python -m tests.quantized_engine_probe CKPT OUT.pt '{"a16_steps": N | null, "requests": [{...}], "text": "..."}'
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    import torch
    from cosmos3_serve.model_executor.engine_args import generation_engine_args
    from cosmos3_serve.model_executor.generation_client import Cosmos3Generator
    from cosmos3_serve.model_executor.request import GenerationRequest
    from cosmos3_serve.quant.precision import precision_engine_args
    from cosmos3_serve.server.deployment import generator_settings
    from vllm import LLM, SamplingParams

    checkpoint, out, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    settings = generator_settings(gpu=False, a16_steps=spec.get("a16_steps"))
    llm = LLM(checkpoint, **precision_engine_args("auto", Path(checkpoint), on_cpu=True), enforce_eager=True,
              max_model_len=2048, kv_cache_memory_bytes=1 << 28, limit_mm_per_prompt={"image": 1, "video": 1},
              **generation_engine_args(settings), seed=0)  # fmt: skip
    generator = Cosmos3Generator(checkpoint, llm)
    latents = [generator.generate_latents(GenerationRequest(**request)) for request in spec["requests"]]
    top1 = []
    if spec.get("text"):
        [output] = llm.generate([spec["text"]], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
        top1 = [next(t for t, logprob in position.items() if logprob.rank == 1)
                for position in output.prompt_logprobs[1:]]  # fmt: skip
    torch.save({"latents": latents, "top1": top1, "towers": generator.info["towers"]}, out)


if __name__ == "__main__":
    main()
