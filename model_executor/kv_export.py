"""Export of the reasoner's prompt K/V to the generator, through vLLM's KV-connector API.

A request becomes a *generation context* when its sampling params carry
`extra_args={"kv_transfer_params": {"cosmos3_export": KEY}}` (see `generation_context_args`). Usually it is
prefill-only (`max_tokens=1`). In the step that completes its prefill:

- scheduler side (`Cosmos3KVExportConnector` in the engine core): `build_connector_meta` lists the request's
  blocks, cached prefix blocks included, and its prompt length;
- worker side (one per tensor-parallel rank): after the forward (`wait_for_save`) every attention layer's blocks
  are read out of vLLM's paged cache (on CUDA all layers in one kernel, `kv_gather`), which holds K after
  `norm_k` and mRoPE, exactly what the generator's queries attend to, and V, and are put in the process-local
  `PROMPT_KV_STORE` under KEY as a `PromptKV` (`[layers, 2, num_tokens, num_kv_heads_of_this_rank, head_dim]`).

When the generator re-normalises the reasoner's keys (`k_norm_und_for_gen`, checkpoints with
`qk_norm_for_text=False`), the exported keys are `RoPE(norm(RoPE^-1(K)))`: the cache holds `RoPE(K)`, RoPE is a
rotation, so this is exact. It needs the prompt's positions, which are 0..N-1 on every mRoPE axis for text-only
prompts (what generation prompts are); a multimodal generation context on such a checkpoint is refused with an
`error` in its `kv_transfer_params`.

The reasoner never runs again for that prompt: a second request with the same prefix is served from vLLM's
prefix cache and exported the same way. The generator takes the K/V from the store of its own worker process
(`take_prompt_kv`, also callable through `LLM.collective_rpc` from another process). The finished request
reports `{"cosmos3_export": KEY, "num_prompt_tokens": N}` in `RequestOutput.kv_transfer_params`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from cosmos3_serve.model_executor.checkpoint.generator_config import (
    KeyNorms,
    checkpoint_file,
    mrope_section,
    transformer_tensors,
)
from cosmos3_serve.model_executor.rope import InterleavedMRoPE, apply_rope

logger = logging.getLogger(__name__)
EXPORT_PARAM = "cosmos3_export"
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def generation_context_args(key: str) -> dict[str, Any]:
    """`SamplingParams.extra_args` marking a request as a generation context exported under `key`."""
    return {"kv_transfer_params": {EXPORT_PARAM: key}}


@dataclass
class PromptKV:
    """The prompt's K/V of every reasoner layer, as the generator consumes them (one tensor-parallel shard), in one
    tensor: a batch packs its prompts' K/V of all layers with one concatenation."""

    kv: torch.Tensor  # [layers, 2 (K, V), num_tokens, num_kv_heads, head_dim]; K after norm_k and mRoPE

    @classmethod
    def from_layers(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> PromptKV:
        """From per-layer keys and values `[num_tokens, num_kv_heads, head_dim]`."""
        return cls(torch.stack([torch.stack(keys), torch.stack(values)], dim=1))

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per layer `[num_tokens, num_kv_heads, head_dim]` (views)."""
        return list(self.kv[:, 0].unbind(0))

    @property
    def values(self) -> list[torch.Tensor]:
        return list(self.kv[:, 1].unbind(0))

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[2]

    def to(self, device: torch.device | str) -> PromptKV:
        return PromptKV(self.kv.to(device))

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PromptKVStore:
    """Process-local hand-off from the connector (writer) to the generator (reader), keyed by export key.

    Bounded by `max_bytes`: the drivers prefill only what the generator's state budget holds, so the bound is met
    only when a driver lost track of what it exported (it died, or never admitted a prompt); then the oldest entries
    go, with a warning, and a late admission of one of them fails naming the cause."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, PromptKV] = {}
        self.max_bytes = max_bytes

    def put(self, key: str, prompt_kv: PromptKV) -> None:
        with self._lock:
            self._items[key] = prompt_kv
            if self.max_bytes is None:
                return
            held = sum(item.nbytes for item in self._items.values())
            while held > self.max_bytes and len(self._items) > 1:
                oldest = next(iter(self._items))
                held -= self._items.pop(oldest).nbytes
                logger.warning("prompt K/V store over its bound of %d bytes: dropped %s", self.max_bytes, oldest)

    def take(self, key: str) -> PromptKV:
        with self._lock:
            return self._items.pop(key)

    def discard(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())


PROMPT_KV_STORE = PromptKVStore()


def take_prompt_kv(worker: Any, key: str) -> PromptKV:
    """`LLM.collective_rpc(take_prompt_kv, args=(key,))`: each rank returns (and forgets) its shard."""
    del worker
    return PROMPT_KV_STORE.take(key)


class PagedKVReader:
    """Reads K and V of whole blocks out of one layer's paged KV cache of vLLM's CPU backend (on CUDA, vLLM's
    FlashAttention caches of all layers are read by one kernel: `kv_gather`).

    The logical cache shape is `[num_blocks, num_kv_heads, block_size, 2 * head_dim]`: per block and head, one slab
    of `block_size * head_dim` for K then one for V, packed by the kernel's instruction set: `vec` stores K
    transposed (`[head_dim, block_size]`) and V as is; `amx` stores K as 16-token tiles of bf16 pairs and V as
    `[head_dim / 16, block_size / 2, 16, 2]` tiles.
    """

    def __init__(self, cache: torch.Tensor, layout: str) -> None:
        if layout not in ("cpu_vec", "cpu_amx"):
            raise NotImplementedError(f"reading K/V from a {layout!r} paged cache is not supported")
        self.cache = cache
        self.layout = layout
        _, self.num_kv_heads, self.block_size, two_head_dim = cache.shape
        self.head_dim = two_head_dim // 2

    @classmethod
    def for_attention_layer(cls, cache: torch.Tensor, attention: torch.nn.Module) -> PagedKVReader:
        backend = attention.attn_backend.get_name()
        if backend == "CPU_ATTN":
            return cls(cache, f"cpu_{getattr(attention.impl, 'isa', None) or getattr(attention, 'isa', None)}")
        return cls(cache, backend)

    def read(self, index: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V `[num_tokens, num_kv_heads, head_dim]` of the first `num_tokens` slots of the cache blocks `index`."""
        blocks = self.cache.index_select(0, index)  # [nb, H, N, 2D]
        nb, h, n, d = len(index), self.num_kv_heads, self.block_size, self.head_dim
        slabs = blocks.view(nb, h, 2, n * d)
        if self.layout == "cpu_vec":
            k = slabs[:, :, 0].reshape(nb, h, d, n).transpose(-1, -2)
            v = slabs[:, :, 1].reshape(nb, h, n, d)
        else:  # cpu_amx: K in int32 pairs of bf16, 16 tokens per tile
            k_pairs = slabs[:, :, 0].contiguous().view(torch.int32).view(nb, h, n // 16, d // 2, 16)
            k = k_pairs.permute(0, 1, 2, 4, 3).contiguous().view(blocks.dtype).view(nb, h, n, d)
            v = slabs[:, :, 1].reshape(nb, h, d // 16, n // 2, 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(nb, h, n, d)
        k = k.transpose(1, 2).reshape(nb * n, h, d)[:num_tokens]
        v = v.transpose(1, 2).reshape(nb * n, h, d)[:num_tokens]
        return k.contiguous(), v.contiguous()


class GeneratorKeyNorm:
    """`k_norm_und_for_gen` on cached keys: `RoPE(RMSNorm_w(RoPE^-1(K)))` at text positions 0..N-1."""

    def __init__(self, weights: list[torch.Tensor], eps: float, rope: InterleavedMRoPE) -> None:
        self.weights = weights  # per layer [head_dim]
        self.eps = eps
        self.rope = rope

    @classmethod
    def from_checkpoint(cls, model: str, num_layers: int) -> GeneratorKeyNorm:
        import json

        config = json.loads(checkpoint_file(model, "transformer/config.json").read_text())
        tensors = dict(transformer_tensors(model, lambda key: ".k_norm_und_for_gen." in key))
        weights = [tensors[f"layers.{i}.self_attn.k_norm_und_for_gen.weight"].float() for i in range(num_layers)]
        rope = InterleavedMRoPE(weights[0].shape[0], config.get("rope_theta", 5e6), mrope_section(config))
        return cls(weights, eps=config.get("rms_norm_eps", 1e-6), rope=rope)

    def __call__(self, layer: int, keys_thd: torch.Tensor) -> torch.Tensor:
        text_positions = torch.arange(keys_thd.shape[0], device=keys_thd.device).expand(3, -1)  # same on T, H, W
        cos, sin = self.rope(text_positions)
        raw = apply_rope(keys_thd.float(), cos, -sin)
        normed = raw * torch.rsqrt(raw.pow(2).mean(-1, keepdim=True) + self.eps) * self.weights[layer].to(raw.device)
        return apply_rope(normed, cos, sin).to(keys_thd.dtype)


@dataclass
class _Export:
    request_id: str
    key: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class Cosmos3ExportMetadata(KVConnectorMetadata):
    exports: list[_Export] = field(default_factory=list)


class Cosmos3KVExportConnector(KVConnectorBase_V1):
    """Producer-only KV connector: exports the prompt K/V of generation contexts, loads nothing."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._block_size = vllm_config.cache_config.block_size
        self._pending: dict[str, Any] = {}  # scheduler: request id -> Request, until its prefill completes
        self._block_ids: dict[str, list[int]] = {}  # scheduler: blocks of pending requests, cached prefix included
        self._readers: list[PagedKVReader] = []  # worker on CPU: one per attention layer, in layer order
        self._gather = None  # worker on CUDA: a `kv_gather.PagedKVGather` over all layers' caches
        self._blocks_per_scheduler_block = 1  # worker: the attention kernel may split scheduler blocks
        self._cache_device = torch.device("cpu")
        self._key_norms = KeyNorms.of_checkpoint(vllm_config.model_config.model)
        self._generator_key_norm: GeneratorKeyNorm | None = None  # worker, when the checkpoint needs it

    # Scheduler side -------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # nothing is loaded from outside: prefix hits come from vLLM's own cache

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if EXPORT_PARAM not in (request.kv_transfer_params or {}):
            return
        if self._key_norms.und_k_norm_for_gen and request.has_encoder_inputs:
            return  # refused in request_finished: the re-normalisation needs text positions
        self._pending[request.request_id] = request

    def build_connector_meta(self, scheduler_output) -> Cosmos3ExportMetadata:
        self._track_block_ids(scheduler_output)
        meta = Cosmos3ExportMetadata()
        for request_id, request in list(self._pending.items()):
            scheduled = scheduler_output.num_scheduled_tokens.get(request_id, 0)
            # num_computed_tokens advances after this call: this step completes the prefill if it reaches the end.
            if scheduled and request.num_computed_tokens + scheduled >= request.num_prompt_tokens:
                num_blocks = math.ceil(request.num_prompt_tokens / self._block_size)
                block_ids = self._block_ids.pop(request_id)[:num_blocks]
                key = request.kv_transfer_params[EXPORT_PARAM]
                meta.exports.append(_Export(request_id, key, block_ids, request.num_prompt_tokens))
                del self._pending[request_id]
        return meta

    def _track_block_ids(self, scheduler_output) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._pending:
                self._block_ids[new.req_id] = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for request_id, new_block_ids in zip(cached.req_ids, cached.new_block_ids):
            if request_id not in self._pending or new_block_ids is None:
                continue
            if request_id in cached.resumed_req_ids:  # resumed after preemption: the full list
                self._block_ids[request_id] = list(new_block_ids[0])
            else:
                self._block_ids[request_id].extend(new_block_ids[0])

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._pending.pop(request.request_id, None)
        self._block_ids.pop(request.request_id, None)
        params = request.kv_transfer_params or {}
        if EXPORT_PARAM not in params:
            return False, None
        reply = {EXPORT_PARAM: params[EXPORT_PARAM], "num_prompt_tokens": request.num_prompt_tokens}
        if self._key_norms.und_k_norm_for_gen and request.has_encoder_inputs:
            reply["error"] = "this checkpoint's generator re-normalises reasoner keys: generation contexts must be text"
        # The worker copied the K/V out synchronously: the blocks can be freed (or kept by the prefix cache).
        return False, reply

    # Worker side ----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        attention_layers = self._vllm_config.compilation_config.static_forward_context
        names = sorted(kv_caches, key=lambda name: int(_LAYER_INDEX.search(name).group(1)))
        caches, layers = [kv_caches[name] for name in names], [attention_layers[name] for name in names]
        self._blocks_per_scheduler_block = self._block_size // caches[0].shape[2]  # cache blocks per scheduler block
        self._cache_device = caches[0].device
        if caches[0].is_cuda and all(layer.attn_backend.get_name() == "FLASH_ATTN" for layer in layers):
            from cosmos3_serve.model_executor.kv_gather import PagedKVGather

            self._gather = PagedKVGather(caches)
        else:
            self._readers = [PagedKVReader.for_attention_layer(cache, layer) for cache, layer in zip(caches, layers)]
        if self._key_norms.und_k_norm_for_gen:
            self._generator_key_norm = GeneratorKeyNorm.from_checkpoint(self._vllm_config.model_config.model, len(names))

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        return None  # the whole prompt (cached blocks too) is read once all layers are written: wait_for_save

    def wait_for_save(self) -> None:
        for export in self._get_connector_metadata().exports:
            PROMPT_KV_STORE.put(export.key, self.read_prompt(export.block_ids, export.num_tokens))

    def read_prompt(self, block_ids: list[int], num_tokens: int) -> PromptKV:
        """The K/V of a prompt of `num_tokens` tokens in the scheduler blocks `block_ids`, from every layer."""
        r = self._blocks_per_scheduler_block  # every layer's cache has the same block layout: one index for all
        index = torch.tensor([b * r + j for b in block_ids for j in range(r)]).to(self._cache_device, non_blocking=True)
        if self._gather is not None:
            prompt_kv = PromptKV(self._gather.gather(index, num_tokens))
        else:
            prompt_kv = PromptKV.from_layers(*zip(*(reader.read(index, num_tokens) for reader in self._readers)))
        if self._generator_key_norm is None:
            return prompt_kv
        return PromptKV.from_layers([self._generator_key_norm(layer, k) for layer, k in enumerate(prompt_kv.keys)],
                                    prompt_kv.values)  # fmt: skip
