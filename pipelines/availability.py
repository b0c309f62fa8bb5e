"""Whether a configured pipeline can run here, and its version, from its settings alone.

Nothing here imports torch: `ainode status` and the HTTP server report every pipeline in
milliseconds. The built-in pipelines take their `version` and `problem()` from here, so what
a worker runs and what the status page says agree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipelines.settings import PipelineSettings, ProbeSettings, SegmentationSettings


@dataclass(frozen=True)
class Availability:
    version: str
    problem: str | None = None
    """Why the pipeline cannot run here (e.g. its weights are missing), else None."""


ECHO = Availability("1.0")
LUNG_QUANT = Availability("1.1")
"""1.1: the lungs hold the disease they enclose or abut (pleural reconstruction), the airway is
a segment of its own, high attenuation is looked for in the aerated lung, bowel gas is cut off.
A new version on every change to the lungs: the lungs kept for a series are keyed by it."""


def of_model(name: str, settings: PipelineSettings) -> Availability:
    """A pipeline with a model: the model is where the config says (the file checks only,
    no hashing or loading); its version is the bundle's, else 1.0."""
    source = settings.model_source()
    if source is None:
        return Availability("1.0", f"no model configured (pipelines.{name}.model.path)")
    version = str(source.metadata().get("version") or "1.0")
    return Availability(version, source.problem())


def of_segmentation(name: str, settings: PipelineSettings) -> Availability:
    """`of_model`, and a label table to name what the model segments."""
    found = of_model(name, settings)
    labels = settings.labels if isinstance(settings, SegmentationSettings) else {}
    if found.problem is None and not labels:
        return Availability(found.version, f"no label table configured (pipelines.{name}.labels)")
    return found


def of_probe(name: str, settings: PipelineSettings) -> Availability:
    """The embedding model is there and the probe file is one fitted on it; the version
    names the model and the probe file's hash."""
    from pipelines.probe import ProbeError, read_probe  # numpy: only where a probe is set

    found = of_model(name, settings)
    if not isinstance(settings, ProbeSettings) or settings.probe is None:
        return Availability(found.version, f"no probe file configured (pipelines.{name}.probe)")
    try:
        probe, digest = read_probe(settings.probe)
    except ProbeError as exc:
        return Availability(found.version, str(exc))
    version = f"{found.version[:40]}+probe-{digest}"
    if found.problem is None and probe.model_version != found.version:
        return Availability(
            version,
            f"the probe was fitted on {probe.model_version} embeddings; "
            f"this pipeline computes {found.version}",
        )
    return Availability(version, found.problem)


Check = Callable[[str, PipelineSettings], Availability]

CHECKS: dict[str, Check] = {
    "echo": lambda name, settings: ECHO,
    "lung-quant": lambda name, settings: LUNG_QUANT,
    "bundle-segmentation": of_segmentation,
    "thoracic-findings": of_model,
    "covid-triage": of_model,
    "nodule-detection": of_model,
    "ct-embedding": of_model,
    "embedding-probe": of_probe,
}
"""Built-in type -> its check. A type added by an entry point is built to be asked."""
