"""The generator's own process groups over the reasoner's tensor-parallel ranks.

The generator steps on its own thread while the reasoner keeps serving (`generator_loop`), so their collectives
must not share a communicator: two threads issuing operations on one communicator interleave them in a different
order on each rank. The generator gets its own groups over the same ranks: one on the device for the tower's
all-reduces (or, when the work splits by sequence, the prompt K/V's heads gathered once per request), one on the
host (gloo) for the loop's per-step agreement on which commands apply. With `ParallelDegrees` of C x S ranks, rank
`c * S + s` is rank `s` of CFG group `c`: the S ranks of a group split its tokens (`ulysses.Ulysses`), and the C
ranks of one `s` trade their groups' velocities (`cfg_parallel.BranchParallel`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cosmos3_serve.model_executor.cfg_parallel import BranchParallel
from cosmos3_serve.model_executor.parallel_degrees import ParallelDegrees
from cosmos3_serve.model_executor.ulysses import Ulysses

# The ranks' loops meet at every step; an idle server may wait far longer than gloo's default of 30 minutes.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class GeneratorGroup:
    rank: int  # in the tensor-parallel group
    size: int
    device_group: dist.ProcessGroup | None = None
    host_group: dist.ProcessGroup | None = None
    leader: int = 0  # global rank of the group's first member
    degrees: ParallelDegrees = ParallelDegrees()
    branches: BranchParallel | None = None  # with degrees.cfg > 1
    ulysses: Ulysses | None = None  # with degrees.sp > 1
    # Ranks (in the group) on the first rank's host: they decode finished requests and send their results to the
    # driver's socket, which is local to that host (a Ray cluster places the others on other nodes).
    decode_ranks: tuple[int, ...] = (0,)

    @classmethod
    def of_tensor_parallel_group(cls, device: torch.device,
                                 degrees: ParallelDegrees = ParallelDegrees()) -> GeneratorGroup:  # fmt: skip
        """Groups over the ranks of vLLM's tensor-parallel group (every rank of the world calls this, in the same
        order: the worker's memory profile, `Cosmos3WorkerExtension.cosmos3_prepare_generator`)."""
        from vllm.distributed import get_tp_group

        tp = get_tp_group()
        degrees.check(tp.world_size)
        if tp.world_size == 1:
            return cls(rank=0, size=1)
        if dist.get_world_size() != tp.world_size:
            raise NotImplementedError("the generator's tensor parallelism needs the world to be one tensor-parallel "
                                      "group (no data or pipeline parallelism yet)")  # fmt: skip
        ranks = list(tp.ranks)
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_group = dist.new_group(ranks, backend=backend)
        host_group = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)
        rank = tp.rank_in_group
        cfg_rank, sp_rank = divmod(rank, degrees.sp)
        branches = ulysses = None
        if degrees.cfg > 1:  # every rank makes every group, in one order
            groups = [dist.new_group([ranks[c * degrees.sp + s] for c in range(degrees.cfg)], backend=backend)
                      for s in range(degrees.sp)]  # fmt: skip
            branches = BranchParallel(cfg_rank, degrees.cfg, groups[sp_rank])
        if degrees.sp > 1:
            groups = [dist.new_group([ranks[c * degrees.sp + s] for s in range(degrees.sp)], backend=backend)
                      for c in range(degrees.cfg)]  # fmt: skip
            ulysses = Ulysses(sp_rank, degrees.sp, groups[cfg_rank])
        hosts: list[str | None] = [None] * tp.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=host_group)
        decode_ranks = tuple(r for r, host in enumerate(hosts) if host == hosts[0])
        return cls(rank=rank, size=tp.world_size, device_group=device_group, host_group=host_group, leader=ranks[0],
                   degrees=degrees, branches=branches, ulysses=ulysses, decode_ranks=decode_ranks)  # fmt: skip

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def tower_all_reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The all-reduce of a tensor-parallel tower's row-parallel outputs; None for a whole tower."""
        return self.all_reduce if self.size > 1 and not self.degrees.splits_sequences else None

    def gather_heads(self, kv_heads_last: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's shard of `kv_heads_last` concatenated along `dim` in rank order (a reasoner rank exports
        its own heads of the prompt's K/V; a whole tower needs them all)."""
        parts = [torch.empty_like(kv_heads_last) for _ in range(self.size)]
        dist.all_gather(parts, kv_heads_last.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the ranks, in place (the tower's row-parallel outputs)."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def agree(self, count: int) -> int:
        """The leader's `count` on every rank (how many of the commands received the loops apply at this step)."""
        if self.size == 1:
            return count
        value = [count]
        dist.broadcast_object_list(value, src=self.leader, group=self.host_group)
        return value[0]
