"""Everything that differs between the vLLM releases cosmos3-serve supports (0.26 to 0.33), in one module.

- 0.26 knows only EVS video pruning (`video_pruning_rate`); 0.32 adds `video_pruning_method` ("evs", "vidcom2").
- The OpenAI server's building blocks moved from `vllm.entrypoints.openai.{api_server,cli_args}` and
  `vllm.entrypoints.launcher` (0.26) to `vllm.entrypoints.launchers` (0.32); `openai_server_api()` finds them.
- FlashAttention's metadata (`FlashAttentionMetadata`): 0.26 has cascade attention (`use_cascade`), the KV cache
  group's window (`sliding_window`) and PrefixLM ranges per request (`mm_prefix_range_tensor`); 0.32 drops the
  first two and has the ranges per query token (`mm_prefix_query_range_tensor`). `is_plain_causal_flash_attention`
  reads either.

Changes to vLLM's internals (patches, class swaps) are in `patches`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace
from typing import Any

import torch
import vllm

VLLM_VERSION: tuple[int, int] = tuple(int(p) for p in vllm.__version__.split(".")[:2])  # type: ignore[assignment]
VIDEO_PRUNING_METHODS: tuple[str, ...] = ("evs",) if VLLM_VERSION < (0, 32) else ("evs", "vidcom2")


def video_pruning_kwargs(rate: float | None, method: str = "evs") -> dict[str, Any]:
    """Engine arguments for video-token pruning at `rate` (fraction dropped) with `method`."""
    if rate is None or rate == 0:
        return {}
    if method not in VIDEO_PRUNING_METHODS:
        raise ValueError(f"video pruning method {method!r} needs vLLM >= 0.32; this vLLM knows {VIDEO_PRUNING_METHODS}")
    kwargs: dict[str, Any] = {"video_pruning_rate": rate}
    if VLLM_VERSION >= (0, 32):
        kwargs["video_pruning_method"] = method
    return kwargs


def openai_server_api() -> SimpleNamespace:
    """vLLM's OpenAI-server functions, wherever this release keeps them: `make_arg_parser`,
    `validate_parsed_serve_args`, `setup_server`, `build_async_engine_client`, `build_app`, `init_app_state`."""
    if importlib.util.find_spec("vllm.entrypoints.launchers") is None:  # 0.26: the api_server module has most
        server = "vllm.entrypoints.openai.api_server"
        where = {"cli_args": "vllm.entrypoints.openai.cli_args", "setup": server, "entry": server, "app": server, "app_state": server}  # fmt: skip
    else:
        launchers = "vllm.entrypoints.launchers"
        where = {"cli_args": f"{launchers}.cli_args", "setup": f"{launchers}.launcher", "entry": f"{launchers}.api_server.entry",
                 "app": f"{launchers}.app", "app_state": f"{launchers}.api_server.app_state"}  # fmt: skip
    module = {role: importlib.import_module(name) for role, name in where.items()}
    return SimpleNamespace(
        make_arg_parser=module["cli_args"].make_arg_parser,
        validate_parsed_serve_args=module["cli_args"].validate_parsed_serve_args,
        setup_server=module["setup"].setup_server,
        build_async_engine_client=module["entry"].build_async_engine_client,
        build_app=module["app"].build_app,
        init_app_state=module["app_state"].init_app_state,
    )


def is_plain_causal_flash_attention(metadata: Any) -> bool:
    """Whether vLLM's `FlashAttentionMetadata` asks for nothing but causal attention of each request's queries over
    its paged K/V: no cascade, window, PrefixLM ranges, reference sliding window (R-SWA) or per-request causal
    flags."""
    return (
        not getattr(metadata, "use_cascade", False)
        and getattr(metadata, "sliding_window", None) in (None, (-1, -1))
        and getattr(metadata, "mm_prefix_range_tensor", None) is None
        and getattr(metadata, "mm_prefix_query_range_tensor", None) is None
        and getattr(metadata, "rswa_prefix_lens", None) is None
        and not isinstance(metadata.causal, torch.Tensor)
    )
