"""The generator's own process groups over the reasoner's tensor-parallel ranks.

The generator steps on its own thread while the reasoner keeps serving (`generator_loop`), so their collectives
must not share a communicator: two threads issuing operations on one communicator interleave them in a different
order on each rank. The generator gets its own groups over the same ranks: one on the device for the tower's
all-reduces (or, when the work splits by sequence, the prompt K/V's heads gathered once per request), one on the
host (gloo) for the loop's per-step agreement on which commands apply. With `ParallelDegrees` C, S over C x S x T
ranks, rank `(c * S + s) * T + t` holds tower shard `t` (`TowerShard`) of Ulysses rank `s` of CFG group `c`: the T
ranks of one (c, s) sum their shards' outputs, the S ranks of one (c, t) split the group's tokens
(`ulysses.Ulysses`), and the C ranks of one (s, t) trade their groups' velocities (`cfg_parallel.BranchParallel`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cosmos3_serve.model_executor.cfg_parallel import BranchParallel
from cosmos3_serve.model_executor.parallel_degrees import ParallelDegrees, TowerShard
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
    tower: TowerShard = TowerShard()  # this rank's shard of the tower
    tower_group: dist.ProcessGroup | None = None  # the ranks holding the other shards of this rank's tower
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
        shards = degrees.tower_shards(tp.world_size)
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
        place, shard = divmod(rank, shards)
        cfg_rank, sp_rank = divmod(place, degrees.sp)

        def rank_of(c: int, s: int, t: int) -> int:
            return ranks[(c * degrees.sp + s) * shards + t]

        def new_groups(members: list[list[int]], mine: int) -> dist.ProcessGroup:
            """Every rank makes every group, in one order; this rank's is the `mine`-th."""
            return [dist.new_group(group, backend=backend) for group in members][mine]

        tower_group = device_group
        if 1 < shards < tp.world_size:
            tower_group = new_groups([[rank_of(c, s, t) for t in range(shards)] for c in range(degrees.cfg)
                                      for s in range(degrees.sp)], place)  # fmt: skip
        branches = ulysses = None
        if degrees.cfg > 1:
            members = [[rank_of(c, s, t) for c in range(degrees.cfg)] for s in range(degrees.sp) for t in range(shards)]
            branches = BranchParallel(cfg_rank, degrees.cfg, new_groups(members, sp_rank * shards + shard))
        if degrees.sp > 1:
            members = [[rank_of(c, s, t) for s in range(degrees.sp)] for c in range(degrees.cfg) for t in range(shards)]
            ulysses = Ulysses(sp_rank, degrees.sp, new_groups(members, cfg_rank * shards + shard))
        hosts: list[str | None] = [None] * tp.world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=host_group)
        decode_ranks = tuple(r for r, host in enumerate(hosts) if host == hosts[0])
        return cls(rank=rank, size=tp.world_size, device_group=device_group, host_group=host_group, leader=ranks[0],
                   degrees=degrees, tower=TowerShard(shard, shards), tower_group=tower_group, branches=branches,
                   ulysses=ulysses, decode_ranks=decode_ranks)  # fmt: skip

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def tower_all_reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The all-reduce of a sharded tower's row-parallel outputs over its shards; None for a whole tower."""
        return self._reduce_over_shards if self.tower.size > 1 else None

    def _reduce_over_shards(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.tower_group)
        return x

    def tower_heads(self, kv_heads_last: torch.Tensor, dim: int, num_heads: int) -> torch.Tensor:
        """The heads (along `dim`) of this rank's tower shard, from every rank's `kv_heads_last`: a reasoner rank
        exports its tensor-parallel shard of the prompt's `num_heads` K/V heads (one head, replicated, where the
        ranks outnumber the heads), which is the tower shard's own only where the tower is sharded like the
        reasoner. Called once per request."""
        if self.tower.size == self.size:
            return kv_heads_last
        parts = [torch.empty_like(kv_heads_last) for _ in range(self.size)]
        dist.all_gather(parts, kv_heads_last.contiguous(), group=self.device_group)
        every_head = torch.cat(parts[:: max(1, self.size // num_heads)], dim=dim)
        replicas = max(1, self.tower.size // num_heads)
        per_shard = num_heads * replicas // self.tower.size
        return every_head.narrow(dim, self.tower.rank // replicas * per_shard, per_shard).contiguous()

    def agree(self, count: int) -> int:
        """The leader's `count` on every rank (how many of the commands received the loops apply at this step)."""
        if self.size == 1:
            return count
        value = [count]
        dist.broadcast_object_list(value, src=self.leader, group=self.host_group)
        return value[0]
