"""A node with its HTTP server on, and a token per role."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.peers import NodeProcess, free_port

TOKENS = {
    "modality-web": ("sender-secret", ["sender"]),
    "viewer": ("reader-secret", ["reader"]),
    "it-admin": ("admin-secret", ["admin"]),
    "records-clerk": ("phi-secret", ["phi"]),
    "gpu-host": ("worker-secret", ["worker"]),
    "other-gpu-host": ("other-worker-secret", ["worker"]),
}


@dataclass
class WebNode:
    node: NodeProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.settings['http']['port']}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @staticmethod
    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def trickled_until_closed(sock: socket.socket, data: bytes) -> bool:
    """Send `data` a byte every 0.3 s; True once the node closes the connection."""
    with contextlib.suppress(OSError):
        for byte in data:
            sock.sendall(bytes([byte]))
            sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                if sock.recv(1) == b"":
                    return True
    return False


def http_settings(port: int, **auth: Any) -> dict[str, Any]:
    tokens = [
        {"name": name, "sha256": hashlib.sha256(secret.encode()).hexdigest(), "roles": roles}
        for name, (secret, roles) in TOKENS.items()
    ]
    return {"host": "127.0.0.1", "port": port, "auth": {"tokens": tokens, **auth}}


def web_starter(start_node: Callable[..., NodeProcess]) -> Callable[..., WebNode]:
    """`start_node` with the HTTP server on: `auth` adds to its auth section, `http_extra`
    to the rest of it."""

    def start(**overrides: Any) -> WebNode:
        port = free_port()
        auth = overrides.pop("auth", {})
        http = {**http_settings(port, **auth), **overrides.pop("http_extra", {})}
        node = start_node(http=http, **overrides)
        return WebNode(node)

    return start


@pytest.fixture
def start_web_node(start_node: Callable[..., NodeProcess]) -> Callable[..., WebNode]:
    return web_starter(start_node)


@pytest.fixture
def web_node(start_web_node: Callable[..., WebNode]) -> WebNode:
    return start_web_node(workers={"count": 0})


@pytest.fixture(scope="module")
def module_web_node(start_module_node: Callable[..., NodeProcess]) -> WebNode:
    return web_starter(start_module_node)(workers={"count": 0})


@pytest.fixture
def shared_web_node(module_web_node: WebNode) -> WebNode:
    """A node with no workers that the module's tests share (for tests that store UIDs of
    their own and look only at those), its log read from this test's start."""
    module_web_node.node.mark_log()
    return module_web_node


@pytest.fixture
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_file(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> Path:
    public = json.loads(RSAAlgorithm.to_jwk(signing_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256"}]}))
    return path
