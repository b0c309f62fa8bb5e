"""Read-only commands on an idle node: a node from config.example.yaml (SQLite, the example
rules) runs in a temporary folder; each command runs --runs times and the median wall time
is printed beside the floors every command pays (the interpreter, and the libraries a
command that reads the database cannot do without), measured in the same run.

    python bench/cli.py [--runs 7]
"""

from __future__ import annotations

import argparse
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

COMMANDS = [
    ("--help",),
    ("config", "check"),
    ("rules", "check"),
    ("health",),
    ("models", "list"),
    ("jobs", "list"),
    ("audit", "list"),
    ("status",),
]
FLOORS = {
    "python -c pass": "pass",
    "import typer, pydantic": "import typer, pydantic",
    "import sqlalchemy.orm": "import sqlalchemy.orm",
}


def median_seconds(command: list[str], runs: int, cwd: Path) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=False, capture_output=True, timeout=60)
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
                config = () if args == ("--help",) else ("--config", "config.example.yaml")
                seconds = median_seconds([ainode, *args, *config], runs, home)
                print(f"  {seconds:6.2f}  ainode {' '.join(args)}")
        finally:
            node.terminate()
            node.wait(timeout=60)


if __name__ == "__main__":
    main()
