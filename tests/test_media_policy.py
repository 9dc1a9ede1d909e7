"""The media URL policy's pure parts against hand-written cases: which addresses are public, which URLs pass,
and where in a JSON body each media URL sits."""

from __future__ import annotations

import pytest

from cosmos3_serve.server.media_policy import INLINE_ONLY, NOT_ALLOWED, MediaPolicy, is_public_address, media_urls


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:8.8.8.8", True),
])  # fmt: skip
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_without_domains_only_data_urls_pass() -> None:
    policy = MediaPolicy.from_domains(None)
    assert policy.refusal("data:image/png;base64,AAAA") is None
    for url in ("https://example.com/a.png", "http://127.0.0.1/a", "file:///etc/passwd", "ftp://example.com/a"):
        assert policy.refusal(url) == INLINE_ONLY


def test_allowed_domains_pass_exactly_and_literal_private_addresses_never() -> None:
    policy = MediaPolicy.from_domains(["Example.com.", "10.0.0.5", "8.8.8.8"])
    assert policy.allowed_domains == {"example.com", "10.0.0.5", "8.8.8.8"}
    assert policy.refusal("https://EXAMPLE.com/a.png") is None
    assert policy.refusal("http://8.8.8.8/a.png") is None
    for url in ("https://cdn.example.com/a.png", "https://example.com.evil.net/a", "http://10.0.0.5/a.png",
                "file://example.com/etc/passwd", "https://user@evil.net/a"):  # fmt: skip
        assert policy.refusal(url) == NOT_ALLOWED, url


def test_media_urls_are_found_at_any_depth_with_their_field() -> None:
    body = {"model": "m", "messages": [
        {"role": "system", "content": "text only"},
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "A"}},
                                     {"type": "video_url", "video_url": {"url": "B"}}]},
        {"role": "tool", "content": [{"type": "input_image", "image_url": "C"}]},
    ]}  # fmt: skip
    assert list(media_urls(body)) == [
        ("messages[1].content[1].image_url.url", "A"),
        ("messages[1].content[2].video_url.url", "B"),
        ("messages[2].content[0].image_url", "C"),
    ]
