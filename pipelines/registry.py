"""Pipelines by name: the built-in ones and those sites add through the
`ainode.pipelines` entry point group (a class with `name`, `version` and `run`)."""

from __future__ import annotations

from importlib.metadata import entry_points

from pipelines.base import Pipeline
from pipelines.echo import EchoPipeline

ENTRY_POINT_GROUP = "ainode.pipelines"


def available_pipelines() -> dict[str, Pipeline]:
    found: dict[str, Pipeline] = {EchoPipeline.name: EchoPipeline()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        pipeline = entry.load()()
        found[pipeline.name] = pipeline
    return found
