"""`ainode models list` / `ainode models verify`: every configured model, where it comes
from, its SHA-256, the device it would run on, and whether it loads."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel

from pipelines.base import Pipeline, Unavailable
from pipelines.device import resolve_device
from pipelines.model_pipeline import ModelPipeline
from pipelines.settings import PipelineSettings


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


def model_reports(
    pipelines: Mapping[str, Pipeline],
    configured: Mapping[str, PipelineSettings],
    verify: bool,
) -> list[ModelReport]:
    """A report per configured pipeline that takes a model; with `verify`, each model is
    hashed and loaded onto its device (a failure is reported, never raised)."""
    reports = []
    for name, settings in sorted(configured.items()):
        pipeline = pipelines[name]
        source = pipeline.source if isinstance(pipeline, ModelPipeline) else None
        if source is None and settings.model is None:
            continue
        problem: str | None
        try:
            device = str(resolve_device(settings.device))
        except RuntimeError as exc:
            device, problem = settings.device, str(exc)
        else:
            problem = pipeline.problem()
        report = ModelReport(
            pipeline=name,
            type=settings.type or name,
            source=source.kind if source else None,
            path=str(source.path) if source else None,
            sha256_configured=settings.model.sha256 if settings.model else None,
            device=device,
            problem=problem,
        )
        if verify and isinstance(pipeline, ModelPipeline) and problem is None:
            _verify(report, pipeline)
        reports.append(report)
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
