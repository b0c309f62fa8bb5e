"""The layer rules of pyproject.toml's `[tool.importlinter]`: each contract is kept, and each
is broken by the import it forbids (a copy of the code with one such import added)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = {
    contract["id"]: contract
    for contract in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"][
        "contracts"
    ]
}
VIOLATIONS = {
    "flow": ("node/store/leased.py", "import node.work.worker"),
    "pipelines": ("pipelines/volume.py", "import node.config"),
    "sender": ("node/edge/scu.py", "import node.store.catalog"),
}
"""For each contract, a file and an import it may not hold."""


def lint_imports(root: Path, contract: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--contract", contract],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_contract_has_a_violation_to_prove_it() -> None:
    assert set(VIOLATIONS) == set(CONTRACTS)


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_the_code_keeps_the_contract(contract: str) -> None:
    result = lint_imports(REPO, contract)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_the_forbidden_import_breaks_the_contract(contract: str, tmp_path: Path) -> None:
    for part in ("node", "pipelines"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path, line = VIOLATIONS[contract]
    target = tmp_path / path
    target.write_text(f"{target.read_text()}\n{line}\n")
    result = lint_imports(tmp_path, contract)
    assert result.returncode == 1
    assert "BROKEN" in result.stdout and CONTRACTS[contract]["name"][:40] in result.stdout
