"""Which media URLs the server fetches: by default none, only inline data URLs; with `--allowed-media-domains`,
http(s) URLs of those hosts, and only where every address the host resolves to is public.

The policy is enforced twice: at the HTTP edge (`MediaUrlPolicyMiddleware`: 422 naming the field before any work)
and at the connection (`patches.guard_media_fetches`: vLLM's media connector, for routes the edge does not parse,
redirects and hosts whose DNS answer changes after the edge's check). Refusals and fetch failures say nothing about
the target (its status, reachability or address), so the server cannot be used to scan a network.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosmos3_serve.server.middleware import json_error

if TYPE_CHECKING:
    from aiohttp.abc import ResolveResult

INLINE_ONLY = "remote media URLs are off on this server: send the media inline as a data URL (data:<type>;base64,...)"
NOT_ALLOWED = "this media URL is not allowed on this server: send the media inline as a data URL"
FETCH_FAILED = "the media URL could not be fetched or decoded"
MEDIA_URL_KEYS = ("image_url", "video_url", "audio_url")  # OpenAI / vLLM content parts that carry a URL


def is_public_address(address: str) -> bool:
    """Whether `address` (IPv4 or IPv6 text) is a global unicast address: not loopback, private, link-local,
    shared, reserved or multicast (an IPv4-mapped IPv6 address is judged as its IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


@dataclass(frozen=True)
class MediaPolicy:
    """`allowed_domains`: hosts (exact, lower case) whose http(s) media URLs may be fetched; empty: none."""

    allowed_domains: frozenset[str] = frozenset()

    @classmethod
    def from_domains(cls, domains: list[str] | None) -> MediaPolicy:
        return cls(frozenset(domain.strip().lower().rstrip(".") for domain in domains or () if domain.strip()))

    def refusal(self, url: str) -> str | None:
        """Why `url` is not fetched, or None. Data URLs always pass; no host is resolved here."""
        if url[:5].lower() == "data:":
            return None
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            return INLINE_ONLY if not self.allowed_domains else NOT_ALLOWED
        if not self.allowed_domains:
            return INLINE_ONLY
        host = (parts.hostname or "").lower().rstrip(".")
        if host not in self.allowed_domains:
            return NOT_ALLOWED
        literal = _ip_literal(host)
        if literal is not None and not is_public_address(literal):
            return NOT_ALLOWED
        return None

    def check_resolved(self, host: str) -> None:
        """Raises OSError(NOT_ALLOWED) unless every address of `host` is public (a blocking DNS lookup)."""
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            raise OSError(NOT_ALLOWED) from None
        if not infos or not all(is_public_address(info[4][0]) for info in infos):
            raise OSError(NOT_ALLOWED)


class PublicAddressResolver(AbstractResolver):
    """aiohttp's resolver, refusing any host with a non-public address: checked at connect time, for every
    redirect hop and every new connection, so a DNS answer that changes after the edge's check does not reach
    a private target."""

    def __init__(self) -> None:
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            infos = await self._resolver.resolve(host, port, family)
        except OSError:
            raise OSError(NOT_ALLOWED) from None
        if not infos or not all(is_public_address(info["host"]) for info in infos):
            raise OSError(NOT_ALLOWED)
        return infos

    async def close(self) -> None:
        await self._resolver.close()


def media_urls(body: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, URL) of every media URL in a JSON body: `image_url` / `video_url` / `audio_url` given as a
    string or as `{"url": ...}`, at any depth (chat messages, Responses input, tool results)."""
    if isinstance(body, dict):
        for key, value in body.items():
            field = f"{path}.{key}" if path else str(key)
            if key in MEDIA_URL_KEYS and isinstance(value, str):
                yield field, value
            elif key in MEDIA_URL_KEYS and isinstance(value, dict) and isinstance(value.get("url"), str):
                yield f"{field}.url", value["url"]
            else:
                yield from media_urls(value, field)
    elif isinstance(body, list):
        for index, value in enumerate(body):
            yield from media_urls(value, f"{path}[{index}]")


class MediaUrlPolicyMiddleware:
    """JSON POST bodies outside `skip_prefixes` are read whole, their media URLs checked against `policy` (422
    naming the first refused field), then handed on unchanged. Bodies that are not JSON pass untouched; the size
    limit is enforced by the middleware around this one."""

    def __init__(self, app: ASGIApp, policy: MediaPolicy, skip_prefixes: tuple[str, ...]) -> None:
        self.app, self.policy, self.skip_prefixes = app, policy, skip_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith(self.skip_prefixes):
            return await self.app(scope, receive, send)
        content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        refused = self._refused_field(body)
        if refused is not None:
            field, reason = refused
            return await json_error(send, 422, f"{field}: {reason}", "invalid_request_error", param=field)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refused_field(self, body: bytes) -> tuple[str, str] | None:
        try:
            parsed = json.loads(body)
        except ValueError:
            return None  # the route answers the parse error itself
        for field, url in media_urls(parsed):
            reason = self.policy.refusal(url)
            if reason is not None:
                return field, reason
        return None

