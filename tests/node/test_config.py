import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, Peer, load_settings
from pipelines.settings import ClassifierSettings, SegmentationSettings

REPO = Path(__file__).resolve().parents[2]


def test_example_config_loads_with_paths_under_var() -> None:
    settings = load_settings(REPO / "config.example.yaml", environ={})
    assert settings.node.ae_title == "AINODE"
    assert settings.storage.path == REPO / "var" / "storage"
    assert settings.database.url == f"sqlite:///{REPO / 'var' / 'ainode.db'}"
    assert settings.completion.quiet_seconds == 10
    assert {p.ae_title for p in settings.peers.values()} >= {"ORTHANC"}


def test_errors_name_file_key_path_and_line(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "node:\n"
        "  ae_title: AINODE\n"
        "  port: eleven\n"
        "  colour: blue\n"
        "peers:\n"
        "  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 99999}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    lines = str(caught.value).splitlines()
    assert f"{config}:3: node.port: Input should be a valid integer" in "\n".join(lines)
    assert any(line.startswith(f"{config}:4: node.colour: Extra inputs") for line in lines)
    assert any(line.startswith(f"{config}:6: peers.pacs.port:") for line in lines)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(broken, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node: {accept_unknown_peers: true}\n")
    settings = load_settings(
        config,
        environ={
            "AINODE_NODE__PORT": "11113",
            "AINODE_COMPLETION__QUIET_SECONDS": "2.5",
            "AINODE_DATABASE__URL": "postgresql+psycopg://u@db/ainode",
            "UNRELATED": "x",
        },
    )
    assert settings.node.port == 11113
    assert settings.completion.quiet_seconds == 2.5
    assert settings.database.url == "postgresql+psycopg://u@db/ainode"


def test_bad_environment_value_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node: {accept_unknown_peers: true}\n")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_settings(config, environ={"AINODE_NODE__PORT": "not-a-port"})


def test_no_peers_and_no_unknown_peers_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node: {ae_title: AINODE}\n")
    with pytest.raises(ConfigError, match="no one could send"):
        load_settings(config, environ={})


def test_ae_title_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE', accept_unknown_peers: true}\n")
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings(config, environ={})


def test_each_pipeline_type_takes_its_own_settings(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(
        "node: {accept_unknown_peers: true}\n"
        "pipelines:\n"
        "  covid-triage:\n"
        "    classes: [{code: {value: '17621005', meaning: Normal}, negative: true}]\n"
        "  lobes:\n"
        "    type: bundle-segmentation\n"
        "    labels: {1: {name: Lobe, type: {value: '44714003', meaning: Left upper lobe}}}\n"
    )
    settings = load_settings(config, environ={})
    triage, lobes = settings.pipelines["covid-triage"], settings.pipelines["lobes"]
    assert isinstance(triage, ClassifierSettings) and triage.type == "covid-triage"
    assert triage.classes is not None and triage.classes[0].negative
    assert isinstance(lobes, SegmentationSettings) and lobes.labels[1].name == "Lobe"
    config.write_text(
        "node: {accept_unknown_peers: true}\n"
        "pipelines:\n"
        "  lung-quant:\n"
        "    device: cpu\n"
        "    labels: {1: {name: Lung, type: {value: '39607008', meaning: Lung}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={})
    assert f"{config}:5: pipelines.lung-quant.labels: Extra inputs are not permitted" in str(
        caught.value
    )


def test_the_example_sends_the_sender_its_sr_seg_and_key_images() -> None:
    """The README's quick start: results go back to `origin`, storescu's STORESCU, key images
    included."""
    settings = load_settings(REPO / "config.example.yaml", environ={})
    origin = settings.destination("origin", "STORESCU")
    assert isinstance(origin, Peer) and origin.key_images and origin.port == 11113
    assert settings.doubts() == []


def test_a_dicomweb_sender_whose_results_cannot_go_back_is_doubted(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    token = {"name": "modality-web", "sha256": "0" * 64, "roles": ["sender"]}
    settings = {
        "node": {"accept_unknown_peers": True},
        "http": {"auth": {"tokens": [token, {**token, "name": "viewer", "roles": ["reader"]}]}},
    }
    config.write_text(yaml.safe_dump(settings))
    checked = subprocess.run(
        [sys.executable, "-m", "node", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr  # a warning, not an error: it may only store
    (warning,) = checked.stderr.splitlines()
    assert "'modality-web' may send (STOW-RS) but dicomweb has no 'modality-web'" in warning
    settings["dicomweb"] = {"modality-web": {"url": "https://modality.example/dicom-web"}}
    config.write_text(yaml.safe_dump(settings))
    assert load_settings(config, environ={}).doubts() == []
