"""How a deployment splits the generator's work over the ranks of its engine (`serve --generator-parallel`).

The generator runs in every rank of vLLM's tensor-parallel group (the reasoner's). By default its tower is split
like the reasoner (tensor parallelism: each rank holds a shard of every layer). With `cfg=C,sp=S` (C x S = the
ranks) every rank holds the whole tower instead and the work splits by sequence: a request's CFG branches go to
different ranks (C groups of ranks), and within a group Ulysses sequence parallelism splits the tokens (S ranks).
"""

from __future__ import annotations

from dataclasses import dataclass


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
        return self.cfg * self.sp

    @property
    def splits_sequences(self) -> bool:
        """Whether the tower is whole on every rank, the work split by sequence and token."""
        return self.ranks > 1

    def check(self, world_size: int) -> None:
        """ValueError unless these degrees fit a tensor-parallel group of `world_size` ranks."""
        if self.splits_sequences and self.ranks != world_size:
            raise ValueError(f"generator-parallel cfg={self.cfg},sp={self.sp} needs {self.ranks} ranks: set "
                             f"--tensor-parallel-size {self.ranks} (it is {world_size})")  # fmt: skip

    def __str__(self) -> str:
        return f"cfg={self.cfg},sp={self.sp}"
