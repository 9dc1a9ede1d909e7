"""Session fixtures: the tiny checkpoint, the reference implementations (oracles) and one vLLM engine.

Everything heavy is built once per test session: the checkpoint is written once, vLLM starts once (in this
process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), and the diffusers / transformers references load once, in float32.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests import oracle  # noqa: E402

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random checkpoint (compact vocabulary, action head) in the released unified layout.

    `COSMOS3_TEST_CHECKPOINT` names one written beforehand by `cosmos3-serve make-tiny OUT --vocab compact
    --action` (the GPU machine's transformers predates `Cosmos3OmniConfig`, which the writer uses)."""
    from cosmos3_serve.model_executor.checkpoint.writer import write_checkpoint

    if os.environ.get("COSMOS3_TEST_CHECKPOINT"):
        return Path(os.environ["COSMOS3_TEST_CHECKPOINT"])

    return write_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "cosmos3-tiny", seed=TINY_SEED, vocab="compact", action=True, progress=False
    )


@pytest.fixture(scope="session")
def diffusers_pipeline(tiny_checkpoint: Path):
    """diffusers' Cosmos3OmniPipeline on the tiny checkpoint, float32 on CPU: the generator oracle."""
    return oracle.load_diffusers_pipeline(tiny_checkpoint)


@pytest.fixture(scope="session")
def transformers_reasoner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> oracle.Reasoner:
    """transformers' Cosmos3OmniForConditionalGeneration on the tiny checkpoint, float32: the reasoner oracle."""
    return oracle.load_transformers_reasoner(tiny_checkpoint, tmp_path_factory.mktemp("tf-view"))


@pytest.fixture(scope="session")
def vllm_reasoner(tiny_checkpoint: Path):
    """One vLLM engine (vllm-cpu, float32, eager) with our plugin and K/V export, for the whole session."""
    from vllm import LLM

    from cosmos3_serve.model_executor.engine_args import generation_engine_args
    from cosmos3_serve.server.deployment import generator_settings

    return LLM(
        str(tiny_checkpoint),
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        limit_mm_per_prompt={"image": 2, "video": 1},
        **generation_engine_args(generator_settings(gpu=False)),
        seed=0,
    )
