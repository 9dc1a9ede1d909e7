"""NIM-style operational routes: liveness, readiness (both towers loaded and warm), metadata, manifest, license,
version, metrics."""

from __future__ import annotations

from cosmos3_serve.server import metrics
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

router = APIRouter()


@router.get("/v1/health/live")
async def health_live() -> dict:
    """200 while the process serves HTTP."""
    return {"object": "health.response", "message": "live"}


@router.get("/v1/health/ready", responses={503: {"description": "loading, warming up, draining or failed"}})
async def health_ready(request: Request) -> JSONResponse:
    """200 once the reasoner (vLLM) and the generator are loaded and warm, and while the server takes new work
    (not draining, neither tower dead), else 503."""
    state = request.app.state.cosmos3
    if state.service.ready and state.lifecycle.accepting:
        return JSONResponse({"object": "health.response", "message": "ready"})
    return JSONResponse({"object": "health.response", "message": "not ready"}, status_code=503,
                        headers={"Retry-After": "5"})  # fmt: skip


@router.get("/v1/metadata")
async def metadata(request: Request) -> dict:
    """What this server runs: model, towers, precision, modes, parallelism, versions."""
    return request.app.state.cosmos3.metadata()


@router.get("/v1/manifest")
async def manifest(request: Request) -> dict:
    """What this deployment serves: the model, its checkpoint, the profile it runs (precision, tensor
    parallelism) and the modes."""
    state = request.app.state.cosmos3
    metadata = state.metadata()
    precision, parallel = metadata["precision"], metadata["tensor_parallel_size"]
    return {"model": state.model_name, "checkpoint": state.settings.checkpoint.name,
            "profiles": [{"id": f"{precision}-tp{parallel}", "precision": precision, "tensor_parallel_size": parallel,
                          "selected": True}],
            "modes": metadata["modes"], "inference_endpoint": "/v1/infer"}  # fmt: skip


@router.get("/v1/license", responses={404: {"description": "the checkpoint carries no license file"}})
async def license_file(request: Request) -> dict:
    """The license file the served checkpoint carries (`LICENSE*` at its root)."""
    checkpoint = request.app.state.cosmos3.settings.checkpoint
    found = sorted(path for path in checkpoint.iterdir() if path.is_file() and path.name.upper().startswith("LICENSE"))
    if not found:
        raise HTTPException(404, "the served checkpoint carries no license file (LICENSE*)")
    path = found[0]
    return {"name": path.name, "type": "file", "size": path.stat().st_size,
            "content": path.read_text(errors="replace")}  # fmt: skip


@router.get("/v1/version")
async def version(request: Request) -> dict:
    return request.app.state.cosmos3.versions()


@router.get("/v1/metrics", response_class=Response)
async def metrics_v1() -> Response:
    """Prometheus text: vLLM's `vllm:*` series and the generator's `cosmos3_*` series (same as `/metrics`)."""
    return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
