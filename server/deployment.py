"""The generator's deployment defaults, by the device the engine runs on.

On a GPU the largest request admitted by default is the reference pipeline's own default video (1280x720, 189
frames, guidance on): the worker measures what it needs at startup and vLLM's KV cache takes what is left of its
`gpu_memory_utilization` (`patches.reserve_generator_memory`). On the CPU (development: the tiny checkpoint) the
defaults are small, and vLLM's KV cache, which vLLM would size to 92 % of the host's memory, gets a share of the
memory that is free. With no `--max-model-len`, vLLM fits the reasoner's context to the KV cache that is left
(`AUTO_MAX_MODEL_LEN`): a checkpoint's native context (262,144 tokens for Cosmos 3) does not fit beside the
generator on one card.
"""

from __future__ import annotations

from cosmos3_serve.model_executor.admission import DEFAULT_MAX_BATCH_TOKENS, GeneratorSettings

GPU_MAX_SHAPE = (1280, 720, 189)  # width, height, frames
CPU_MAX_SHAPE = (512, 512, 33)
MAX_PROMPT_TOKENS = 8192
GPU_STATE_BUDGET_BYTES = 4 << 30
CPU_STATE_BUDGET_BYTES = 1 << 30
# vLLM's CPU KV cache by default: this share of the host's free memory, within these bounds.
CPU_KV_CACHE_SHARE = 1 / 8
CPU_KV_CACHE_BOUNDS = (1 << 30, 16 << 30)
AUTO_MAX_MODEL_LEN = -1  # vLLM's "fit the context to the KV cache"


def on_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def parse_shape(text: str) -> tuple[int, int, int]:
    """`WIDTHxHEIGHTxFRAMES` -> (width, height, frames)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"expected WIDTHxHEIGHTxFRAMES of positive integers, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def generator_settings(max_shape: tuple[int, int, int] | None = None, max_batch_tokens: int | None = None,
                       vae_dtype: str = "float32", state_budget_bytes: int | None = None,
                       gpu: bool | None = None, max_model_len: int | None = None,
                       a16_steps: int | None = None, attention_precision: str = "bf16",
                       parallel: str = "cfg=1,sp=1") -> GeneratorSettings:  # fmt: skip
    """The settings of a deployment, each left as None taking its default for the device. A prompt's prefill
    computes one token, so a prompt holds at most `max_model_len - 1` tokens (the engine's context)."""
    gpu = on_gpu() if gpu is None else gpu
    return GeneratorSettings(
        max_batch_tokens=max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS,
        vae_dtype=vae_dtype,
        max_shape=max_shape or (GPU_MAX_SHAPE if gpu else CPU_MAX_SHAPE),
        max_prompt_tokens=MAX_PROMPT_TOKENS if max_model_len is None else min(MAX_PROMPT_TOKENS, max_model_len - 1),
        state_budget_bytes=state_budget_bytes or (GPU_STATE_BUDGET_BYTES if gpu else CPU_STATE_BUDGET_BYTES),
        a16_steps=a16_steps,
        attention_precision=attention_precision,
        parallel=parallel,
    )


def cpu_kv_cache_bytes() -> int:
    """vLLM's KV cache on the CPU when the deployment names no memory share: a part of the free memory."""
    import psutil

    low, high = CPU_KV_CACHE_BOUNDS
    return int(min(max(psutil.virtual_memory().available * CPU_KV_CACHE_SHARE, low), high))
