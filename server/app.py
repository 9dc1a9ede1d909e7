"""The one FastAPI app: vLLM's OpenAI server (chat, completions, models, tokenizer, `/metrics`, ...) built by vLLM
itself, plus our generation and NIM routes, error handlers and middleware, over one async engine."""

from __future__ import annotations

import asyncio
import json
import logging
from argparse import Namespace
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import vllm
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cosmos3_serve.model_executor import vllm_compat
from cosmos3_serve.model_executor.request import GenerationRequest
from cosmos3_serve.server import nim_routes, openai_videos, robot_sessions, routes
from cosmos3_serve.server.media_policy import MediaPolicy, MediaUrlPolicyMiddleware
from cosmos3_serve.server.generation_service import GenerationService, Overloaded, RequestTooLarge
from cosmos3_serve.server.job_store import JobStore
from cosmos3_serve.server.lifecycle import Lifecycle, LifecycleMiddleware
from cosmos3_serve.server.middleware import BearerAuthMiddleware, RequestSizeLimitMiddleware
from cosmos3_serve.server.protocol import CheckpointInfo, FieldError, InputLimits, ModeUnavailable, error_field

logger = logging.getLogger(__name__)
WARMUP = GenerationRequest("warm-up", num_frames=1, height=32, width=32, num_inference_steps=1, guidance_scale=6.0)


@dataclass(frozen=True)
class ServerSettings:
    checkpoint: Path
    model_name: str
    precision: str
    api_key: str | None = None
    max_request_bytes: int = 64 << 20
    max_generation_jobs: int = 64
    job_id_prefix: str = "gen-"  # of every job id (a replica's number behind `serve --replicas`)
    media_policy: MediaPolicy = MediaPolicy()
    shutdown_grace_s: float = 30.0
    input_limits: InputLimits = InputLimits()
    job_store: Path = Path("jobs")  # SQLite metadata and result files of the generation jobs
    max_stored_jobs: int = 1000
    max_stored_result_bytes: int = 4 << 30
    result_ttl_s: float = 3600.0
    public_url: str = "http://127.0.0.1:8000"  # links in responses start with it, never with a request's Host


@dataclass
class Cosmos3State:
    """What our routes need, on `app.state.cosmos3`."""

    settings: ServerSettings
    engine_client: Any
    service: GenerationService
    checkpoint_info: CheckpointInfo
    lifecycle: Lifecycle

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def metadata(self) -> dict[str, Any]:
        transformer = json.loads((self.settings.checkpoint / "transformer" / "config.json").read_text())
        parallel = self.engine_client.vllm_config.parallel_config
        generator_info = {k: v for k, v in self.service.generator_info.items() if k != "towers"}
        towers = self.service.generator_info.get("towers", {})
        return {
            "modelInfo": [{"shortName": self.model_name, "modelUrl": self.settings.checkpoint.name}],
            "model": self.model_name,
            "towers": {
                "reasoner": {"architecture": "Qwen3-VL", "engine": "vLLM", "layers": transformer["num_hidden_layers"],
                             "hidden_size": transformer["hidden_size"], **towers.get("reasoner", {})},  # fmt: skip
                "generator": {"layers": transformer["num_hidden_layers"], "hidden_size": transformer["hidden_size"],
                              "loaded": self.service.ready, **generator_info, **towers.get("generator", {})},  # fmt: skip
            },
            "precision": self.settings.precision,
            "dtype": str(self.engine_client.model_config.dtype).removeprefix("torch."),
            "modes": self.checkpoint_info.modes() + ["text+image+video->text (chat)"],
            "tensor_parallel_size": parallel.tensor_parallel_size,
            "capacity": self.service.capacity(self.engine_client.model_config.max_model_len),
            "versions": self.versions(),
        }

    def versions(self) -> dict[str, str]:
        return {"release": version("cosmos3-serve"), "api": "v1", "vllm": vllm.__version__}


# vLLM's routes this server does not offer: elastic expert parallelism's admin operations (Cosmos 3 has no experts;
# without an API key anyone could ask the engine to rescale), and the structured-decisions API, which vLLM leaves
# disabled for this model (every call answered 501).
UNSERVED_PATHS = ("/scale_elastic_ep", "/is_scaling_elastic_ep", "/v1/systemone")
OUR_PATH_PREFIXES = ("/v1/video/", "/v1/videos", "/v1/images/", "/v1/infer", "/v1/health/", "/v1/metadata",
                     "/v1/version", "/v1/manifest", "/v1/license", "/v1/robot/")  # fmt: skip


def _error(status: int, message: str, param: str | None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
            422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def validation_error(request: Request, exc: RequestValidationError):
        status = 422 if request.url.path.startswith(OUR_PATH_PREFIXES) else 400  # vLLM's routes: 400, as OpenAI's
        first = exc.errors()[0] if exc.errors() else "invalid request"
        if not isinstance(first, dict):  # vLLM raises some with plain messages (e.g. a body that is not JSON)
            return _error(status, f"body: {first}", "body")
        field, message = error_field(first)
        field = getattr(first.get("ctx", {}).get("error"), "parameter", None) or field  # vLLM's validators name it
        return _error(status, f"{field}: {message}", field)

    async def field_error(_request: Request, exc: FieldError):
        return _error(422, str(exc), exc.field)

    async def mode_unavailable(_request: Request, exc: ModeUnavailable):
        return _error(400, str(exc), "mode")

    async def too_large(_request: Request, exc: RequestTooLarge):
        return _error(413, str(exc), exc.field)

    async def overloaded(_request: Request, exc: Overloaded):
        return _error(429, str(exc), None, headers={"Retry-After": str(exc.retry_after_s)})

    vllm_http_handler = app.exception_handlers.get(HTTPException)

    async def http_error(request: Request, exc: HTTPException):
        if not request.url.path.startswith(OUR_PATH_PREFIXES) and vllm_http_handler is not None:
            return await vllm_http_handler(request, exc)
        return _error(exc.status_code, str(exc.detail), None, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(FieldError, field_error)
    app.add_exception_handler(ModeUnavailable, mode_unavailable)
    app.add_exception_handler(RequestTooLarge, too_large)
    app.add_exception_handler(Overloaded, overloaded)
    async def routing_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), None, headers=exc.headers)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(StarletteHTTPException, routing_error)  # no route for the path or method


async def build_cosmos3_app(engine_client, args: Namespace, settings: ServerSettings) -> FastAPI:
    """vLLM's app for `args` and `engine_client`, extended with the generator; the generator loads and warms up
    in the background (`/v1/health/ready` says when)."""
    api = vllm_compat.openai_server_api()
    supported_tasks = await engine_client.get_supported_tasks()
    app = api.build_app(args, supported_tasks, engine_client.model_config)
    await api.init_app_state(engine_client, app.state, args, supported_tasks)

    store = JobStore(settings.job_store, settings.max_stored_jobs, settings.max_stored_result_bytes,
                     settings.result_ttl_s)  # fmt: skip
    recovered = store.recover()
    if recovered:
        logger.warning("%d generation jobs were running when the server last stopped: marked failed", recovered)
    service = GenerationService(engine_client, settings.checkpoint, store, max_jobs=settings.max_generation_jobs,
                                job_id_prefix=settings.job_id_prefix)  # fmt: skip
    lifecycle = Lifecycle(engine_client, service, settings.shutdown_grace_s)
    app.state.cosmos3 = Cosmos3State(settings=settings, engine_client=engine_client, service=service,
                                     checkpoint_info=CheckpointInfo.load(settings.checkpoint), lifecycle=lifecycle)
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in UNSERVED_PATHS]
    app.include_router(nim_routes.router)
    app.include_router(routes.router)
    app.include_router(openai_videos.router)
    app.include_router(robot_sessions.router)
    app.middleware_stack = None  # vLLM's build_app built the stack; rebuild it with our handlers and middleware
    install_error_handlers(app)
    app.add_middleware(MediaUrlPolicyMiddleware, policy=settings.media_policy, skip_prefixes=OUR_PATH_PREFIXES)
    app.add_middleware(RequestSizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    if settings.api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=settings.api_key)

    async def start_generator() -> None:
        try:
            await service.start(warmup=WARMUP)
            logger.info("generator loaded and warm: ready")
        except Exception:  # noqa: BLE001 - stay up (live, not ready) and say why
            logger.exception("the generator failed to start; /v1/health/ready stays 503")

    app.state.cosmos3_startup = asyncio.create_task(start_generator())
    return app
