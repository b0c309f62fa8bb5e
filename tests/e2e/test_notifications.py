"""Notifications to a real local HTTP receiver: a positive COVID triage notifies once, a
negative one does not, a receiver that is down gets retries, and a failed job tells the
endpoint that asked for failures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.e2e.test_model_pipelines import SMALL_INPUT
from tests.e2e.test_routing import uid_of
from tests.models import ENCODER_ARGS, fixed_classifier
from tests.peers import free_port, storescu, wait_until

RULES = """
rules:
  - name: triage
    match: {Modality: CT}
    pipelines: [covid-triage, triage-negative]
    notify: [radiologist, down]
  - name: broken
    match: {Modality: CT, ConvolutionKernel: {regex: "^B$"}}
    pipelines: [broken-model]
    notify: [it-desk]
"""


class Receiver:
    """An HTTP endpoint that records what is posted to it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(
                    {"body": json.loads(self.rfile.read(length)), "auth": self.headers["X-Key"]}
                )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


def triage(models: Path, name: str, logits: list[float]) -> dict[str, object]:
    path = models / f"{name}.pt"
    torch.save(fixed_classifier(logits).state_dict(), path)
    return {
        "type": "covid-triage",
        "device": "cpu",
        "model": {"path": str(path)},
        "network": {
            "target": "pipelines.networks.EncoderClassifier",
            "args": {"out_channels": 3, **ENCODER_ARGS},
        },
        "preprocessing": SMALL_INPUT,
    }


@pytest.mark.slow
def test_positive_notifies_once_negative_not_down_retried_failure_told(
    start_node, receiver: Receiver, real_series, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    broken = models / "broken.pt"
    broken.write_bytes(b"not a model")
    headers = {"X-Key": "s3cret"}
    node = start_node(
        routing={"rules_file": str(rules)},
        pipelines={
            "covid-triage": triage(models, "positive", [3.0, 0.0, -2.0]),
            "triage-negative": triage(models, "negative", [-2.0, -2.0, 3.0]),
            "broken-model": {
                "type": "covid-triage",
                "device": "cpu",
                "model": {"path": str(broken)},
                "preprocessing": SMALL_INPUT,
            },
        },
        notifications={
            "radiologist": {"url": receiver.url, "headers": headers, "on": ["positive"]},
            "down": {"url": f"http://127.0.0.1:{free_port()}/gone", "on": ["positive"]},
            "it-desk": {"url": receiver.url, "headers": headers, "on": ["failed"]},
        },
        dispatch={"retry_base_seconds": 1, "retry_max_seconds": 2, "max_attempts": 3},
    )
    lung, body = real_series["lung-kernel"], real_series["body-kernel"]
    storescu(node.port, lung + body)

    def told() -> list[dict] | None:
        events = [p["body"]["event"] for p in receiver.posts]
        return receiver.posts if "positive" in events and "failed" in events else None

    wait_until(told, timeout=300, interval=1)
    positive = [p for p in receiver.posts if p["body"]["event"] == "positive"]
    # two series matched; each positive triage job tells the radiologist once
    assert len(positive) == 2
    assert {p["body"]["pipeline"] for p in positive} == {"covid-triage"}
    assert {p["body"]["series_instance_uid"] for p in positive} == {uid_of(lung), uid_of(body)}
    first = positive[0]
    assert first["auth"] == "s3cret" and first["body"]["positive"] is True
    assert first["body"]["findings"] and first["body"]["study_instance_uid"]
    failed = [p for p in receiver.posts if p["body"]["event"] == "failed"]
    assert [p["body"]["pipeline"] for p in failed] == ["broken-model"]
    assert failed[0]["body"]["error"]

    def retried() -> list[dict] | None:
        down = [n for n in node.status()["notifications"] if n["target"] == "down"]
        return down if down and all(n["attempts"] >= 2 for n in down) else None

    down = wait_until(retried, timeout=60, interval=1)
    assert all("ConnectError" in (n["error"] or "") for n in down)
    assert len(receiver.posts) == 3  # nothing twice, nothing for the negative triage
