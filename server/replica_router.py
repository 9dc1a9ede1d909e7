"""One front end for several replicas of the server (`serve --replicas N`), each a whole deployment on its own GPUs.

Many small requests (robots' policy steps, images) gain nothing from splitting one request over GPUs; they gain
from more deployments side by side. The router sends each new request (chat, a generation, a robot's websocket)
to the replica with the fewest requests in flight through it (in turn among equals), and every request about an
existing generation job to the replica that runs it: a replica's job ids carry its number (`gen-r<k>-...`,
`serve --job-id-prefix`). Bodies and responses stream through unchanged (server-sent events included), so each
replica keeps enforcing its own limits and authentication. The job list merges the replicas' lists; readiness is
every replica's.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

JOB_ID_PREFIX = "gen-r{replica}-"
_JOB_ID = re.compile(r"^gen-r(\d+)-")
_JOB_PATH = re.compile(r"^/v1/(?:video/generate|videos)/(?!sync$)([^/]+)")
# Headers that belong to one connection, not to the request or response carried over it.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}  # fmt: skip
_LIST_PAGE = 100  # items per page the router asks each replica for when it merges their job lists


@dataclass
class Replica:
    index: int
    url: str  # http://127.0.0.1:PORT
    in_flight: int = 0


@dataclass
class Replicas:
    members: list[Replica]
    client: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=None))

    turn: int = 0  # where the next tie is broken: requests that return at once (a job queued) still take turns

    def least_loaded(self) -> Replica:
        n = len(self.members)
        chosen = min(self.members, key=lambda r: (r.in_flight, (r.index - self.turn) % n))
        self.turn = (chosen.index + 1) % n
        return chosen

    def owner(self, path: str) -> Replica | None:
        """The replica of the job a path names (None: the path names no job, or not one of ours)."""
        match = _JOB_PATH.match(path)
        owner = _JOB_ID.match(match.group(1)) if match else None
        index = int(owner.group(1)) if owner else -1
        return self.members[index] if 0 <= index < len(self.members) else None


def build_router_app(urls: list[str]) -> FastAPI:
    replicas = Replicas([Replica(i, url.rstrip("/")) for i, url in enumerate(urls)])

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await replicas.client.aclose()

    app = FastAPI(title="cosmos3-serve replicas", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.replicas = replicas

    @app.get("/v1/health/live")
    async def live() -> dict:
        return {"object": "health.response", "message": "live"}

    @app.get("/v1/health/ready")
    async def ready() -> Response:
        states = await asyncio.gather(*(_ready(replicas.client, r) for r in replicas.members))
        body = {"object": "health.response", "message": "ready" if all(states) else "not ready",
                "replicas": [{"index": r.index, "ready": ok} for r, ok in zip(replicas.members, states)]}  # fmt: skip
        return JSONResponse(body, status_code=200 if all(states) else 503)

    @app.get("/v1/videos")
    async def list_videos(request: Request) -> Response:
        return await _merged_list(replicas, request)

    @app.websocket("/v1/robot/session")
    async def robot_session(websocket: WebSocket) -> None:
        await _relay_websocket(replicas.least_loaded(), websocket)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(request: Request, path: str) -> Response:
        return await _forward(replicas, replicas.owner(request.url.path) or replicas.least_loaded(), request)

    return app


async def _ready(client: httpx.AsyncClient, replica: Replica) -> bool:
    try:
        return (await client.get(f"{replica.url}/v1/health/ready", timeout=5.0)).status_code == 200
    except httpx.HTTPError:
        return False


def _request_headers(request: Request | WebSocket) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]


async def _forward(replicas: Replicas, replica: Replica, request: Request) -> Response:
    """`request` sent to `replica`, its response streamed back as it comes."""
    url = httpx.URL(replica.url + request.url.path, query=request.url.query.encode())
    upstream = replicas.client.build_request(request.method, url, headers=_request_headers(request),
                                             content=request.stream())  # fmt: skip
    replica.in_flight += 1
    try:
        response = await replicas.client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        replica.in_flight -= 1
        return JSONResponse({"error": {"message": f"replica {replica.index} is unreachable: {exc}",
                                       "type": "bad_gateway", "code": 502}}, status_code=502)  # fmt: skip

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:  # also when the client goes away mid-stream
            replica.in_flight -= 1
            await response.aclose()

    headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
    return StreamingResponse(body(), status_code=response.status_code, headers=headers)


async def _merged_list(replicas: Replicas, request: Request) -> Response:
    """`GET /v1/videos` over every replica: their stored jobs by creation time, paged here by `after` / `limit`."""
    order = request.query_params.get("order", "desc")
    try:
        limit = int(request.query_params.get("limit", 20))
    except ValueError:
        limit = -1
    if order not in ("asc", "desc") or not 1 <= limit <= _LIST_PAGE:
        replica = replicas.members[0]  # the replica words the 422 for the field
        return await _forward(replicas, replica, request)
    per_replica: list[list[dict[str, Any]]] = []
    for replica in replicas.members:
        items: list[dict[str, Any]] = []
        after = None
        while True:
            params = {"limit": _LIST_PAGE, "order": order, **({"after": after} if after else {})}
            response = await replicas.client.get(f"{replica.url}/v1/videos", params=params,
                                                 headers=_request_headers(request))  # fmt: skip
            if response.status_code != 200:
                return Response(response.content, status_code=response.status_code,
                                media_type=response.headers.get("content-type"))  # fmt: skip
            page = response.json()
            items += page["data"]
            if not page["has_more"] or not page["data"]:
                break
            after = page["last_id"]
        per_replica.append(items)
    # Each replica's list is in its own order; created_at counts seconds, so jobs of one second keep that order.
    items = list(heapq.merge(*per_replica, key=lambda item: item["created_at"], reverse=order == "desc"))
    start = 0
    if (after := request.query_params.get("after")) is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            return JSONResponse({"error": {"message": f"after: no video {after!r}", "type": "invalid_request_error",
                                           "param": "after", "code": 422}}, status_code=422)  # fmt: skip
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None,
                         "has_more": start + limit < len(items)})  # fmt: skip


async def _relay_websocket(replica: Replica, websocket: WebSocket) -> None:
    """A robot's websocket to `replica`, messages relayed both ways until either side closes."""
    import websockets

    url = replica.url.replace("http://", "ws://", 1) + websocket.url.path
    auth = {k: v for k, v in websocket.headers.items() if k.lower() == "authorization"}
    replica.in_flight += 1
    try:
        async with websockets.connect(url, additional_headers=auth, max_size=None) as upstream:
            await websocket.accept()

            async def to_replica() -> None:
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        await upstream.send(await websocket.receive_text())
                await upstream.close()

            async def to_robot() -> None:
                async for message in upstream:
                    await websocket.send_text(message if isinstance(message, str) else message.decode())
                await websocket.close()

            tasks = [asyncio.create_task(to_replica()), asyncio.create_task(to_robot())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
    except websockets.InvalidStatus as exc:  # the replica refused it (e.g. 403 without the API key)
        await websocket.close(code=1008, reason=f"refused by the server: HTTP {exc.response.status_code}")
    finally:
        replica.in_flight -= 1
