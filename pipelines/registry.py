"""Pipelines by name: the built-in ones, those configured in `pipelines:`, and those sites add
through the `ainode.pipelines` entry point group.

Implementations are imported only when a pipeline is built (in a worker, or `ainode run`):
naming the pipelines a node has, which routing needs, imports no torch.

An entry point names a class; it is built as `cls(name, settings)` when it accepts
configuration, else `cls()`. It must have `name`, `version`, `requirements`, `problem()` and
`run(volume, context)` (see pipelines/base.py and pipelines/context.py); it may declare `needs`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from pipelines.availability import CHECKS, Availability
from pipelines.base import Pipeline
from pipelines.settings import PipelineSettings

ENTRY_POINT_GROUP = "ainode.pipelines"

Factory = Callable[[str, PipelineSettings], Pipeline]

BUILT_IN = {
    "echo": "pipelines.echo:EchoPipeline",
    "lung-quant": "pipelines.lung_quant:LungQuantPipeline.configured",
    "bundle-segmentation": "pipelines.bundle_segmentation:BundleSegmentationPipeline",
    "thoracic-findings": "pipelines.classification:ThoracicFindingsPipeline",
    "covid-triage": "pipelines.classification:CovidTriagePipeline",
    "nodule-detection": "pipelines.nodule_detection:NoduleDetectionPipeline",
    "ct-embedding": "pipelines.embedding:CTEmbeddingPipeline",
    "embedding-probe": "pipelines.embedding:EmbeddingProbePipeline",
}
"""Type name -> `module:attribute` of the implementation (a class, or a factory taking the
pipeline's name and settings)."""
NEEDS_CONFIG = {
    "bundle-segmentation",
    "thoracic-findings",
    "covid-triage",
    "nodule-detection",
    "ct-embedding",
    "embedding-probe",
}
"""Pipelines with a model: they exist once `pipelines:` configures them."""


def type_names() -> set[str]:
    """Every pipeline type this node has, built in or added by an entry point."""
    return set(BUILT_IN) | {entry.name for entry in entry_points(group=ENTRY_POINT_GROUP)}


def pipeline_names(configured: Mapping[str, PipelineSettings] | None = None) -> set[str]:
    """The names jobs can use, as `build_pipelines` would build them; raises ValueError for a
    configured pipeline of an unknown type."""
    types = type_names()
    for name, settings in (configured or {}).items():
        _check_type(name, settings.type or name, types)
    return {name for name in types if name not in NEEDS_CONFIG} | set(configured or {})


def build_pipelines(
    configured: Mapping[str, PipelineSettings] | None = None,
) -> dict[str, Pipeline]:
    """The pipelines jobs can name: every type that needs no configuration, plus each entry of
    `configured` (its `type`, default its own name)."""
    types = type_names()
    pipelines: dict[str, Pipeline] = {
        name: _factory(name)(name, PipelineSettings())
        for name in sorted(types)
        if name not in NEEDS_CONFIG
    }
    for name, settings in (configured or {}).items():
        kind = settings.type or name
        _check_type(name, kind, types)
        pipelines[name] = _factory(kind)(name, settings)
    return pipelines


def availability(
    configured: Mapping[str, PipelineSettings] | None = None,
) -> dict[str, Availability]:
    """Each pipeline `build_pipelines` would build, with its version and why it cannot run.
    Built-in types are checked from their settings, without importing torch; a type added by
    an entry point is built to be asked."""
    configured = configured or {}
    found: dict[str, Availability] = {}
    for name in sorted(pipeline_names(configured)):
        settings = configured.get(name, PipelineSettings())
        kind = settings.type or name
        if kind in CHECKS:
            found[name] = CHECKS[kind](name, settings)
        else:
            pipeline = _factory(kind)(name, settings)
            found[name] = Availability(pipeline.version, pipeline.problem())
    return found


def _check_type(name: str, kind: str, types: set[str]) -> None:
    if kind not in types:
        raise ValueError(
            f"pipelines.{name}: unknown pipeline type {kind!r} (known: {', '.join(sorted(types))})"
        )


def _factory(kind: str) -> Factory:
    implementation = _load(kind)
    if len(inspect.signature(implementation).parameters) >= 2:
        return implementation
    return lambda name, settings: implementation()


def _load(kind: str) -> Callable[..., Pipeline]:
    if kind not in BUILT_IN:
        (entry,) = entry_points(group=ENTRY_POINT_GROUP, name=kind)
        loaded: Callable[..., Pipeline] = entry.load()
        return loaded
    module, _, path = BUILT_IN[kind].partition(":")
    found: object = importlib.import_module(module)
    for attribute in path.split("."):
        found = getattr(found, attribute)
    if not callable(found):
        raise TypeError(f"{BUILT_IN[kind]} is not callable")
    return found
