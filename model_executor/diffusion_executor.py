"""The diffusion executor: the generator tower, the VAE and the requests in flight, stepped together.

Every step is one packed generator forward over every sequence (request x CFG branch) in flight, whatever their
modes, resolutions, frame counts and step counts, followed by each request's guidance combine and flow-matching
scheduler step (its own copy of the checkpoint's scheduler; UniPC steps as `sampling.flow_unipc` computes them,
without host syncs). A finished or cancelled request leaves the batch at the next step and its K/V are released.
`generator_loop.GeneratorLoop` runs it on its own thread and CUDA stream inside vLLM's worker, next to the
reasoner's model runner, so a request enters with the K/V that `kv_export` left in this process.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from torch.profiler import record_function

from cosmos3_serve.model_executor.admission import DEFAULT_MAX_BATCH_TOKENS
from cosmos3_serve.model_executor.checkpoint.generator_config import GeneratorConfig
from cosmos3_serve.model_executor.denoising import DenoisingState, StateFactory, guided
from cosmos3_serve.model_executor.generator import (
    GRAPH_MAX_TOKENS,
    CapturedForward,
    ForwardGraphs,
    PackedBatch,
    batch_signature,
)
from cosmos3_serve.model_executor.cfg_parallel import SequenceRows
from cosmos3_serve.model_executor.generator_parallel import GeneratorGroup
from cosmos3_serve.model_executor.kv_export import PromptKV
from cosmos3_serve.model_executor.positions import patchify, unpatchify
from cosmos3_serve.model_executor.profile_ranges import PROFILE_RANGES
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.results import GenerationOutput, PendingResults
from cosmos3_serve.model_executor.tower_loading import load_tower
from cosmos3_serve.model_executor.vae_io import ConditioningClip, VaeCodec
from cosmos3_serve.quant import step_precision
from cosmos3_serve.sampling.schedulers import load_scheduler

logger = logging.getLogger(__name__)

# A batch whose signature (its sequences' token counts) was captured before replays that CUDA graph from its first
# step (`ForwardGraphs`). Else it runs its first step eagerly; at its second it is captured (`CapturedForward`:
# recorded, not run) and replayed from then on, if it has at least GRAPH_MIN_REPLAYS steps left, that one included.
# A capture costs about one eager forward of host time and no GPU time, a replay saves the host's launches of one (up
# to half of a small batch's step): a 4-step policy batch of a new signature is one eager step, a capture and three
# replays, and four replays from then on.
GRAPH_MIN_REPLAYS = 3

Admission = tuple[str, GenerationRequest, list[PromptKV], bool]  # (request id, request, its prompts' K/V, decode)


@dataclass
class BatchPlan:
    """What the executor keeps of the batch it stepped last, for as long as the same requests step together: their
    packed layout (rotary tables, attention over their prompt K/V) and their forward's CUDA graph, if it has one
    (then the layout is the graph's). With CFG parallelism the layout is of this rank group's sequences only (None
    if it has none) and `rows` says which rows of the batch each group runs."""

    states: list[DenoisingState]
    layout: PackedBatch | None
    graph: CapturedForward | None = None
    eager_steps: int = 0
    rows: SequenceRows | None = None

    def serves(self, batch: list[DenoisingState]) -> bool:
        """Whether `batch` is the same requests, in the same order."""
        return len(self.states) == len(batch) and all(a is b for a, b in zip(self.states, batch))


class DiffusionExecutor:
    """Tower, VAE, scheduler template and the requests in flight on one device (one tensor-parallel shard).

    Every `step()` is one packed forward over the next batch; a request that finishes waits in `finished` until it
    is collected (`collect`: its decode and copy to the host queued behind its last step)."""

    def __init__(self, checkpoint: str | Path, vllm_config, device: torch.device,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, vae_dtype: torch.dtype = torch.float32,
                 group: GeneratorGroup | None = None, a16_steps: int | None = None,
                 attention_precision: str = "bf16") -> None:  # fmt: skip
        checkpoint = Path(checkpoint)
        self.config = GeneratorConfig.from_checkpoint(checkpoint)
        self.device, self.dtype = torch.device(device), vllm_config.model_config.dtype
        self.group = group or GeneratorGroup(rank=0, size=1)
        tower = load_tower(checkpoint, vllm_config, self.device, self.group.tower_all_reduce, shard=self.group.tower)
        tower.set_sequence_parallel(self.group.ulysses)
        if vllm_config.load_config.load_format == "dummy":  # configs-only checkpoints (benchmarks): random weights
            vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(checkpoint, subfolder="vae"))
        else:
            vae = AutoencoderKLWan.from_pretrained(checkpoint, subfolder="vae")
        # FP8: the steps of a request that run with 16-bit activations (None: every step W8A8, or not FP8)
        self.activation_switch = step_precision.install(tower, step_precision.deployment_policy(checkpoint, a16_steps),
                                                        self.dtype)  # fmt: skip
        tower.set_attention_precision(attention_precision)
        self.tower = tower.eval()
        # float32 by default, whatever the towers' precision; no autograd state (a VAE encode that records it holds
        # every activation of every frame chunk)
        vae = vae.to(self.device, vae_dtype).eval().requires_grad_(False)
        self.codec = VaeCodec(vae, self.device, use_graphs=not vllm_config.model_config.enforce_eager)
        self.new_state = StateFactory(self.config, vae.config, load_scheduler(checkpoint), self.device)
        self.active: list[DenoisingState] = []
        self.finished: dict[str, GenerationOutput] = {}  # request id -> result, until collected
        self.decoded: set[str] = set()  # requests whose video is decoded to frames (else returned as latents)
        self.pending: list[PendingResults] = []  # collected results on their way to the host, oldest first
        self.max_batch_tokens = max_batch_tokens
        self._plan: BatchPlan | None = None  # of the batch stepped last
        # A tower whose work splits by sequence runs eagerly (its all-to-alls and gathers are not captured).
        self.use_cuda_graphs = (self.device.type == "cuda" and not vllm_config.model_config.enforce_eager
                                and not self.group.degrees.splits_sequences)  # fmt: skip
        self._collected = 0  # requests collected so far: their decodes are dealt to the ranks in turn
        self.forward_graphs = ForwardGraphs()

    @torch.no_grad()
    def admit(self, entries: list[Admission]) -> dict[str, str]:
        """Add requests whose prompts (conditional, then unconditional with CFG) were prefilled as their prompt K/V.
        Conditioning clips of the same shape go through the VAE encoder in one batch. Returns an error message per
        request that could not be admitted (the others are admitted)."""
        with record_function(PROFILE_RANGES["admit"]):
            return self._admit(entries)

    def _admit(self, entries: list[Admission]) -> dict[str, str]:
        errors, admissible = {}, []
        for request_id, request, prompt_kvs, decode in entries:
            try:
                if request_id in self or len(prompt_kvs) != (2 if request.uses_cfg else 1):
                    raise ValueError(f"request {request_id!r}: already admitted, or wrong number of prompt K/V")
                request.validate(self.config)
                admissible.append((request_id, request, [self._on_this_stream(kv) for kv in prompt_kvs], decode))
            except ValueError as exc:
                errors[request_id] = str(exc)
        clips = {request_id: ConditioningClip.of(self.codec.config, request)
                 for request_id, request, _, _ in admissible}  # fmt: skip
        encoded = self.codec.encode_by_shape({i: clip.pixels for i, clip in clips.items() if clip is not None})
        clean = {request_id: clips[request_id].latents(latents) for request_id, latents in encoded.items()}
        for request_id, request, kvs, decode in admissible:
            try:
                self.active.append(self.new_state(request_id, request, kvs, clean.get(request_id)))
            except ValueError as exc:
                errors[request_id] = str(exc)
                continue
            if decode:
                self.decoded.add(request_id)
        return errors

    def _on_this_stream(self, prompt_kv: PromptKV) -> PromptKV:
        """The prompt's K/V on this device, marked as used by the current stream: the reasoner's stream wrote them,
        and their memory must not return to it while this stream's steps still read them. They are complete before
        this stream reads them: a driver admits a request only once its prefill has returned its sampled token, which
        the reasoner's stream computes after the export."""
        prompt_kv = prompt_kv.to(self.device)
        prompt_kv = PromptKV(self.group.tower_heads(prompt_kv.kv, dim=3, num_heads=self.config.num_key_value_heads))
        if prompt_kv.kv.is_cuda:
            prompt_kv.kv.record_stream(torch.cuda.current_stream(self.device))
        return prompt_kv

    def cancel(self, request_id: str) -> bool:
        """Drop a request (in flight or finished); its K/V and latents are released. False if unknown."""
        found = [state for state in self.active if state.request_id == request_id]
        for state in found:
            self.active.remove(state)
        if found and self._plan is not None and any(state in self._plan.states for state in found):
            self._plan = None  # its layout holds the request's prompt K/V
        self.decoded.discard(request_id)
        in_transit = [pending for pending in self.pending if pending.outputs.pop(request_id, None) is not None]
        return bool(found or in_transit) or self.finished.pop(request_id, None) is not None

    def cancel_all(self) -> list[str]:
        """Drop every request (after a failed step); returns their ids."""
        ids = [state.request_id for state in self.active] + list(self.finished)
        ids += [request_id for pending in self.pending for request_id in pending.outputs]
        self.active, self.finished, self.pending, self._plan = [], {}, [], None
        self.decoded.clear()
        return ids

    def __contains__(self, request_id: str) -> bool:
        return (request_id in self.finished or any(state.request_id == request_id for state in self.active)
                or any(request_id in pending.outputs for pending in self.pending))  # fmt: skip

    @property
    def has_work(self) -> bool:
        """Whether a step, or results on their way to the host, are left."""
        return bool(self.active or self.finished or self.pending)

    @torch.no_grad()
    def step(self) -> list[tuple[str, int, int]]:
        """One packed forward and scheduler step for the next batch (`next_batch`): (request id, steps done, total)
        of each request in it."""
        batch = self.next_batch()
        progress = []
        if batch:
            queued = self._mark_stream()
            with record_function(PROFILE_RANGES["denoise"]):
                self._step(batch)
            if queued is not None:  # one step in flight: the work before it is done when this returns
                queued.synchronize()
        for state in batch:
            progress.append((state.request_id, state.step, len(state.timesteps)))
            if state.finished:
                self.active.remove(state)
                self.finished[state.request_id] = state.output()
        if not self.active:  # idle: release the last batch's layout (its prompt K/V; a graph's stays for reuse)
            self._plan = None
        return progress

    def _mark_stream(self) -> torch.cuda.Event | None:
        """An event after the work queued so far on the device (None on the CPU, where nothing is queued)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def next_batch(self) -> list[DenoisingState]:
        """The requests in flight, in arrival order, up to `max_batch_tokens` generator tokens (at least one); with
        16-bit activation steps, only those whose next step runs in the first request's mode (the others step next).

        Beyond a few thousand tokens a step's GEMMs run at their peak: a bigger batch only makes every request in it
        wait for the others' work (the throughput stays), so later arrivals wait for a place in the batch instead.
        """
        batch, tokens = [], 0
        for state in self.active:
            if batch and self._activation_16bit(state) != self._activation_16bit(batch[0]):
                continue
            if batch and tokens + state.num_tokens > self.max_batch_tokens:
                break
            batch.append(state)
            tokens += state.num_tokens
        return batch

    def _activation_16bit(self, state: DenoisingState) -> bool:
        """Whether `state`'s next step runs with 16-bit activations."""
        switch = self.activation_switch
        return switch is not None and switch.high_precision(state.step, len(state.timesteps))

    @torch.no_grad()
    def take(self, request_ids: list[str]) -> dict[str, GenerationOutput]:
        """The results of finished requests, forgotten here: video latents (normalised, as the reference), or uint8
        frames `[T, H, W, 3]` for requests admitted with `decode` (videos of one shape decoded in one VAE batch),
        and / or actions."""
        outputs = {request_id: self.finished.pop(request_id) for request_id in request_ids}
        decode = {i: o.video for i, o in outputs.items() if o.video is not None and i in self.decoded}
        self.decoded -= set(outputs)
        if decode:
            frames = self.codec.decode_by_shape(decode)
            outputs = {i: dataclasses.replace(o, video=frames.get(i, o.video)) for i, o in outputs.items()}
        return outputs

    def collect(self, request_ids: list[str]) -> None:
        """`take` the results of finished requests without waiting for the device: their decode and their copies to
        the host are queued behind the step that finished them, and `ready_results` hands them out once done. With
        several ranks the requests are dealt in turn to those on the first rank's host (`GeneratorGroup.decode_ranks`;
        every rank finishes the same requests in the same order): each decodes and hands out its own, and forgets the
        others'."""
        dealers = self.group.decode_ranks
        mine = [request_id for i, request_id in enumerate(request_ids)
                if dealers[(self._collected + i) % len(dealers)] == self.group.rank]  # fmt: skip
        self._collected += len(request_ids)
        for request_id in set(request_ids) - set(mine):
            self.finished.pop(request_id)
            self.decoded.discard(request_id)
        if mine:
            self.pending.append(PendingResults.launch(lambda: self.take(mine), self.device))

    def ready_results(self, wait: bool) -> tuple[dict[str, GenerationOutput], dict[str, float]]:
        """The collected results that have reached the host, all of them with `wait`: (request id -> output on the
        host, request id -> seconds of its VAE decode batch on the device)."""
        outputs, decode_s = {}, {}
        while self.pending and (wait or self.pending[0].ready):
            pending = self.pending.pop(0)
            pending.wait()
            outputs.update(pending.outputs)
            decode_s.update(dict.fromkeys(pending.outputs, pending.decode_s))
        return outputs, decode_s

    def _batch_plan(self, active: list[DenoisingState]) -> BatchPlan:
        """The plan of `active`: the last one if the same requests step together again, else a new layout (the last
        plan's released first), in the graph of its signature if one was captured. With CFG parallelism, the layout
        of the sequences that this rank's group runs (`BranchParallel.owners`)."""
        if self._plan is None or not self._plan.serves(active):
            self._plan = None
            positions = torch.cat([state.positions_3n for state in active], dim=1)
            sequences = [seq for state in active for seq in state.sequences]
            branches, rows = self.group.branches, None
            if branches is not None:
                owners = branches.owners([[seq.num_tokens for seq in state.sequences] for state in active])
                rows = SequenceRows.of(sequences, owners, branches.size, self.device)
                positions = positions[:, rows.tokens[branches.rank]]
                sequences = [seq for seq, owner in zip(sequences, owners) if owner == branches.rank]
            graph = self.forward_graphs.get(batch_signature(sequences)) if self.use_cuda_graphs else None
            layout = self.tower.pack(positions, sequences, into=None if graph is None else graph.batch) if (
                sequences) else None
            self._plan = BatchPlan(list(active), layout, graph, rows=rows)
        return self._plan

    def _forward(
        self,
        active: list[DenoisingState],
        patches_vp: torch.Tensor,
        timesteps_n: torch.Tensor,
        noisy_n: torch.Tensor,
        actions_na: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tower's forward of the batch: a replay of the graph of its signature; without one, eager at its first
        step, then a replay of its CUDA graph, captured at its second step if it has GRAPH_MIN_REPLAYS steps left and
        at most GRAPH_MAX_TOKENS tokens; else eager. The outputs of a replay are the graph's buffers: consumed before
        the next step."""
        plan = self._batch_plan(active)
        if self.activation_switch is not None:
            self.activation_switch.activation_16bit = self._activation_16bit(active[0])
            if self.activation_switch.activation_16bit:  # a few steps per request: eager, graphs hold the W8A8 path
                return self.tower(patches_vp, timesteps_n, noisy_n, plan.layout, actions_na)
        steps_left = min(len(state.timesteps) - state.step for state in active)
        if (plan.graph is None and plan.eager_steps > 0 and self.use_cuda_graphs
                and noisy_n.shape[0] <= GRAPH_MAX_TOKENS and steps_left >= GRAPH_MIN_REPLAYS):  # fmt: skip
            try:
                with record_function(PROFILE_RANGES["capture"]):
                    plan.graph = self.forward_graphs.capture(self.tower, plan.layout, patches_vp, timesteps_n, noisy_n,
                                                             actions_na)  # fmt: skip
            except RuntimeError as error:  # an op that cannot be captured: stay eager from now on
                logger.warning("generator CUDA graph capture failed, running eagerly: %s", error)
                self.use_cuda_graphs = False
        if plan.graph is not None:
            return plan.graph(patches_vp, timesteps_n, noisy_n, actions_na)
        plan.eager_steps += 1
        return self.tower(patches_vp, timesteps_n, noisy_n, plan.layout, actions_na)

    def _branch_parallel_forward(
        self,
        active: list[DenoisingState],
        patches_vp: torch.Tensor,
        timesteps_n: torch.Tensor,
        noisy_n: torch.Tensor,
        actions_na: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's velocities, each CFG group running the tower over its own sequences (`BranchParallel`)."""
        branches, plan = self.group.branches, self._batch_plan(active)  # the rows: once per batch membership
        rows = plan.rows
        if self.activation_switch is not None:
            self.activation_switch.activation_16bit = self._activation_16bit(active[0])
        video, actions = patches_vp.new_empty(0, patches_vp.shape[1]), None
        if plan.layout is not None:
            tokens, vision, action_rows = (space[branches.rank] for space in (rows.tokens, rows.vision, rows.actions))
            video, actions = self.tower(patches_vp[vision], timesteps_n[tokens], noisy_n[tokens], plan.layout,
                                        None if actions_na is None else actions_na[action_rows])  # fmt: skip
        video = branches.gather_rows(video, rows.vision, patches_vp.shape[0])
        if actions_na is None:
            return video, None
        if actions is None:
            actions = actions_na.new_empty(0, self.config.action_dim)
        return video, branches.gather_rows(actions, rows.actions, actions_na.shape[0])

    def _step(self, active: list[DenoisingState]) -> None:
        """One packed generator forward for every sequence of every active request, then each request's step."""
        patch = self.config.latent_patch_size
        patches, actions, timesteps = [], [], []
        for state in active:
            state_patches = patchify(state.latents[0].to(self.dtype), patch)
            t = state.timesteps[state.step]  # stays on the device: no host sync in the step loop
            for seq in state.sequences:
                patches.append(state_patches)
                if state.actions is not None:
                    actions.append(state.actions.latents.to(self.dtype))
                timesteps.append(t.expand(seq.num_tokens))
        noisy = torch.cat([state.noisy for state in active])
        forward = self._forward if self.group.branches is None else self._branch_parallel_forward
        video_velocity, action_velocity = forward(active, torch.cat(patches), torch.cat(timesteps), noisy,
                                                  torch.cat(actions) if actions else None)  # fmt: skip
        patch_offset = action_offset = 0
        for state in active:
            n, branches = state.sequences[0].num_vision_tokens, len(state.sequences)
            velocity = [unpatchify(video_velocity[patch_offset + i * n : patch_offset + (i + 1) * n].float(),
                                   state.latents.shape[1:], patch) for i in range(branches)]  # fmt: skip
            patch_offset += n * branches
            keep = (1.0 - state.frame_mask).view(1, -1, 1, 1)  # clean conditioning frames get no velocity
            velocity_guided = guided(state.request, [branch * keep for branch in velocity])
            t = state.timesteps[state.step]
            state.latents = state.scheduler.step(velocity_guided[None, None], t, state.latents[None],
                                                 return_dict=False)[0][0]  # fmt: skip
            if state.actions is not None:
                chunk = state.actions.latents.shape[0]
                if state.actions.generated:  # given actions get no velocity and no step
                    velocity = [action_velocity[action_offset + i * chunk : action_offset + (i + 1) * chunk].float()
                                for i in range(branches)]  # fmt: skip
                    state.actions.step(guided(state.request, velocity), t)
                action_offset += chunk * branches
            state.step += 1
