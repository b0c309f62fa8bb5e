"""`ainode models list` / `ainode models verify`: every configured model, where it comes
from, its SHA-256, the device, and whether it loads. Listing reads the settings and checks the
files (no torch); verifying hashes and loads each model on the device it resolves to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import BaseModel

from pipelines.base import Pipeline, Unavailable
from pipelines.registry import availability
from pipelines.settings import PipelineSettings

if TYPE_CHECKING:
    from pipelines.model_pipeline import ModelPipeline


class ModelReport(BaseModel):
    """One line of `ainode models list|verify` (JSON: a `models` list of these)."""

    pipeline: str
    type: str
    source: str | None
    path: str | None
    sha256_configured: str | None
    sha256: str | None = None
    device: str
    loads: bool | None = None
    problem: str | None


def model_reports(configured: Mapping[str, PipelineSettings]) -> list[ModelReport]:
    """A report per configured pipeline that takes a model, from its settings alone: where
    the model is, the device asked for, and why it cannot run (files checked, not loaded).
    Imports no torch."""
    available = availability(configured)
    reports = []
    for name, settings in sorted(configured.items()):
        source = settings.model_source()
        if source is None:
            continue
        reports.append(
            ModelReport(
                pipeline=name,
                type=settings.type or name,
                source=source.kind,
                path=str(source.path),
                sha256_configured=settings.model.sha256 if settings.model else None,
                device=settings.device,
                problem=available[name].problem,
            )
        )
    return reports


def verified(
    reports: list[ModelReport],
    configured: Mapping[str, PipelineSettings],
    pipelines: Mapping[str, Pipeline],
) -> list[ModelReport]:
    """The reports with each model hashed and loaded onto the device it resolves to (a
    failure is reported, never raised)."""
    from pipelines.device import resolve_device
    from pipelines.model_pipeline import ModelPipeline

    for report in reports:
        try:
            report.device = str(resolve_device(configured[report.pipeline].device))
        except RuntimeError as exc:
            report.problem = report.problem or str(exc)
        pipeline = pipelines[report.pipeline]
        if report.problem is None and isinstance(pipeline, ModelPipeline):
            _verify(report, pipeline)
    return reports


def _verify(report: ModelReport, pipeline: ModelPipeline) -> None:
    import torch

    assert pipeline.source is not None
    report.sha256 = pipeline.source.digest()
    try:
        pipeline.model(torch.device(report.device))
    except Unavailable as exc:
        report.loads, report.problem = False, str(exc)
    else:
        report.loads = True


def render_models(reports: list[ModelReport]) -> str:
    if not reports:
        return "no models configured (pipelines.<name>.model)"
    lines = []
    for r in reports:
        state = "ok" if r.problem is None else f"UNAVAILABLE: {r.problem}"
        if r.loads:
            state = "loads"
        lines.append(f"{r.pipeline} ({r.type}): {state}")
        lines.append(f"  {r.source or '-'} at {r.path or '-'} on {r.device}")
        if r.sha256 or r.sha256_configured:
            lines.append(f"  sha256 {r.sha256 or r.sha256_configured}")
    return "\n".join(lines)
