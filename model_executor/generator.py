"""The Cosmos 3 generator tower, built from vLLM's parallel, quantizable layers.

Per layer (diffusers `Cosmos3VLTextMoTDecoderLayer`, generator half): `input_layernorm_moe_gen` -> `add_{q,k,v}_proj`
-> per-head `norm_added_{q,k}` -> mRoPE at the generator tokens' positions -> attention over
[reasoner K/V of the prompt ; generator K/V] -> `to_add_out` -> residual -> `post_attention_layernorm_moe_gen` ->
`mlp_moe_gen` -> residual. The reasoner's K/V come from `kv_export.PromptKV` (already normed and rotated): the
reasoner tower never runs here. Requests are packed without padding: a `GeneratorSequence` per request and CFG
branch holds its token counts and its prompt K/V, and `PackedBatch` the layout in which the queries of a sequence
see only its own keys. A sequence's generator tokens are its latent patches (`proj_in`), then, in action modes,
its action tokens: `action_proj_in` with its embodiment's weights (`DomainAwareLinear`) + `action_modality_embed`.
Tokens that are not clean conditioning get the timestep embedding, latent patches and action tokens alike.

Tensor parallelism follows vLLM's: column-parallel projections split heads, row-parallel outputs all-reduce.
The prompt K/V of a rank are its own heads, as the reasoner's rank exported them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.platforms import current_platform
from vllm.triton_utils import tl, triton

from cosmos3_serve.model_executor.checkpoint.generator_config import (
    GeneratorConfig,
    is_generator_key,
    transformer_tensors,
)
from cosmos3_serve.model_executor.kv_export import PromptKV
from cosmos3_serve.model_executor.parallel_degrees import TowerShard
from cosmos3_serve.model_executor.rope import InterleavedMRoPE, apply_rope
from cosmos3_serve.model_executor.ulysses import Ulysses
from cosmos3_serve.model_executor.varlen_attention import varlen_attention
from cosmos3_serve.quant.precision import ATTENTION_PRECISIONS

TIME_PROJ_CHANNELS = 256
# Tokens per MLP chunk: GEMMs of this many rows still run at the kernels' full rate, and their intermediates are
# 0.8 GB at Nano's width; forwards small enough for a CUDA graph (`GRAPH_MAX_TOKENS`) run in one chunk.
MLP_CHUNK_TOKENS = 16_384
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a row-parallel output over the tensor-parallel ranks
current_platform.import_kernels()  # vLLM's C kernels (`torch.ops._C`): the norms call them on CUDA


@dataclass
class GeneratorSequence:
    """One sequence of a packed batch: a request's CFG branch."""

    num_vision_tokens: int  # latent patches of this sequence
    prompt_kv: PromptKV  # the reasoner's K/V of its prompt (this rank's heads)
    num_action_tokens: int = 0  # action tokens, after the latent patches
    action_domain: int = 0  # their embodiment: the row of the action heads

    @property
    def num_tokens(self) -> int:
        return self.num_vision_tokens + self.num_action_tokens


@dataclass
class TokenRows:
    """Where each modality's tokens sit in a packed batch: per sequence its latent patches, then its actions."""

    vision: torch.Tensor  # [Nv] rows of the latent patches
    actions: torch.Tensor  # [Na] rows of the action tokens
    action_domains: torch.Tensor  # [Na] embodiment domain of each action token

    @classmethod
    def build(cls, sequences: list[GeneratorSequence], device: torch.device) -> TokenRows:
        vision, actions, start = [], [], 0
        for seq in sequences:
            vision.append(torch.arange(start, start + seq.num_vision_tokens))
            actions.append(torch.arange(start + seq.num_vision_tokens, start + seq.num_tokens))
            start += seq.num_tokens
        rows = (torch.cat(vision), torch.cat(actions), action_domains(sequences))
        return cls(*(t.to(device, non_blocking=True) for t in rows))


def action_domains(sequences: list[GeneratorSequence]) -> torch.Tensor:
    """`[Na]` embodiment domain of each action token, sequence after sequence (on the host)."""
    return torch.cat([torch.full((seq.num_action_tokens,), seq.action_domain) for seq in sequences])


@dataclass
class PackedAttention:
    """Per-step layout of a packed batch: each sequence's queries see [its prompt K/V ; its own K/V].

    Built once per batch membership (not per step, not per layer): `key_order` interleaves the packed prompt keys
    of all sequences with the packed generator keys, so a layer's keys are `cat([prompt keys, gen keys])[key_order]`.
    """

    prompt_kv: torch.Tensor  # [layers, 2 (K, V), sum prompt tokens, kv heads, head_dim], sequence after sequence
    key_order: torch.Tensor  # [sum(prompt + gen tokens)]
    cu_seqlens_q: torch.Tensor  # int32 [sequences + 1]
    cu_seqlens_k: torch.Tensor  # int32 [sequences + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    num_tokens: int  # generator tokens of all sequences (queries)
    kv_heads: slice  # of the prompt K/V: all, or a sequence-parallel rank's (`ulysses.Ulysses.head_range`)

    @classmethod
    def build(cls, sequences: list[GeneratorSequence], device: torch.device,
              kv_heads: slice = slice(None)) -> PackedAttention:  # fmt: skip
        prompt_lens = [seq.prompt_kv.num_tokens for seq in sequences]
        gen_lens = [seq.num_tokens for seq in sequences]
        total_prompt = sum(prompt_lens)
        order, prompt_start, gen_start = [], 0, total_prompt
        for p, g in zip(prompt_lens, gen_lens):
            order += [torch.arange(prompt_start, prompt_start + p), torch.arange(gen_start, gen_start + g)]
            prompt_start, gen_start = prompt_start + p, gen_start + g
        lens_q = torch.tensor([0, *gen_lens])
        lens_k = torch.tensor([0, *(p + g for p, g in zip(prompt_lens, gen_lens))])
        return cls(
            prompt_kv=torch.cat([seq.prompt_kv.kv[:, :, :, kv_heads] for seq in sequences], dim=2),
            key_order=torch.cat(order).to(device, non_blocking=True),
            cu_seqlens_q=lens_q.cumsum(0).to(device=device, dtype=torch.int32, non_blocking=True),
            cu_seqlens_k=lens_k.cumsum(0).to(device=device, dtype=torch.int32, non_blocking=True),
            max_seqlen_q=max(gen_lens),
            max_seqlen_k=int(lens_k.max()),
            num_tokens=sum(gen_lens),
            kv_heads=kv_heads,
        )

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.prompt_kv[layer, 0].to(k.dtype), k])[self.key_order]
        values = torch.cat([self.prompt_kv[layer, 1].to(v.dtype), v])[self.key_order]
        return keys, values


BatchSignature = tuple[tuple[int, int, int], ...]  # per sequence: (prompt tokens, latent patches, action tokens)


def batch_signature(sequences: list[GeneratorSequence]) -> BatchSignature:
    return tuple((seq.prompt_kv.num_tokens, seq.num_vision_tokens, seq.num_action_tokens) for seq in sequences)


@dataclass
class PackedBatch:
    """Per-batch constants of the tower's forward, rebuilt only when requests join or leave.

    Batches of one `signature` have equal index tensors (key order, sequence lengths, token rows); they differ only
    in their data: rotary tables, prompt K/V and action domains, which `refill` replaces in place."""

    signature: BatchSignature
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [N, 1, head_dim]
    attention: PackedAttention
    rows: TokenRows | None  # None when no sequence has action tokens: all rows are latent patches
    first_tokens: torch.Tensor  # [sequences] row of each sequence's first token
    token_sequences: torch.Tensor  # [N] sequence of each token

    def refill(self, rope: tuple[torch.Tensor, torch.Tensor], sequences: list[GeneratorSequence]) -> None:
        """Take the data of `sequences` (a batch of the same signature) and their rotary tables into these tensors,
        in place: the index tensors stay, the prompt K/V are packed straight into this batch's."""
        signature = batch_signature(sequences)
        if signature != self.signature:
            raise ValueError(f"batch signatures differ: {signature} vs {self.signature}")
        for mine, theirs in zip(self.rope, rope):
            mine.copy_(theirs)
        heads = self.attention.kv_heads
        torch.cat([seq.prompt_kv.kv[:, :, :, heads] for seq in sequences], dim=2, out=self.attention.prompt_kv)
        if self.rows is not None:
            self.rows.action_domains.copy_(action_domains(sequences), non_blocking=True)


class GeneratorRMSNorm(nn.Module):
    """RMSNorm over the last dimension; with `residual`, the residual add first: `(norm(x + residual), x + residual)`.

    On CUDA it calls vLLM's C kernels (the add fused in, in place), whatever norm implementation the engine chose
    for its own compiled graphs: with Inductor that is the native one, which in this eager tower would run as
    several elementwise kernels per norm. Elsewhere it computes as the reference does (float32, weight after the
    cast back)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:
            if residual is None:
                out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
                torch.ops._C.rms_norm(out, x, self.weight, self.eps)
                return out
            torch.ops._C.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._native(x)
        residual = x + residual
        return self._native(residual), residual

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, out_ptr, weight_ptr, cos_ptr, sin_ptr, x_token_stride, rope_token_stride, num_heads, eps,
    BLOCK_H: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """One token: every head's RMSNorm over its head_dim (= 2 HALF), weight, then the rotation by (cos, sin)."""
    token = tl.program_id(0)
    head = tl.arange(0, BLOCK_H)[:, None]
    dim = tl.arange(0, HALF)[None, :]
    mask = head < num_heads
    src = x_ptr + token * x_token_stride + head * (2 * HALF) + dim
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    y1 = x1 * inv_rms * tl.load(weight_ptr + dim).to(tl.float32)
    y2 = x2 * inv_rms * tl.load(weight_ptr + HALF + dim).to(tl.float32)
    rope = token * rope_token_stride + dim
    cos1, cos2 = tl.load(cos_ptr + rope).to(tl.float32), tl.load(cos_ptr + rope + HALF).to(tl.float32)
    sin1, sin2 = tl.load(sin_ptr + rope).to(tl.float32), tl.load(sin_ptr + rope + HALF).to(tl.float32)
    dst = out_ptr + token * num_heads * (2 * HALF) + head * (2 * HALF) + dim
    tl.store(dst, (y1 * cos1 - y2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (y2 * cos2 + y1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_rope(x_nhd: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope(RMSNorm_weight(x), cos, sin)` in one kernel (float32 inside, rounded once): a contiguous
    `[N, H, D]` out of a `[N, H, D]` view whose heads are contiguous (a slice of the fused QKV projection's output);
    cos, sin `[N, 1, D]`. Replaces the separate norm and the five elementwise kernels of the rotation."""
    n, heads, head_dim = x_nhd.shape
    assert x_nhd.stride(2) == 1 and x_nhd.stride(1) == head_dim and cos.stride(0) == sin.stride(0)
    out = torch.empty((n, heads, head_dim), device=x_nhd.device, dtype=x_nhd.dtype)
    _rms_norm_rope_kernel[(n,)](x_nhd, out, weight, cos, sin, x_nhd.stride(0), cos.stride(0), heads, eps,
                                BLOCK_H=triton.next_power_of_2(heads), HALF=head_dim // 2)  # fmt: skip
    return out


class DomainAwareLinear(nn.Module):
    """One linear map per embodiment domain (diffusers `DomainAwareLinear`), replicated on every rank: a token is
    mapped by its domain's weight (`[in, out]`, stored flat) and bias."""

    def __init__(self, input_size: int, output_size: int, num_domains: int) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(num_domains, input_size * output_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_domains, output_size), requires_grad=False)

    def forward(self, x_nd: torch.Tensor, domains_n: torch.Tensor) -> torch.Tensor:
        weight = self.weight[domains_n].view(-1, self.input_size, self.output_size)
        return torch.bmm(x_nd[:, None], weight)[:, 0] + self.bias[domains_n]


class GeneratorAttention(nn.Module):
    def __init__(self, config: GeneratorConfig, prefix: str, quant_config: QuantizationConfig | None,
                 all_reduce: AllReduce, shard: TowerShard) -> None:  # fmt: skip
        super().__init__()
        tp = shard.size
        self.all_reduce = all_reduce
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = max(1, config.num_key_value_heads // tp)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=config.attention_bias, quant_config=quant_config, return_bias=False, prefix=f"{prefix}.qkv_proj",
            disable_tp=tp == 1,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=config.attention_bias,
            quant_config=quant_config, reduce_results=False, return_bias=False, prefix=f"{prefix}.o_proj",
            disable_tp=tp == 1,
        )  # fmt: skip
        self.q_norm = GeneratorRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = GeneratorRMSNorm(config.head_dim, config.rms_norm_eps)
        self.fp8 = False  # attention inputs in e4m3 (`Cosmos3GeneratorTower.set_attention_precision`)
        self.ulysses: Ulysses | None = None  # sequence parallelism (`Cosmos3GeneratorTower.set_sequence_parallel`)

    def forward(
        self, hidden_nd: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: PackedAttention, layer: int
    ) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_nd).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda:
            q = rms_norm_rope(q, self.q_norm.weight, self.q_norm.eps, *rope)
            k = rms_norm_rope(k, self.k_norm.weight, self.k_norm.eps, *rope)
        else:
            q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        if self.ulysses is not None:  # this rank's tokens of all heads -> all tokens of this rank's heads, and back
            counts = self.ulysses.counts(layout.num_tokens)
            q, k, v = (self.ulysses.to_heads(x, counts) for x in (q, k, v))
            keys, values = layout.keys_values(layer, k, v)
            out = self.ulysses.to_tokens(varlen_attention(q, keys, values, layout, self.fp8), counts)
        else:
            keys, values = layout.keys_values(layer, k, v)
            out = varlen_attention(q, keys, values, layout, self.fp8)
        return self.all_reduce(self.o_proj(out.reshape(-1, q_size)))


class GeneratorMLP(nn.Module):
    """SwiGLU MLP, run over at most `chunk_tokens` tokens at a time: its intermediate activations (9x the hidden
    size per token with the activation's output: 6.5 GB for the 88,320 tokens of a 720p, 189-frame request with
    guidance at Nano's width) are the largest of a tower forward, and a token's output depends on that token only."""

    def __init__(self, config: GeneratorConfig, prefix: str, quant_config: QuantizationConfig | None,
                 all_reduce: AllReduce, shard: TowerShard,
                 chunk_tokens: int = MLP_CHUNK_TOKENS) -> None:  # fmt: skip
        super().__init__()
        self.all_reduce, self.chunk_tokens = all_reduce, chunk_tokens
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False, quant_config=quant_config,
            return_bias=False, prefix=f"{prefix}.gate_up_proj", disable_tp=shard.size == 1,
        )  # fmt: skip
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=False, quant_config=quant_config,
            reduce_results=False, return_bias=False, prefix=f"{prefix}.down_proj", disable_tp=shard.size == 1,
        )  # fmt: skip
        self.act = SiluAndMul()

    def forward(self, x_nd: torch.Tensor) -> torch.Tensor:
        if x_nd.shape[0] <= self.chunk_tokens:
            return self.all_reduce(self.down_proj(self.act(self.gate_up_proj(x_nd))))
        out_nd = torch.empty_like(x_nd)
        for start in range(0, x_nd.shape[0], self.chunk_tokens):
            chunk = x_nd[start : start + self.chunk_tokens]
            out_nd[start : start + self.chunk_tokens] = self.down_proj(self.act(self.gate_up_proj(chunk)))
        return self.all_reduce(out_nd)


class GeneratorLayer(nn.Module):
    def __init__(self, config: GeneratorConfig, prefix: str, quant_config: QuantizationConfig | None,
                 all_reduce: AllReduce, shard: TowerShard) -> None:  # fmt: skip
        super().__init__()
        self.input_norm = GeneratorRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GeneratorAttention(config, f"{prefix}.attn", quant_config, all_reduce, shard)
        self.post_attention_norm = GeneratorRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GeneratorMLP(config, f"{prefix}.mlp", quant_config, all_reduce, shard)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, rope, layout: PackedAttention, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream): the residual additions ride in the norms' fused add + RMSNorm kernels.
        `hidden` is the previous layer's MLP output, or the embeddings with `residual` None in the first layer."""
        if residual is None:
            residual, hidden = hidden, self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm(hidden, residual)
        hidden, residual = self.post_attention_norm(self.attn(hidden, rope, layout, layer), residual)
        return self.mlp(hidden), residual


class Cosmos3GeneratorTower(nn.Module):
    """Latent patches and action tokens (+ timestep embedding) in, their velocities out. `quant_config` (the
    deployment's precision, e.g. FP8) applies to the layers' projections and MLPs; the patch, time and action
    embeddings stay in the compute dtype. `shard`: this rank's tensor-parallel shard of the layers (build it in
    `tower_loading.load_tower`, which shards vLLM's linear layers alike); `all_reduce` sums the row-parallel
    outputs over the shards' ranks in the generator's own process group (not the reasoner's: the towers step
    concurrently)."""

    def __init__(self, config: GeneratorConfig, quant_config: QuantizationConfig | None = None,
                 all_reduce: AllReduce | None = None, shard: TowerShard = TowerShard()) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.shard = shard
        self.proj_in = ReplicatedLinear(config.patch_latent_dim, config.hidden_size, bias=True, return_bias=False)
        self.proj_out = ReplicatedLinear(config.hidden_size, config.patch_latent_dim, bias=True, return_bias=False)
        # The time embedding stays in float32 at every precision, as in the reference.
        self.time_linear_1 = ReplicatedLinear(
            TIME_PROJ_CHANNELS, config.hidden_size, bias=True, params_dtype=torch.float32, return_bias=False
        )
        self.time_linear_2 = ReplicatedLinear(
            config.hidden_size, config.hidden_size, bias=True, params_dtype=torch.float32, return_bias=False
        )
        if config.action_dim is not None:
            self.action_proj_in = DomainAwareLinear(config.action_dim, config.hidden_size, config.num_embodiment_domains)
            self.action_proj_out = DomainAwareLinear(config.hidden_size, config.action_dim,
                                                     config.num_embodiment_domains)  # fmt: skip
            self.action_modality_embed = nn.Parameter(torch.empty(config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(
            GeneratorLayer(config, f"layers.{i}", quant_config, all_reduce or _unreduced, shard)
            for i in range(config.num_hidden_layers)
        )
        self.norm = GeneratorRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = InterleavedMRoPE(config.head_dim, config.rope_theta, config.rope_axes_dim)
        self.attention_precision = "bf16"
        self.ulysses: Ulysses | None = None

    def set_sequence_parallel(self, ulysses: Ulysses | None) -> None:
        """Run the layers on `ulysses`' shard of the tokens (None: all of them)."""
        if ulysses is not None:
            ulysses.head_range(self.num_kv_heads)  # the shard's heads divide among the ranks
        for layer in self.layers:
            layer.attn.ulysses = ulysses
        self.ulysses = ulysses

    @property
    def num_kv_heads(self) -> int:
        """Key / value heads of this shard."""
        return self.layers[0].attn.num_kv_heads

    def set_attention_precision(self, precision: str) -> None:
        """`"bf16"`: attention in the tower's 16-bit dtype; `"fp8"`: its inputs in e4m3 (`varlen_attention`)."""
        if precision not in ATTENTION_PRECISIONS:
            raise ValueError(f"attention precision {precision!r} is not one of {ATTENTION_PRECISIONS}")
        for layer in self.layers:
            layer.attn.fp8 = precision == "fp8"
        self.attention_precision = precision

    def time_embedding(self, timesteps_n: torch.Tensor) -> torch.Tensor:
        """diffusers `TimestepEmbedding(Timesteps(256, flip_sin_to_cos=True, shift=0))`, kept in float32."""
        proj = get_timestep_embedding(timesteps_n * self.config.timestep_scale, TIME_PROJ_CHANNELS,
                                      flip_sin_to_cos=True, downscale_freq_shift=0)  # fmt: skip
        return self.time_linear_2(F.silu(self.time_linear_1(proj.float())))

    def pack(self, positions_3n: torch.Tensor, sequences: list[GeneratorSequence],
             into: PackedBatch | None = None) -> PackedBatch:  # fmt: skip
        """What stays the same while the batch's membership does: rotary tables, attention layout, token rows. Its
        index tensors cross to the device without a host sync (the work queued before keeps the device busy). With
        `into`, a batch of the same signature (a captured graph's), only its data are replaced, in place."""
        cos, sin = self.rope(positions_3n)
        if into is not None:
            into.refill((cos, sin), sequences)
            return into
        dtype = self.proj_in.weight.dtype
        kv_heads = slice(None) if self.ulysses is None else self.ulysses.head_range(self.num_kv_heads)
        rows = TokenRows.build(sequences, cos.device) if any(seq.num_action_tokens for seq in sequences) else None
        lengths = torch.tensor([seq.num_tokens for seq in sequences])
        return PackedBatch(signature=batch_signature(sequences), rope=(cos.to(dtype), sin.to(dtype)),
                           attention=PackedAttention.build(sequences, cos.device, kv_heads),
                           rows=rows, first_tokens=(lengths.cumsum(0) - lengths).to(cos.device, non_blocking=True),
                           token_sequences=torch.arange(len(sequences)).repeat_interleave(lengths).to(
                               cos.device, non_blocking=True))  # fmt: skip

    def forward(
        self,
        patches_vp: torch.Tensor,  # [Nv, patch_latent_dim] latent patches of all sequences, packed
        timesteps_n: torch.Tensor,  # [N] diffusion time per token, one per sequence: its first token's is embedded
        noisy_n: torch.Tensor,  # [N] bool: tokens that get a timestep embedding (not clean conditioning)
        batch: PackedBatch,
        actions_na: torch.Tensor | None = None,  # [Na, action_dim] action tokens of all sequences, packed
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Velocities of the latent patches `[Nv, patch_latent_dim]` and of the action tokens `[Na, action_dim]`."""
        hidden = self.proj_in(patches_vp)
        rows = batch.rows
        if rows is not None:
            patches, hidden = hidden, hidden.new_empty(timesteps_n.shape[0], hidden.shape[1])
            hidden[rows.vision] = patches
            hidden[rows.actions] = self.action_proj_in(actions_na, rows.action_domains) + self.action_modality_embed
        # The float32 time MLP once per sequence, not per token (at 44k tokens per token it was a 33 ms float32 GEMM).
        time = self.time_embedding(timesteps_n[batch.first_tokens]).to(hidden.dtype)[batch.token_sequences]
        hidden = hidden + time * noisy_n[:, None].to(hidden.dtype)
        residual, rope = None, batch.rope
        if self.ulysses is not None:  # the layers run on this rank's tokens
            shard = self.ulysses.shard(hidden.shape[0])
            hidden, rope = hidden[shard], (rope[0][shard], rope[1][shard])
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, rope, batch.attention, i)
        hidden, _ = self.norm(hidden, residual)
        if self.ulysses is not None:
            hidden = self.ulysses.gather_tokens(hidden, self.ulysses.counts(batch.attention.num_tokens))
        if rows is None:
            return self.proj_out(hidden), None
        return self.proj_out(hidden[rows.vision]), self.action_proj_out(hidden[rows.actions], rows.action_domains)

    # Weights ---------------------------------------------------------------------------------------------

    _RENAMES = (
        (".self_attn.to_add_out.", ".attn.o_proj."),
        (".self_attn.norm_added_q.", ".attn.q_norm."),
        (".self_attn.norm_added_k.", ".attn.k_norm."),
        (".mlp_moe_gen.down_proj.", ".mlp.down_proj."),
        (".input_layernorm_moe_gen.", ".input_norm."),
        (".post_attention_layernorm_moe_gen.", ".post_attention_norm."),
        ("norm_moe_gen.", "norm."),
        ("time_embedder.linear_1.", "time_linear_1."),
        ("time_embedder.linear_2.", "time_linear_2."),
        ("action_proj_in.fc.weight", "action_proj_in.weight"),
        ("action_proj_in.bias.weight", "action_proj_in.bias"),
        ("action_proj_out.fc.weight", "action_proj_out.weight"),
        ("action_proj_out.bias.weight", "action_proj_out.bias"),
    )
    _SHARDS = (
        (".self_attn.add_q_proj.", ".attn.qkv_proj.", "q"),
        (".self_attn.add_k_proj.", ".attn.qkv_proj.", "k"),
        (".self_attn.add_v_proj.", ".attn.qkv_proj.", "v"),
        (".mlp_moe_gen.gate_proj.", ".mlp.gate_up_proj.", 0),
        (".mlp_moe_gen.up_proj.", ".mlp.gate_up_proj.", 1),
    )
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the generator keys of `transformer/` (with a quantized checkpoint's `weight_scale`, `weight_scale_2`
        and `input_scale`, into the parameters of its linear method); returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "_quantizer." in name:  # ModelOpt's own calibration state, restored by diffusers only
                continue
            for old, new, shard in self._SHARDS:
                if old in name:
                    target = name.replace(old, new)
                    if target not in params:
                        raise ValueError(f"{name}: the deployment's precision has no such parameter; is the "
                                         "checkpoint quantized differently from --precision?")  # fmt: skip
                    params[target].weight_loader(params[target], tensor, shard)
                    break
            else:
                target = name
                for old, new in self._RENAMES:
                    target = target.replace(old, new)
                if target not in params:
                    continue
                param = params[target]
                getattr(param, "weight_loader", _default_loader)(param, tensor)
            loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"generator weights missing from the checkpoint: {sorted(missing)[:8]}")
        return loaded


T = TypeVar("T")
GRAPH_MAX_TOKENS = 16_384  # larger forwards are bound by their kernels, not by launching them: no CUDA graph


def capture_graph(fn: Callable[[], T], pool: tuple[int, int] | None = None) -> tuple[torch.CUDAGraph, T]:
    """`fn()` recorded (not run) into a CUDA graph on a side stream, in memory pool `pool` (the graph's own if None):
    (graph, fn's outputs, which each replay rewrites). Not `torch.cuda.graph(...)`: it synchronises the device,
    collects garbage and empties the allocator's cache before each capture, which would cost more than the capture
    in a serving process."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")  # other threads' CUDA calls are theirs
        try:
            outputs = fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph, outputs


class CapturedForward:
    """The tower's forward over one packed batch as a CUDA graph, replayed every step on new inputs copied into its
    static buffers, and for any later batch of the same signature once its data are packed into `batch`. An eager
    forward of a small batch (a few thousand tokens) is bound by launching its ~20 kernels per layer; a replay
    launches them all at once. The returned velocities are the graph's own buffers, overwritten by the next call."""

    def __init__(
        self,
        tower: Cosmos3GeneratorTower,
        batch: PackedBatch,
        patches_vp: torch.Tensor,
        timesteps_n: torch.Tensor,
        noisy_n: torch.Tensor,
        actions_na: torch.Tensor | None = None,
        pool: tuple[int, int] | None = None,
    ) -> None:
        self.tower, self.batch = tower, batch
        self.inputs = [t.clone() for t in (patches_vp, timesteps_n, noisy_n)]
        self.actions = None if actions_na is None else actions_na.clone()
        # The caller has run this forward eagerly before: lazy initialisation stays out of the graph.
        self.graph, self.outputs = capture_graph(self._forward, pool)

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.tower(*self.inputs, self.batch, self.actions)

    def __call__(
        self,
        patches_vp: torch.Tensor,
        timesteps_n: torch.Tensor,
        noisy_n: torch.Tensor,
        actions_na: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for static, new in zip(self.inputs, (patches_vp, timesteps_n, noisy_n)):
            static.copy_(new)
        if self.actions is not None:
            self.actions.copy_(actions_na)
        self.graph.replay()
        return self.outputs


MAX_FORWARD_GRAPHS = 8  # captured forwards kept for reuse (each holds its batch's prompt K/V; one memory pool)


class ForwardGraphs:
    """Captured forwards by batch signature, least recently used first, in one memory pool (one replays at a time,
    and its outputs are consumed before the next). A new batch whose signature was captured before, e.g. the next
    policy requests of a robot fleet, replays from its first step: no eager step, no capture."""

    def __init__(self, capacity: int = MAX_FORWARD_GRAPHS) -> None:
        self.capacity = capacity
        self.graphs: OrderedDict[BatchSignature, CapturedForward] = OrderedDict()
        self.pool: tuple[int, int] | None = None

    def get(self, signature: BatchSignature) -> CapturedForward | None:
        """The graph captured for a batch of `signature` (now the most recently used), or None."""
        graph = self.graphs.get(signature)
        if graph is not None:
            self.graphs.move_to_end(signature)
        return graph

    def capture(
        self, tower: Cosmos3GeneratorTower, batch: PackedBatch, *inputs: torch.Tensor | None
    ) -> CapturedForward:
        """Capture the forward of `batch` (already run eagerly once) on `inputs`, and keep it (the oldest dropped)."""
        if not self.graphs:  # a pool whose graphs are all gone cannot take another capture
            self.pool = torch.cuda.graph_pool_handle()
        graph = CapturedForward(tower, batch, *inputs, pool=self.pool)
        self.graphs[batch.signature] = graph
        while len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
        return graph

    def clear(self) -> None:
        self.graphs.clear()


def _unreduced(x: torch.Tensor) -> torch.Tensor:
    return x


def _default_loader(param: torch.Tensor, tensor: torch.Tensor) -> None:
    param.data.copy_(tensor)


def iter_transformer_weights(checkpoint: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The generator's tensors of `transformer/`."""
    return transformer_tensors(str(checkpoint), is_generator_key)
