"""Ulysses sequence parallelism of the generator tower, for any number of tokens.

The packed generator tokens of a batch are cut into `size` contiguous shards, one per rank of the group, as even
as the count allows (the first `N % size` ranks hold one token more): no padding, so no token count is refused.
Each rank runs the per-token work of every layer (norms, projections, MLP) on its shard. Attention needs every
token of a sequence, so around it an all-to-all trades the shard's tokens of all heads for all tokens of the
rank's `heads / size` heads, and a second one trades them back. The prompt's K/V enter attention per head, so a
rank needs only its heads' prompt K/V (`PackedAttention.build(kv_heads=...)`), sliced once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ulysses:
    rank: int
    size: int
    group: dist.ProcessGroup

    def counts(self, num_tokens: int) -> list[int]:
        """Tokens of each rank's shard."""
        base, extra = divmod(num_tokens, self.size)
        return [base + (r < extra) for r in range(self.size)]

    def shard(self, num_tokens: int) -> slice:
        """This rank's rows of the packed tokens."""
        counts = self.counts(num_tokens)
        start = sum(counts[: self.rank])
        return slice(start, start + counts[self.rank])

    def head_range(self, num_heads: int) -> slice:
        """This rank's heads during attention."""
        if num_heads % self.size:
            raise ValueError(f"sequence parallelism {self.size} needs a head count divisible by it, not {num_heads}")
        per_rank = num_heads // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def to_heads(self, x_local_nhd: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`[n_rank, H, D]` (this rank's tokens, all heads) -> `[N, H / size, D]` (all tokens, this rank's heads)."""
        n_local, heads, dim = x_local_nhd.shape
        per_rank = heads // self.size
        send = x_local_nhd.view(n_local, self.size, per_rank * dim).transpose(0, 1).contiguous()
        received = x_local_nhd.new_empty(sum(counts), per_rank * dim)
        dist.all_to_all_single(received, send.view(self.size * n_local, -1), output_split_sizes=counts,
                               input_split_sizes=[n_local] * self.size, group=self.group)  # fmt: skip
        return received.view(-1, per_rank, dim)

    def to_tokens(self, y_nhd: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`[N, H / size, D]` -> `[n_rank, H, D]`: the inverse of `to_heads`."""
        _, per_rank, dim = y_nhd.shape
        n_local = counts[self.rank]
        received = y_nhd.new_empty(self.size * n_local, per_rank * dim)
        dist.all_to_all_single(received, y_nhd.reshape(-1, per_rank * dim).contiguous(),
                               output_split_sizes=[n_local] * self.size, input_split_sizes=counts,
                               group=self.group)  # fmt: skip
        return received.view(self.size, n_local, per_rank, dim).transpose(0, 1).reshape(n_local, -1, dim)

    def gather_tokens(self, x_local_nd: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """`[n_rank, ...]` of every rank -> `[N, ...]` in token order."""
        largest = max(counts)
        padded = x_local_nd.new_zeros(largest, *x_local_nd.shape[1:])
        padded[: x_local_nd.shape[0]] = x_local_nd
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part[:n] for part, n in zip(gathered, counts)])
