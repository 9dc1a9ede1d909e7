"""The generator on a Hopper GPU: bf16 tower with FlashAttention 3 varlen over the exported prompt K/V, against
diffusers' pipeline in bf16 on the same GPU (same seed, so the same bf16 initial noise); a mixed batch equals its
requests alone up to bf16 rounding (different GEMM shapes round differently)."""

from __future__ import annotations

import copy

from pathlib import Path

import pytest
import torch

from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.model_executor.generation_client import Cosmos3Generator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LATENT_REL_TOL = 5e-2  # ||ours - diffusers|| / ||diffusers||, both bf16, after 4 steps of a random model
PROMPT, NEGATIVE = "A robot arm picks up a red cube.", "blurry"


@pytest.fixture(scope="module")
def gpu_generator(tiny_checkpoint: Path, gpu_reasoner) -> Cosmos3Generator:
    return Cosmos3Generator(tiny_checkpoint, gpu_reasoner)


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


@pytest.mark.parametrize("num_frames", [1, 9])
def test_bf16_latents_follow_the_bf16_reference(gpu_generator, tiny_checkpoint: Path, num_frames: int) -> None:
    from tests.oracle import load_diffusers_pipeline

    pipe = load_diffusers_pipeline(tiny_checkpoint, dtype=torch.bfloat16).to("cuda")
    common = dict(negative_prompt=NEGATIVE, num_frames=num_frames, height=64, width=96, fps=16.0,
                  num_inference_steps=4, guidance_scale=6.0)  # fmt: skip
    ours = gpu_generator.generate_latents(GenerationRequest(PROMPT, seed=2, **common))
    reference = pipe(PROMPT, **common, generator=torch.Generator().manual_seed(2), output_type="latent").video
    assert _relative_error(ours, reference.cpu()) <= LATENT_REL_TOL  # results come back from the worker on the CPU


def test_mixed_batch_on_gpu(gpu_generator) -> None:
    requests = {
        "a": GenerationRequest(PROMPT, NEGATIVE, num_frames=1, height=64, width=96, num_inference_steps=3, seed=1),
        "b": GenerationRequest("A dog runs.", None, num_frames=9, height=32, width=64, num_inference_steps=4, seed=2),
    }
    together = gpu_generator.generate(requests)
    for request_id, request in requests.items():
        assert _relative_error(together[request_id].video, gpu_generator.generate_latents(request)) <= LATENT_REL_TOL


@pytest.mark.parametrize("mode", [None, "policy"])
def test_cuda_graph_steps_equal_eager_steps(gpu_generator, gpu_reasoner, monkeypatch, mode: str | None) -> None:
    """A request of GRAPH_MIN_REPLAYS + 1 steps runs its first step eagerly and the rest as one CUDA graph, captured
    at its second step and replayed, and gives the latents (and actions) of the same request run eagerly. A later
    request of the same shapes (another seed) replays that graph from its first step, its layout copied in, and
    gives its own eager results too."""
    import dataclasses

    from cosmos3_serve.model_executor import diffusion_executor
    from tests.test_actions import action_request

    [executor] = gpu_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # the engine runs in this process
    executor.forward_graphs.clear()  # earlier tests' batches
    graphs = executor.forward_graphs.graphs
    steps = diffusion_executor.GRAPH_MIN_REPLAYS + 1
    if mode is None:
        request = GenerationRequest(PROMPT, NEGATIVE, num_frames=9, height=32, width=64, num_inference_steps=steps,
                                    seed=3)  # fmt: skip
    else:
        request = action_request(mode, steps=steps)
    later = dataclasses.replace(request, seed=request.seed + 10)
    assert executor.use_cuda_graphs  # on by default

    def run(graphed: bool, req: GenerationRequest):
        monkeypatch.setattr(executor, "use_cuda_graphs", graphed)
        return gpu_generator.generate({"one": req}, decode=False)["one"]

    # Eager twice, then graphed: the first run fills the reasoner's prefix cache, so the two compared runs read the
    # same prompt K/V (a prompt's uncached tail is recomputed at another batch size: other bf16 roundings).
    first, eager = run(False, request), run(False, request)
    assert not graphs
    graphed = run(True, request)
    [captured] = graphs.values()
    eager_later, graphed_later = run(False, later), run(True, later)
    assert list(graphs.values()) == [captured]  # replayed, not captured again
    for name in ("video",) if mode is None else ("video", "actions"):
        runs = _relative_error(getattr(first, name), getattr(eager, name))
        error = _relative_error(getattr(graphed, name), getattr(eager, name))
        error_later = _relative_error(getattr(graphed_later, name), getattr(eager_later, name))
        print(f"{mode} {name}: eager runs 1 and 2 differ by {runs:.1e}, graphed and eager run 2 by {error:.1e}, "
              f"the later request's graphed and eager runs by {error_later:.1e}")  # fmt: skip
        assert error <= 1e-3, name  # the same kernels: bf16 rounding at most
        assert error_later <= 1e-3, name
        assert _relative_error(getattr(graphed_later, name), getattr(graphed, name)) > 1e-2, name  # its own noise


def test_vae_decode_graphs_equal_diffusers_eager_decode(tiny_checkpoint: Path) -> None:
    """`VaeDecoder` (channels-last convolutions, a CUDA graph from a shape's second decode on)
    against diffusers' VAE as loaded, decoding eagerly: each of three decodes of one shape, new latents each time."""
    from diffusers import AutoencoderKLWan

    from cosmos3_serve.model_executor.vae_graphs import VaeDecoder

    reference = AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae").to("cuda").eval()
    decoder = VaeDecoder(AutoencoderKLWan.from_pretrained(tiny_checkpoint, subfolder="vae").to("cuda").eval())
    torch.manual_seed(0)
    for _ in range(3):
        latents = torch.randn(2, reference.config.z_dim, 3, 8, 12, device="cuda")
        with torch.no_grad():
            expected = reference.decode(latents).sample
        assert _relative_error(decoder(latents), expected) <= 1e-2  # TF32 convolutions; cuDNN picks other algorithms
    assert len(decoder.graphs) == 1
    # bf16 (`--vae-precision bf16`): our passes round where diffusers' do, in other summation orders
    decoder_bf16 = VaeDecoder(copy.deepcopy(reference).to(torch.bfloat16))
    reference_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    with torch.no_grad():
        theirs = reference_bf16.decode(latents.to(torch.bfloat16)).sample.float()
    ours = decoder_bf16(latents.to(torch.bfloat16)).float()
    assert _relative_error(ours, expected) <= 1.1 * _relative_error(theirs, expected)


def test_decoded_frames_reach_the_driver_intact(gpu_generator, gpu_reasoner) -> None:
    """Frames decoded behind a request's last step and copied to pinned host memory without a host sync
    (`PendingResults`), handed out a tick later: those of a request decoded alone, and of three decoded in one batch
    while another request keeps stepping, equal the VAE decode of the same requests' latents."""
    [executor] = gpu_reasoner.collective_rpc(lambda worker: worker.cosmos3_loop.executor)  # the engine runs in this process
    short = {f"s{i}": GenerationRequest(PROMPT, NEGATIVE, num_frames=9, height=32, width=64, num_inference_steps=2,
                                        seed=i) for i in range(3)}  # fmt: skip
    long = GenerationRequest(PROMPT, NEGATIVE, num_frames=9, height=32, width=64, num_inference_steps=6, seed=9)
    requests = {**short, "long": long}
    gpu_generator.generate(requests, decode=False)  # the prompts into the prefix cache: the same K/V from now on
    latents = gpu_generator.generate(requests, decode=False)
    frames = gpu_generator.generate(requests, decode=True)
    for request_id in requests:
        video = latents[request_id].video.to("cuda")
        [expected] = executor.codec.decode_by_shape({request_id: video}).values()
        ours = frames[request_id].video
        assert ours.dtype == torch.uint8 and ours.shape == expected.shape
        difference = (ours.int() - expected.cpu().int()).abs()
        assert difference.max() <= 2 and difference.float().mean() < 0.5, request_id  # other convolution roundings


def test_vae_rms_norm_silu_kernel_equals_diffusers() -> None:
    """The VAE decoder's fused RMSNorm + SiLU on the GPU, float32 and bf16 (`tests/test_vae_graphs.py`)."""
    from tests.test_vae_graphs import check_vae_kernels

    check_vae_kernels("cuda")


def test_the_kv_cache_leaves_the_generator_its_measured_reservation(gpu_reasoner) -> None:
    """At vLLM's default memory share the worker measured the generator at the largest request admitted
    (1280x720x189 with guidance) and vLLM's KV cache left that reservation free beside the weights."""
    [memory] = gpu_reasoner.collective_rpc(lambda worker: worker.cosmos3_memory)  # the engine runs in this process
    assert min(memory.weights, memory.forward_peak, memory.decode_peak, memory.encode_peak) > 0
    free, _ = torch.cuda.mem_get_info()
    assert free >= memory.total - memory.weights, (free, memory)


def test_the_largest_admitted_video_runs_at_the_defaults(gpu_generator) -> None:
    """The largest request the default deployment admits, decoded, with nothing hand-tuned."""
    request = GenerationRequest(PROMPT, NEGATIVE, num_frames=189, height=720, width=1280, num_inference_steps=2)
    [result] = gpu_generator.generate({"largest": request}, decode=True).values()
    assert result.video.shape == (189, 720, 1280, 3) and result.video.dtype == torch.uint8
