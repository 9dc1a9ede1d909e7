"""Export the prompt K/V of token-id prompts from a fresh vLLM engine, in its own process (one engine with the
K/V connector per process: vLLM keeps the connector process-global).

    python -m tests.export_prompt_kv CKPT OUT.pt '[[ids...], [ids...]]'
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    import torch
    from vllm import LLM, SamplingParams

    from cosmos3_serve.model_executor import kv_export
    from cosmos3_serve.model_executor.engine_args import kv_transfer_config

    checkpoint, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(checkpoint, dtype="float32", enforce_eager=True, max_model_len=4096,
              kv_transfer_config=kv_transfer_config(), seed=0)  # fmt: skip
    exported = []
    for i, token_ids in enumerate(prompts):
        params = SamplingParams(max_tokens=1, extra_args=kv_export.generation_context_args(f"p{i}"))
        llm.generate({"prompt_token_ids": token_ids}, params, use_tqdm=False)
        prompt_kv = kv_export.PROMPT_KV_STORE.take(f"p{i}")
        exported.append({"keys": prompt_kv.keys, "values": prompt_kv.values})
    torch.save(exported, out)


if __name__ == "__main__":
    main()
