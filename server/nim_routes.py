"""NIM-style operational routes: liveness, readiness (both towers loaded and warm), metadata, version, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cosmos3_serve.server import metrics

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


@router.get("/v1/version")
async def version(request: Request) -> dict:
    return request.app.state.cosmos3.versions()


@router.get("/v1/metrics", response_class=Response)
async def metrics_v1() -> Response:
    """Prometheus text: vLLM's `vllm:*` series and the generator's `cosmos3_*` series (same as `/metrics`)."""
    return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
