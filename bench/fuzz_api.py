"""A fuzzer over every operation in a running server's `/openapi.json`: for each, requests with bodies built from
its schema and then broken (wrong types, nulls, boundary and huge numbers, long strings, unknown fields, malformed
JSON), and odd path parameters. It prints the answers by status per operation and every server error (5xx or a
dropped connection); the server must still be ready at the end.

    cosmos3-serve serve CKPT --port 8141 --max-generation-jobs 4 &
    python bench/fuzz_api.py http://127.0.0.1:8141 [--per-operation 30] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ODD_STRINGS = ["", " ", "0", "-1", "NaN", "Infinity", "../../etc/passwd", "%00", "\u202e\u0000", "a" * 10_000,
               "data:image/png;base64,AAAA", "http://127.0.0.1:1/", "file:///etc/passwd", "{}", "null"]  # fmt: skip
ODD_NUMBERS = [0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 1e308, -1e308, 1e-308, 0.5, 4097, 100000]


class Fuzzer:
    def __init__(self, spec: dict, rng: random.Random) -> None:
        self.spec, self.rng = spec, rng

    def schema(self, schema: dict) -> dict:
        """`schema` with its `$ref`s followed."""
        seen = 0
        while "$ref" in schema and seen < 32:
            node: Any = self.spec
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema, seen = node, seen + 1
        return schema

    def valid(self, schema: dict, depth: int = 0) -> Any:
        """A value of `schema`'s shape (not necessarily accepted: bounds are drawn around)."""
        schema = self.schema(schema)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.valid(self.rng.choice(schema[key]), depth)
        if "allOf" in schema:
            return self.valid(schema["allOf"][0], depth)
        if "enum" in schema:
            return self.rng.choice(schema["enum"])
        if "const" in schema:
            return schema["const"]
        kind = schema.get("type")
        if kind == "object" or "properties" in schema:
            if depth > 4:
                return {}
            properties = schema.get("properties", {})
            required = set(schema.get("required", ()))
            return {name: self.valid(sub, depth + 1) for name, sub in properties.items()
                    if name in required or self.rng.random() < 0.5}  # fmt: skip
        if kind == "array":
            if depth > 4:
                return []
            return [self.valid(schema.get("items", {}), depth + 1) for _ in range(self.rng.randint(0, 3))]
        if kind == "integer":
            low = int(schema.get("minimum", schema.get("exclusiveMinimum", -6) + 1))
            high = int(schema.get("maximum", schema.get("exclusiveMaximum", low + 65) - 1))
            return self.rng.choice([low, high, self.rng.randint(low, min(high, low + 100))])
        if kind == "number":
            return self.rng.choice([schema.get("minimum", -1.0), schema.get("maximum", 10.0), self.rng.uniform(0, 8)])
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "string":
            return self.rng.choice(["A robot arm picks up a cube.", "x", *ODD_STRINGS[:4]])
        if kind == "null":
            return None
        return self.rng.choice([None, 1, "x", [], {}])

    def broken(self, value: Any) -> Any:
        """`value` with one part replaced by something odd."""
        odd = self.rng.choice([None, True, [], {}, {"nested": [[[[]]]]}, *ODD_NUMBERS, *ODD_STRINGS])
        if isinstance(value, dict) and value and self.rng.random() < 0.8:
            key = self.rng.choice(list(value))
            return {**value, key: self.broken(value[key])}
        if isinstance(value, dict) and self.rng.random() < 0.5:
            return {**value, "unknown_field_" + str(self.rng.randint(0, 99)): odd}
        if isinstance(value, list) and value and self.rng.random() < 0.7:
            index = self.rng.randrange(len(value))
            return [*value[:index], self.broken(value[index]), *value[index + 1 :]]
        return odd

    def request(self, path: str, method: str, operation: dict) -> tuple[str, dict[str, Any]]:
        """A request for one operation: (URL path, httpx keyword arguments)."""
        for parameter in operation.get("parameters", []):
            if parameter.get("in") == "path":
                value = self.rng.choice(["gen-0", "gen-" + "f" * 32, *ODD_STRINGS[:9], "a/b", "%2e%2e"])
                path = path.replace("{" + parameter["name"] + "}", quote(value, safe=""))
        kwargs: dict[str, Any] = {}
        query = {p["name"]: str(self.valid(p.get("schema", {}))) for p in operation.get("parameters", [])
                 if p.get("in") == "query" and self.rng.random() < 0.5}  # fmt: skip
        if query:
            kwargs["params"] = query
        body = operation.get("requestBody", {}).get("content", {})
        if "application/json" in body:
            roll = self.rng.random()
            if roll < 0.1:
                kwargs["content"] = self.rng.choice([b"", b"{", b"[1,", b"\xff\xfe", b"{\"a\": 1e999}", b"null"])
                kwargs["headers"] = {"content-type": "application/json"}
            else:
                value = self.valid(body["application/json"].get("schema", {}))
                kwargs["json"] = value if roll < 0.3 else self.broken(value)
        elif method in ("post", "put", "patch") and body:
            kwargs["content"] = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 64)))
            kwargs["headers"] = {"content-type": next(iter(body))}
        return path, kwargs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("--per-operation", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=20.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.base_url, headers=headers, timeout=args.timeout_s)
    spec = client.get("/openapi.json").json()
    fuzzer = Fuzzer(spec, random.Random(args.seed))
    by_operation: dict[str, collections.Counter] = {}
    server_errors: list[dict] = []
    for path, methods in sorted(spec["paths"].items()):
        for method, operation in methods.items():
            name = f"{method.upper()} {path}"
            counts = by_operation.setdefault(name, collections.Counter())
            for _ in range(args.per_operation):
                url, kwargs = fuzzer.request(path, method, operation)
                try:
                    status = client.request(method.upper(), url, **kwargs).status_code
                except httpx.TimeoutException:
                    counts["timeout"] += 1  # accepted work that outlasts the client: not an error
                    continue
                except httpx.TransportError as error:
                    status = f"dropped ({type(error).__name__})"
                counts[str(status)] += 1
                if not str(status).isdigit() or int(status) >= 500:
                    server_errors.append({"operation": name, "url": url, "status": status,
                                          "body": str(kwargs.get("json", kwargs.get("content")))[:300]})  # fmt: skip
    ready = client.get("/v1/health/ready").status_code
    for name, counts in by_operation.items():
        print(f"{name:60s} {dict(sorted(counts.items()))}")
    print(f"{sum(sum(c.values()) for c in by_operation.values())} requests over {len(by_operation)} operations; "
          f"server errors: {len(server_errors)}; ready at the end: {ready == 200}")  # fmt: skip
    for error in server_errors[:20]:
        print("  ", error)
    if args.json:
        report = {"operations": {name: dict(counts) for name, counts in by_operation.items()},
                  "server_errors": server_errors, "ready_at_end": ready}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if not server_errors and ready == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
