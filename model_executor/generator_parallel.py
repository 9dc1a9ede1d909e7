"""The generator's own process groups over the reasoner's tensor-parallel ranks.

The generator steps on its own thread while the reasoner keeps serving (`generator_loop`), so their collectives
must not share a communicator: two threads issuing operations on one communicator interleave them in a different
order on each rank. The generator gets its own groups over the same ranks: one on the device for the tower's
all-reduces, one on the host (gloo) for the loop's per-step agreement on which commands apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# The ranks' loops meet at every step; an idle server may wait far longer than gloo's default of 30 minutes.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass
class GeneratorGroup:
    rank: int  # in the tensor-parallel group
    size: int
    device_group: dist.ProcessGroup | None = None
    host_group: dist.ProcessGroup | None = None
    leader: int = 0  # global rank of the group's first member

    @classmethod
    def of_tensor_parallel_group(cls, device: torch.device) -> GeneratorGroup:
        """Groups over the ranks of vLLM's tensor-parallel group (every rank of the world calls this, in the same
        order: the worker's memory profile, `Cosmos3WorkerExtension.cosmos3_prepare_generator`)."""
        from vllm.distributed import get_tp_group

        tp = get_tp_group()
        if tp.world_size == 1:
            return cls(rank=0, size=1)
        if dist.get_world_size() != tp.world_size:
            raise NotImplementedError("the generator's tensor parallelism needs the world to be one tensor-parallel "
                                      "group (no data or pipeline parallelism yet)")  # fmt: skip
        ranks = list(tp.ranks)
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_group = dist.new_group(ranks, backend=backend)
        host_group = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)
        return cls(rank=tp.rank_in_group, size=tp.world_size, device_group=device_group, host_group=host_group,
                   leader=ranks[0])  # fmt: skip

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

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
