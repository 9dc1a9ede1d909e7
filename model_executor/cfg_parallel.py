"""CFG parallelism: the sequences of a step's batch (each request's CFG branches) divided among groups of ranks.

Each rank group runs the tower over its own sequences only, a packed batch of its own; the velocities of all
sequences are then gathered on every rank, so every rank steps every request's sampler identically (the guided
velocity needs both branches). A request's branches go to different groups, each to the group with the fewest
tokens so far, so a batch of guided requests splits evenly, and requests without guidance share the groups too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from cosmos3_serve.model_executor.generator import GeneratorSequence


@dataclass(frozen=True)
class BranchParallel:
    rank: int  # of this rank's group among the groups
    size: int  # groups
    group: dist.ProcessGroup  # one rank of each group: the ranks that trade velocities

    def owners(self, tokens_per_sequence: list[list[int]]) -> list[int]:
        """The group of each sequence, request after request (`tokens_per_sequence[request][branch]`)."""
        load, owners = [0] * self.size, []
        for branches in tokens_per_sequence:
            free = sorted(range(self.size), key=lambda r: (load[r], r))
            for i, tokens in enumerate(branches):
                owner = free[i % self.size]
                owners.append(owner)
                load[owner] += tokens
        return owners

    def gather_rows(self, local_nd: torch.Tensor, rows_per_rank: list[torch.Tensor], total: int) -> torch.Tensor:
        """`[total, ...]`: each group's `local_nd` rows put at its `rows_per_rank[group]` (every group's rows of one
        packed space, e.g. the latent patches of its sequences)."""
        largest = max(len(rows) for rows in rows_per_rank)
        padded = local_nd.new_zeros(largest, *local_nd.shape[1:])
        padded[: local_nd.shape[0]] = local_nd
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded, group=self.group)
        full = local_nd.new_empty(total, *local_nd.shape[1:])
        for part, rows in zip(gathered, rows_per_rank):
            full[rows] = part[: len(rows)]
        return full


@dataclass(frozen=True)
class SequenceRows:
    """Per group, the rows of its sequences in each packed space of a batch (sequence after sequence): tokens
    (timesteps, positions), latent patches and action tokens."""

    tokens: list[torch.Tensor]
    vision: list[torch.Tensor]
    actions: list[torch.Tensor]

    @classmethod
    def of(cls, sequences: list[GeneratorSequence], owners: list[int], groups: int,
           device: torch.device) -> SequenceRows:  # fmt: skip
        spaces: dict[str, list[list[int]]] = {name: [[] for _ in range(groups)] for name in ("tokens", "vision",
                                                                                             "actions")}  # fmt: skip
        starts = dict.fromkeys(spaces, 0)
        for seq, owner in zip(sequences, owners):
            for name, count in (("tokens", seq.num_tokens), ("vision", seq.num_vision_tokens),
                                ("actions", seq.num_action_tokens)):  # fmt: skip
                spaces[name][owner] += range(starts[name], starts[name] + count)
                starts[name] += count
        return cls(**{name: [torch.tensor(rows, dtype=torch.long, device=device) for rows in per_group]
                      for name, per_group in spaces.items()})  # fmt: skip
