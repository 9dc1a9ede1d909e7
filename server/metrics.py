"""Prometheus metrics of the generator side, in the default registry that vLLM's `/metrics` also renders
(so one scrape returns the reasoner's `vllm:*` series and these `cosmos3_*` ones)."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REQUESTS = Counter("cosmos3_generation_requests", "Generation jobs by mode and final status", ["mode", "status"])
REJECTED = Counter("cosmos3_generation_rejected", "Generation jobs refused because the service was full", ["mode"])
LATENCY = Histogram(
    "cosmos3_generation_latency_seconds",
    "Submission to result of succeeded generation jobs, by mode",
    ["mode"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)
PHASE_SECONDS = Histogram(
    "cosmos3_generation_phase_seconds",
    "Where a succeeded job's time went, by mode: memory_wait (waiting for room in the generator's state budget; "
    "only jobs that waited), prefill (its prompts through the reasoner), queue (prefilled "
    "until its first denoising step), denoise (first step until its result is back, VAE decode included), "
    "decode (the VAE decode alone, in the worker), encode (PNG / MP4)",
    ["mode", "phase"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
)
QUEUE_DEPTH = Gauge("cosmos3_generation_queue_depth", "Jobs whose prompts are being prefilled, not yet denoising")
BATCH_SIZE = Histogram(
    "cosmos3_denoise_batch_size",
    "Jobs denoised together in one step (within the step's token budget)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
STEP_SECONDS = Histogram(
    "cosmos3_denoise_step_seconds",
    "Host seconds of one denoising step of the batch in the generator loop (the device works one step behind)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROMPT_KV_TOKENS = Counter(
    "cosmos3_prompt_kv_tokens",
    "Prompt tokens whose reasoner K/V the generator consumed: computed by a prefill, or reused from vLLM's "
    "prefix cache",
    ["source"],
)


class DeviceMemoryCollector:
    """`cosmos3_device_memory_used_bytes` / `_total_bytes` per GPU, read through NVML at scrape time (this
    process never touches CUDA itself; nothing is reported on a machine without NVIDIA GPUs)."""

    def collect(self):
        try:
            from vllm.third_party import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVIDIA driver: no series
            return
        used = GaugeMetricFamily("cosmos3_device_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("cosmos3_device_memory_total_bytes", "GPU memory in total", labels=["gpu"])
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
                used.add_metric([str(index)], info.used)
                total.add_metric([str(index)], info.total)
        finally:
            pynvml.nvmlShutdown()
        yield used
        yield total


REGISTRY.register(DeviceMemoryCollector())


def exposition() -> bytes:
    """Every metric of this process in Prometheus' text format."""
    return generate_latest(REGISTRY)
