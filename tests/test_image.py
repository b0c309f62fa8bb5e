"""The container image `deploy/image/build.sh` builds: it runs the node as user 10001 on a
read-only root filesystem with only its volumes writable, answers DCMTK's echoscu, reports
healthy through its own healthcheck, and stops on SIGTERM. Skips where podman is absent or the
image is not of this checkout's code (the build takes minutes: `deploy/image/build.sh`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.peers import DCMTK_ENV, dcmtk, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/ainode:{VERSION}"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "image" / "containers.conf")}


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV
    )


def _image_missing() -> str | None:
    """Why the image cannot be tested here: podman missing, or no image of this checkout's code
    (one built from other code would pass or fail for the wrong reasons)."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    label = '{{index .Labels "io.ainode.source"}}'
    inspected = podman("image", "inspect", "--format", label, IMAGE)
    if inspected.returncode != 0:
        return f"no image {IMAGE} (deploy/image/build.sh builds it)"
    source = subprocess.run(
        [REPO / "deploy" / "image" / "source-hash.sh"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if inspected.stdout.strip() != source:
        return f"{IMAGE} holds other code than this checkout (deploy/image/build.sh rebuilds it)"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_image_missing() is not None, reason=str(_image_missing())),
]


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """The image serving a one-host node on a free port of the host's network."""
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    config = tmp_path / "config"
    config.mkdir()
    (config / "node.yaml").write_text(
        yaml.safe_dump(
            {
                "node": {"ae_title": "AINODE", "host": "127.0.0.1", "port": port},
                "storage": {"path": "/var/lib/ainode/storage"},
                "database": {"url": "sqlite:////var/lib/ainode/ainode.db"},
                "peers": {"modality": {"ae_title": "ECHOSCU", "host": "127.0.0.1", "port": 104}},
            }
        )
    )
    name = f"ainode-test-{uuid.uuid4().hex[:8]}"
    started = podman(
        "run", "--detach", "--name", name, "--network", "host", "--read-only",
        "--tmpfs", "/tmp", "--volume", f"{data}:/var/lib/ainode",
        "--volume", f"{config}:/etc/ainode:ro", IMAGE,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        yield name, port, data
    finally:
        podman("rm", "--force", "--time", "5", name)


def test_the_image_serves_unprivileged_on_a_read_only_root(
    container: tuple[str, int, Path],
) -> None:
    name, port, data = container
    echo = [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "AINODE", "127.0.0.1", str(port)]
    answered = lambda: subprocess.run(echo, env=DCMTK_ENV, capture_output=True).returncode == 0  # noqa: E731
    assert wait_until(answered, timeout=120, interval=0.5)
    healthy = lambda: podman("healthcheck", "run", name).returncode == 0  # noqa: E731
    assert wait_until(healthy, timeout=120, interval=1)  # its worker loads torch first
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    written = podman("exec", name, "touch", "/opt/ainode/written")
    assert written.returncode != 0 and "Read-only file system" in written.stderr
    assert (data / "ainode.db").stat().st_uid == 10001  # the database lives on the volume

    stopped = podman("stop", "--time", "30", name)
    assert stopped.returncode == 0, stopped.stderr
    state = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert state == "0"  # SIGTERM drained the node; it was not killed
