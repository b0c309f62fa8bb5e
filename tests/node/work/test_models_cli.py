"""`ainode models list|verify` over a config with a good, a missing and a corrupt model;
`ainode similar` over stored embeddings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from node.flow.queue import JobQueue
from node.flow.routing.engine import JobRequest
from node.flow.routing.rules import Priority
from node.store.db.engine import make_engine
from node.store.db.migrate import upgrade
from tests.models import fixed_classifier
from tests.node.test_cli import ainode
from tests.rows import add_series, finish

NETWORK = (
    "network: {target: pipelines.networks.EncoderClassifier, "
    "args: {out_channels: 3, init_filters: 4, blocks_down: [1, 1, 1]}}"
)


def write_models_config(tmp_path: Path) -> Path:
    good = tmp_path / "triage.pt"
    torch.save(fixed_classifier([0.0, 1.0, 0.0]).state_dict(), good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:-100])
    config = tmp_path / "node.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n"
        "peers: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
        "pipelines:\n"
        f"  covid-triage:\n    device: cpu\n    model: {{path: {good}, sha256: {digest}}}\n"
        f"    {NETWORK}\n"
        "  nodule-detection:\n    device: cpu\n"
        f"    model: {{path: {tmp_path / 'nowhere'}}}\n"
        "  thoracic-findings:\n    type: covid-triage\n    device: cpu\n"
        f"    model: {{path: {corrupt}}}\n    {NETWORK}\n"
    )
    return config


def test_models_list_and_verify(tmp_path: Path) -> None:
    config = write_models_config(tmp_path)
    listed = ainode("models", "list", "--config", str(config), "--json")
    assert listed.returncode == 1, listed.stderr  # one model is missing
    models = {m["pipeline"]: m for m in json.loads(listed.stdout)["models"]}
    assert set(models) == {"covid-triage", "nodule-detection", "thoracic-findings"}
    assert models["covid-triage"]["source"] == "state dict"
    assert models["covid-triage"]["device"] == "cpu"
    assert models["covid-triage"]["problem"] is None
    assert "model not found" in models["nodule-detection"]["problem"]
    assert models["thoracic-findings"]["problem"] is None  # listing does not load
    loaded = subprocess.run(  # the listing reads settings and files: no torch, no MONAI
        [
            sys.executable,
            "-c",
            "import sys; from typer.testing import CliRunner; from node.cli import app; "
            f"CliRunner().invoke(app, ['models', 'list', '--config', {str(config)!r}]); "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr

    verified = ainode("models", "verify", "--config", str(config), "--json")
    assert verified.returncode == 1
    models = {m["pipeline"]: m for m in json.loads(verified.stdout)["models"]}
    good = models["covid-triage"]
    assert good["loads"] is True and good["sha256"] == good["sha256_configured"]
    corrupt = models["thoracic-findings"]
    assert corrupt["loads"] is False and "cannot load" in corrupt["problem"]
    assert models["nodule-detection"]["loads"] is None

    text = ainode("models", "verify", "--config", str(config))
    assert "covid-triage (covid-triage): loads" in text.stdout
    assert "nodule-detection (nodule-detection): UNAVAILABLE: model not found" in text.stdout


def test_similar_lists_the_closest_series(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        f"database: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n"
        "peers: {pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}}\n"
    )
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    upgrade(engine)
    queue = JobQueue(engine)
    for series_id, vector in zip(add_series(engine, 3), np.eye(3) + 0.1, strict=True):
        queue.enqueue(series_id, 1, [JobRequest("x", "ct-embedding", (), Priority.ROUTINE, ())])
        job = queue.claim("w", 30)
        assert finish(engine, job.id, embedding=vector / np.linalg.norm(vector))
    engine.dispose()
    found = ainode("similar", "--config", str(config), "1.2.3.1", "--top", "1", "--json")
    assert found.returncode == 0, found.stderr
    similar = json.loads(found.stdout)["similar"]
    assert len(similar) == 1 and similar[0]["similarity"] < 1.0
    missing = ainode("similar", "--config", str(config), "4.5.6")
    assert missing.returncode == 2 and "has no embedding" in missing.stderr
