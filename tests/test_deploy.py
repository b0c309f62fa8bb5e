"""`deploy/install.sh --system --root DIR`: what a production install lays out, on a
temporary root: folders and modes, a config whose data live under /var/lib/ainode and that
loads, the rules, the unit; run again, it keeps the config an administrator changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from node.config import load_settings

REPO = Path(__file__).resolve().parents[1]


def install(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "install.sh"), "--system", "--root", str(root)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_the_system_install_lays_out_config_data_and_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = install(root)
    assert done.returncode == 0, done.stderr
    modes = {
        "etc/ainode": 0o750,
        "etc/ainode/config.yaml": 0o640,
        "etc/ainode/rules.yaml": 0o640,
        "var/lib/ainode": 0o750,
        "var/lib/ainode/storage": 0o750,
        "var/lib/ainode/models": 0o750,
        "etc/systemd/system/ainode.service": 0o644,
    }
    assert {path: (root / path).stat().st_mode & 0o777 for path in modes} == modes
    unit = (root / "etc/systemd/system/ainode.service").read_text()
    assert unit == (REPO / "deploy" / "ainode.service").read_text()
    config = root / "etc/ainode/config.yaml"
    settings = load_settings(config, environ={})
    assert settings.storage.path == Path("/var/lib/ainode/storage")
    assert settings.database.url == "sqlite:////var/lib/ainode/ainode.db"
    assert settings.routing.rules_file == root / "etc/ainode/rules.yaml"
    assert "config" in done.stdout and "unit" in done.stdout  # it says what it did

    config.write_text(config.read_text() + "# changed by the administrator\n")
    again = install(root)
    assert again.returncode == 0, again.stderr
    assert config.read_text().endswith("# changed by the administrator\n")
    assert "kept as it is" in again.stdout
