"""A node with its HTTP server on, and a token per role."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.peers import NodeProcess, free_port

TOKENS = {
    "modality-web": ("sender-secret", ["sender"]),
    "viewer": ("reader-secret", ["reader"]),
    "it-admin": ("admin-secret", ["admin"]),
}


@dataclass
class WebNode:
    node: NodeProcess
    url: str

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @staticmethod
    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def http_settings(port: int, **auth: Any) -> dict[str, Any]:
    tokens = [
        {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), "roles": roles}
        for name, (secret, roles) in TOKENS.items()
    ]
    return {"host": "127.0.0.1", "port": port, "auth": {"tokens": tokens, **auth}}


@pytest.fixture
def start_web_node(start_node: Callable[..., NodeProcess]) -> Callable[..., WebNode]:
    def start(**overrides: Any) -> WebNode:
        port = free_port()
        auth = overrides.pop("auth", {})
        node = start_node(http=http_settings(port, **auth), **overrides)
        return WebNode(node, f"http://127.0.0.1:{port}")

    return start


@pytest.fixture
def web_node(start_web_node: Callable[..., WebNode]) -> WebNode:
    return start_web_node(workers={"count": 0})
