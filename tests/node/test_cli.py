import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect

from node.store.db.engine import make_engine
from node.store.db.migrate import upgrade
from tests.peers import free_port, storescp

REPO = Path(__file__).resolve().parents[2]


def ainode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.fixture
def storescp_peer(tmp_path: Path) -> Iterator[int]:
    """DCMTK storescp as a remote peer to echo."""
    port = free_port()
    with storescp(port, tmp_path / "received"):
        yield port


def write_config(tmp_path: Path, peer_port: int) -> Path:
    config = tmp_path / "node.yaml"
    config.write_text(
        f"peers:\n  pacs: {{ae_title: PACS, host: 127.0.0.1, port: {peer_port}}}\n"
        f"database: {{url: 'sqlite:///{tmp_path}/db.sqlite'}}\n"
    )
    return config


def test_config_check_accepts_the_example_and_rejects_with_line() -> None:
    ok = ainode("config", "check", str(REPO / "config.example.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout


def test_config_check_reports_file_line_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  port: 70000\n")
    result = ainode("config", "check", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2: node.port:" in result.stderr


def test_echo_a_real_peer_and_a_dead_one(tmp_path: Path, storescp_peer: int) -> None:
    config = write_config(tmp_path, storescp_peer)
    result = ainode("echo", "--config", str(config), "pacs")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status 0x0000" in result.stdout
    dead = write_config(tmp_path, free_port())
    result = ainode("echo", "--config", str(dead), "PACS")
    assert result.returncode == 1
    assert "association" in result.stdout
    unknown = ainode("echo", "--config", str(config), "nobody")
    assert unknown.returncode == 2
    assert "unknown peer" in unknown.stderr


def test_read_commands_never_migrate(tmp_path: Path) -> None:
    config = write_config(tmp_path, 104)
    for command in (("status",), ("jobs", "list"), ("similar", "1.2.3")):
        result = ainode(*command, "--config", str(config))
        assert result.returncode == 2
        assert "no tables yet: `ainode serve` creates them" in result.stderr
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    assert inspect(engine).get_table_names() == []
    engine.dispose()


def test_the_config_comes_from_ainode_config_when_not_given(tmp_path: Path) -> None:
    config = write_config(tmp_path, 104)
    missing = ainode("status", env={"AINODE_CONFIG": ""})
    assert missing.returncode == 2 and "--config" in missing.stderr
    found = ainode("status", env={"AINODE_CONFIG": str(config)})  # the unit sets it
    assert found.returncode == 2 and "no tables yet" in found.stderr  # it read that database
    given = ainode(
        "status", "--config", str(tmp_path / "absent.yaml"), env={"AINODE_CONFIG": str(config)}
    )
    assert given.returncode == 2 and "absent.yaml" in given.stderr  # --config wins


def test_status_json_of_an_empty_node(tmp_path: Path) -> None:
    config = write_config(tmp_path, 104)
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    upgrade(engine)  # as `ainode serve` does at its start
    engine.dispose()
    result = ainode("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    disk = status.pop("disk")
    assert disk["accepting"] is True and disk["min_free_mb"] == 100.0 and disk["free_mb"] > 0
    assert status == {
        "studies": [],
        "series": [],
        "open_associations": [],
        "jobs": [],
        "rules": {"file": None, "error": None, "rules": 0, "modified_at": None},
        "pipelines": [
            {"name": "echo", "version": "1.0", "available": True, "problem": None},
            {"name": "lung-quant", "version": "1.1", "available": True, "problem": None},
        ],
        "dispatches": [],
        "fetches": [],
        "notifications": [],
        "processes": [],
        "remote_workers": [],
        "guards": [],
    }


@pytest.mark.slow  # a real series through the whole pipeline and both encoders, end to end
def test_run_writes_a_result_per_series_and_reports_failures(
    tmp_path: Path, real_series: dict[str, list[Path]]
) -> None:
    import shutil

    inputs = tmp_path / "in"
    for index, path in enumerate(real_series["lung-kernel"]):
        (inputs / "deep" / "folder").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, inputs / "deep" / "folder" / f"x{index}")
    (inputs / "notes.txt").write_text("not DICOM")
    result = ainode(
        "run",
        "lung-quant",
        "--input",
        str(inputs),
        "--output",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "Both lungs: Volume" in result.stdout
    (folder,) = (tmp_path / "out").iterdir()
    written = json.loads((folder / "result.json").read_text())
    assert written["pipeline"] == "lung-quant" and (folder / "masks.npz").is_file()
    assert (folder / "seg.dcm").is_file() and (folder / "sr.dcm").is_file()

    short = tmp_path / "short"
    short.mkdir()
    for path in real_series["lung-kernel"][:5]:
        shutil.copyfile(path, short / path.name)
    refused = ainode("run", "lung-quant", "--input", str(short), "--output", str(tmp_path / "out2"))
    assert refused.returncode == 1
    assert "FAILED: 5 slices; this pipeline needs at least 20" in refused.stdout


MODEL_LIBRARIES = ("torch", "monai", "highdicom", "skimage")


def test_read_commands_import_no_model_library(tmp_path: Path) -> None:
    """`status`, `jobs`, `rules check` and `audit` answer without torch, MONAI, highdicom or
    scikit-image, also when a configured pipeline has a model (its availability is a file
    check)."""
    config = write_config(tmp_path, 104)
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: triage\n    match: {Modality: CT}\n    pipelines: [covid]\n"
    )
    config.write_text(
        config.read_text() + f"routing: {{rules_file: {rules}}}\n"
        "pipelines:\n  covid: {type: covid-triage, model: {path: missing.ts}}\n"
    )
    engine = make_engine(f"sqlite:///{tmp_path}/db.sqlite")
    upgrade(engine)
    engine.dispose()
    commands = [
        ["status", "-c", str(config), "--json"],
        ["jobs", "list", "-c", str(config)],
        ["audit", "list", "-c", str(config)],
        ["rules", "check", str(rules), "-c", str(config)],
    ]
    probe = (
        "import sys\nfrom node.cli import app\n"
        f"for args in {commands!r}:\n"
        "    try:\n        app(args)\n    except SystemExit as exit:\n"
        "        assert not exit.code, (args, exit.code)\n"
        f"print('loaded:', sorted(m for m in {MODEL_LIBRARIES!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    status = json.loads(result.stdout[: result.stdout.index("\n}\n") + 2])
    (covid,) = [p for p in status["pipelines"] if p["name"] == "covid"]
    assert covid["available"] is False
    assert covid["problem"].startswith("model not found at")


def test_a_new_token_prints_its_hash_entry_and_a_bad_role_lists_the_good_ones() -> None:
    import hashlib
    import re

    made = ainode("token", "new", "pacs-web", "--role", "sender", "-r", "reader")
    assert made.returncode == 0, made.stderr
    token = made.stderr.split(": ", 1)[1].strip()
    entry = re.fullmatch(
        r"- \{name: pacs-web, sha256: ([0-9a-f]{64}), roles: \[(.*)\]\}\n", made.stdout
    )
    assert entry is not None, made.stdout
    assert entry[1] == hashlib.sha256(token.encode()).hexdigest()
    assert entry[2] == "sender, reader"

    refused = ainode("token", "new", "bob", "--role", "superuser")
    assert refused.returncode == 2
    assert all(role in refused.stderr for role in ("sender", "reader", "operator", "admin"))


def test_health_says_why_no_tree_serves_and_serve_refuses_a_role_it_cannot_run(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, free_port())
    for roles in ((), ("--role", "worker"), ("--role", "edge", "--role", "coordinator")):
        probe = ainode("health", "--config", str(config), *roles)
        assert probe.returncode == 1
        assert "no process tree with roles" in probe.stderr
    assert ainode("health", "--config", str(config), "--alive").returncode == 1

    unknown = ainode("serve", "--config", str(config), "--role", "scheduler")
    assert unknown.returncode == 2
    assert all(role in unknown.stderr for role in ("edge", "http", "coordinator", "worker"))
    no_http = ainode("serve", "--config", str(config), "--role", "http")
    assert no_http.returncode == 2
    assert "the http role needs an http section" in no_http.stderr
