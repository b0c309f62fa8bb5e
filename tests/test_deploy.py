"""`deploy/install.sh --system --root DIR`: what a production install lays out, on a
temporary root: folders and modes, a config whose data live under /var/lib/ainode and that
loads, the rules, the unit; run again, it keeps the config an administrator changed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


def test_systemd_finds_the_installed_unit_sound_and_confined(tmp_path: Path) -> None:
    """`systemd-analyze verify` has nothing to say of the unit (its command stood in for by an
    executable of the temporary root), and `systemd-analyze security` rates it 2.0 or less
    (0 is fully confined, 10 not at all)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    root = tmp_path / "root"
    assert install(root).returncode == 0
    unit = (root / "etc/systemd/system/ainode.service").read_text()
    command = re.search(r"^ExecStart=(\S+)", unit, re.MULTILINE)
    assert command is not None
    stand_in = root / command.group(1).lstrip("/")
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    checked = tmp_path / "ainode.service"
    checked.write_text(unit.replace(command.group(1), str(stand_in)))
    verified = subprocess.run([analyze, "verify", str(checked)], capture_output=True, text=True)
    assert verified.returncode == 0 and verified.stdout + verified.stderr == ""
    rated = subprocess.run(
        [analyze, "security", "--offline=yes", str(checked)], capture_output=True, text=True
    )
    exposure = re.search(r"Overall exposure level for ainode.service: ([0-9.]+)", rated.stdout)
    assert exposure is not None, rated.stdout[-500:] + rated.stderr[-500:]
    assert float(exposure.group(1)) <= 2.0
