"""How a deployment splits the generator's work over the ranks of its engine (`serve --generator-parallel`).

The generator runs in every rank of vLLM's tensor-parallel group (the reasoner's). By default its tower is split
like the reasoner (tensor parallelism: each rank holds a shard of every layer). With `cfg=C,sp=S` the work also
splits by sequence: a request's CFG branches go to different groups of ranks (C groups), and within a group Ulysses
sequence parallelism splits the tokens (S ranks). The ranks left over, T = ranks / (C x S), shard the tower: each
of the C x S places holds the tower in T tensor-parallel shards (T = 1: the whole tower on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TowerShard:
    """A rank's tensor-parallel shard of the generator tower: rank `rank` of `size` (size 1: the whole tower)."""

    rank: int = 0
    size: int = 1


@dataclass(frozen=True)
class ParallelDegrees:
    cfg: int = 1  # rank groups that the sequences of a batch (CFG branches) are divided among
    sp: int = 1  # ranks of a group that split its tokens (Ulysses)

    @classmethod
    def parse(cls, text: str) -> ParallelDegrees:
        """`cfg=2,sp=4` (either may be left out; each a positive integer)."""
        degrees = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in ("cfg", "sp") or name in degrees or not value.isdigit() or int(value) < 1:
                raise ValueError(f"expected cfg=N,sp=M with positive integers, got {text!r}")
            degrees[name] = int(value)
        return cls(**degrees)

    @property
    def ranks(self) -> int:
        """Places of the tower that the work splits among (each holds the tower whole or in shards)."""
        return self.cfg * self.sp

    @property
    def splits_sequences(self) -> bool:
        """Whether the work splits by sequence and token (else every rank runs every token on its shard)."""
        return self.ranks > 1

    def tower_shards(self, world_size: int) -> int:
        """Tensor-parallel shards of each place's tower among `world_size` ranks."""
        self.check(world_size)
        return world_size // self.ranks

    def check(self, world_size: int) -> None:
        """ValueError unless these degrees fit a tensor-parallel group of `world_size` ranks."""
        if world_size % self.ranks:
            raise ValueError(f"generator-parallel cfg={self.cfg},sp={self.sp} needs a multiple of {self.ranks} ranks: "
                             f"set --tensor-parallel-size to one (it is {world_size})")  # fmt: skip

    def __str__(self) -> str:
        return f"cfg={self.cfg},sp={self.sp}"
