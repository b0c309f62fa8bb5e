"""Pipelines by name: the built-in ones, those configured in `pipelines:`, and those sites add
through the `ainode.pipelines` entry point group.

An entry point names a class; it is built as `cls(name, settings)` when it accepts
configuration, else `cls()`. It must have `name`, `version`, `requirements`, `problem()` and
`run(volume, stage)` (see pipelines/base.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from pipelines.base import Pipeline
from pipelines.bundle_segmentation import BundleSegmentationPipeline
from pipelines.classification import CovidTriagePipeline, ThoracicFindingsPipeline
from pipelines.echo import EchoPipeline
from pipelines.embedding import CTEmbeddingPipeline
from pipelines.lung_quant import LungQuantPipeline
from pipelines.nodule_detection import NoduleDetectionPipeline
from pipelines.settings import PipelineSettings

ENTRY_POINT_GROUP = "ainode.pipelines"

Factory = Callable[[str, PipelineSettings], Pipeline]

BUILT_IN: dict[str, Factory] = {
    "echo": lambda name, settings: EchoPipeline(),
    "lung-quant": lambda name, settings: LungQuantPipeline(settings.device),
    "bundle-segmentation": BundleSegmentationPipeline,
    "thoracic-findings": ThoracicFindingsPipeline,
    "covid-triage": CovidTriagePipeline,
    "nodule-detection": NoduleDetectionPipeline,
    "ct-embedding": CTEmbeddingPipeline,
}
NEEDS_CONFIG = {
    "bundle-segmentation",
    "thoracic-findings",
    "covid-triage",
    "nodule-detection",
    "ct-embedding",
}
"""Pipelines with a model: they exist once `pipelines:` configures them."""


def pipeline_types() -> dict[str, Factory]:
    """Every implementation this node has: built in, then entry points."""
    found = dict(BUILT_IN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found[entry.name] = _factory(entry.load())
    return found


def build_pipelines(
    configured: Mapping[str, PipelineSettings] | None = None,
) -> dict[str, Pipeline]:
    """The pipelines jobs can name: every type that needs no configuration, plus each entry of
    `configured` (its `type`, default its own name)."""
    types = pipeline_types()
    pipelines: dict[str, Pipeline] = {
        name: factory(name, PipelineSettings())
        for name, factory in types.items()
        if name not in NEEDS_CONFIG
    }
    for name, settings in (configured or {}).items():
        kind = settings.type or name
        if kind not in types:
            raise ValueError(
                f"pipelines.{name}: unknown pipeline type {kind!r} "
                f"(known: {', '.join(sorted(types))})"
            )
        pipelines[name] = types[kind](name, settings)
    return pipelines


def _factory(cls: type) -> Factory:
    if len(inspect.signature(cls).parameters) >= 2:
        return cls
    return lambda name, settings: cls()
