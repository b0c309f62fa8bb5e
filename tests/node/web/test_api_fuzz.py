"""The HTTP face fuzzed: the admin API run from its own OpenAPI schema by schemathesis, as
an administrator (every operation, with generated valid and invalid input, answers without a
server error and as its schema says), and STOW-RS bodies mutated at random."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from tests.node.edge.test_scp import ct_dataset
from tests.node.web.conftest import TOKENS, WebNode
from tests.node.web.test_stow import BOUNDARY, CONTENT_TYPE, body, part10


@pytest.mark.slow
def test_the_api_survives_its_own_schema(web_node: WebNode, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    if not st.exists() and shutil.which("st") is None:
        pytest.skip("schemathesis is not installed")
    token = TOKENS["it-admin"][0]
    run = subprocess.run(
        [
            str(st if st.exists() else shutil.which("st")), "run",
            f"{web_node.url}/api/openapi.json",
            "--header", f"Authorization: Bearer {token}",
            "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
            "--max-examples", "15",
            "--generation-deterministic",
            "--request-timeout", "20",
            "--suppress-health-check", "all",
        ],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Traceback" not in web_node.node.log()


MUTATIONS = 200
SEED = 20261206


def mutated(body: bytes, rng: random.Random) -> bytes:
    """One mutation of a STOW-RS body: bit flips, a cut, a duplicated or dropped span, a
    broken boundary or part header."""
    data = bytearray(body)
    kind = rng.randrange(6)
    if kind == 0:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data)) :]
    elif kind == 2:
        start = rng.randrange(len(data))
        data[start:start] = data[start : start + rng.randint(1, 512)]
    elif kind == 3:
        start = rng.randrange(len(data))
        del data[start : start + rng.randint(1, 512)]
    elif kind == 4:
        data = data.replace(BOUNDARY.encode(), BOUNDARY.encode()[: rng.randint(0, 5)], 1)
    else:
        data = data.replace(b"Content-Type: application/dicom", bytes(rng.randbytes(24)), 1)
    return bytes(data)


@pytest.mark.slow
def test_mutated_stow_bodies_get_4xx_and_leave_nothing_half_stored(web_node: WebNode) -> None:
    """A seeded mutation fuzz of real multipart bodies (two CT instances each): every answer
    is the Store Instances Response or a 4xx, never a server error; nothing stays in the
    spool; the log has no traceback; and the node still stores a good body."""
    rng = random.Random(SEED)
    headers = {"Content-Type": CONTENT_TYPE, **web_node.auth("modality-web")}
    url = f"{web_node.dicomweb}/studies"
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(MUTATIONS):
            good = body(*(part10(ct_dataset(generate_uid())) for _ in range(2)))
            try:
                status = client.post(url, content=mutated(good, rng), headers=headers).status_code
            except httpx.TransportError:
                status = 0  # the node closed a request it could not parse: allowed
            statuses[status] = statuses.get(status, 0) + 1
        assert set(statuses) <= {0, 200, 202, 400, 409, 413, 415}, statuses
        last = client.post(url, content=body(part10(ct_dataset(generate_uid()))), headers=headers)
        assert last.status_code == 200
    assert list((web_node.node.storage / ".incoming").iterdir()) == []
    assert "Traceback" not in web_node.node.log()
