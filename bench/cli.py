"""Read-only commands on an idle node: a node from config.example.yaml (SQLite, the example
rules) runs in a temporary folder; each command runs --runs times and the median wall time
is printed beside the floors measured in the same run: the interpreter, the CLI's libraries,
SQLAlchemy (what a command reading the database itself pays; while the node runs, `status`,
`jobs list` and `audit list` ask it over its admin socket instead) and reading the config.

    python bench/cli.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.peers import wait_until  # noqa: E402

CONFIG = ("--config", "config.example.yaml")
COMMANDS = [
    ("--help",),
    ("config", "check", "config.example.yaml"),
    ("rules", "check", "rules.example.yaml", *CONFIG),
    ("health", *CONFIG),
    ("models", "list", *CONFIG),
    ("jobs", "list", *CONFIG),
    ("audit", "list", *CONFIG),
    ("status", *CONFIG),
]
FLOORS = {
    "python -c pass": "pass",
    "import typer, pydantic": "import typer, pydantic",
    "import sqlalchemy.orm": "import sqlalchemy.orm",
    "read the config": "import node.config as c; c.load_settings('config.example.yaml')",
}


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
"""As a user's shell has it: Python caches the compiled modules (with the variable set, every
command compiles the node's modules again: 50-80 ms on this VM)."""


def median_seconds(command: list[str], runs: int, cwd: Path) -> float:
    """After one run that writes the bytecode caches; a command that fails stops the bench."""
    subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=60, env=ENV)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=60, env=ENV)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def idle_node(home: Path) -> subprocess.Popen[bytes]:
    """The example config's node, started in `home` and serving."""
    for name in ("config.example.yaml", "rules.example.yaml"):
        shutil.copy(REPO / name, home / name)
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", "config.example.yaml"],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _healthy(home), timeout=90)
    except BaseException:  # a node that never serves is not left running
        node.terminate()
        node.wait(timeout=60)
        raise
    return node


def _healthy(home: Path) -> bool:
    probe = [sys.executable, "-m", "node", "health", "--config", "config.example.yaml"]
    return subprocess.run(probe, cwd=home, capture_output=True, check=False).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    ainode = str(Path(sys.executable).with_name("ainode"))
    with tempfile.TemporaryDirectory(prefix="ainode-cli-bench-") as folder:
        home = Path(folder)
        node = idle_node(home)
        try:
            print(f"read-only commands on an idle node, median of {runs} runs (wall seconds)")
            for name, code in FLOORS.items():
                seconds = median_seconds([sys.executable, "-c", code], runs, home)
                print(f"  {seconds:6.2f}  floor: {name}")
            for args in COMMANDS:
                seconds = median_seconds([ainode, *args], runs, home)
                print(f"  {seconds:6.2f}  ainode {' '.join(args)}")
        finally:
            node.terminate()
            node.wait(timeout=60)


if __name__ == "__main__":
    main()
