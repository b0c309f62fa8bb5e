"""What every pipeline is: a name, a version, and `run(series) -> result`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class BadInput(Exception):
    """The series cannot be processed by this pipeline; retrying will not help."""


@dataclass(frozen=True)
class SeriesInput:
    """A complete series revision as stored by the node."""

    series_instance_uid: str
    revision: int
    files: tuple[Path, ...]


class Pipeline(Protocol):
    name: str
    version: str

    def run(self, series: SeriesInput) -> dict[str, object]:
        """Process the series; raise BadInput for input it cannot handle."""
        ...
