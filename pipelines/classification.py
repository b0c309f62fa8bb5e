"""Whole-scan classifiers: `thoracic-findings` (multi-label, CT-RATE's 18 findings, the
CIRCLE task) and `covid-triage` (COVID-19 / community-acquired pneumonia / normal, the
COVID-CT-MD task).

The network comes from a MONAI bundle, a TorchScript file, or a state dict with its
architecture in config (e.g. `DenseNet121`, `resnet18`, or a CT-FM `SegResEncoder` with a
linear head: `pipelines.networks.EncoderClassifier`). The scan is cropped to the lungs,
then preprocessed by the bundle or by config, and the network's outputs are matched to the
configured classes in order.
"""

from __future__ import annotations

from typing import Literal

import torch

from pipelines import codes
from pipelines.base import Requirements, StageTimer
from pipelines.context import Context
from pipelines.device import inference_mode
from pipelines.model_pipeline import ModelPipeline
from pipelines.result import Finding, PipelineResult
from pipelines.settings import (
    ClassifierSettings,
    ClassSettings,
    CodeSettings,
    PipelineSettings,
    PreprocessingSettings,
)
from pipelines.volume import Volume

Activation = Literal["sigmoid", "softmax"]


def _classes(*concepts: codes.Code, normal: codes.Code | None = None) -> list[ClassSettings]:
    return [
        ClassSettings(
            code=CodeSettings(value=c.value, scheme=c.scheme, meaning=c.meaning),
            negative=c == normal,
        )
        for c in concepts
    ]


CT_RATE_FINDINGS = _classes(
    codes.MEDICAL_MATERIAL,
    codes.ARTERIAL_WALL_CALCIFICATION,
    codes.CARDIOMEGALY,
    codes.PERICARDIAL_EFFUSION,
    codes.CORONARY_CALCIFICATION,
    codes.HIATAL_HERNIA,
    codes.LYMPHADENOPATHY,
    codes.PULMONARY_EMPHYSEMA,
    codes.ATELECTASIS,
    codes.NODULE,
    codes.ABNORMAL_OPACITY,
    codes.FIBROSIS,
    codes.PLEURAL_EFFUSION,
    codes.MOSAIC_PATTERN,
    codes.PERIBRONCHIAL_THICKENING,
    codes.CONSOLIDATION,
    codes.BRONCHIECTASIS,
    codes.SEPTAL_THICKENING,
)
"""CT-RATE's labels in its own column order (the order its classifiers output them)."""

COVID_CT_MD_CLASSES = _classes(
    codes.COVID_19, codes.COMMUNITY_ACQUIRED_PNEUMONIA, codes.NORMAL, normal=codes.NORMAL
)


class ScanClassifierPipeline(ModelPipeline):
    requirements = Requirements(modalities=("CT",), min_slices=10, min_coverage_mm=100.0)
    activation: Activation = "sigmoid"
    default_classes: list[ClassSettings] = CT_RATE_FINDINGS

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        super().__init__(name, settings)
        configured = settings.classes if isinstance(settings, ClassifierSettings) else None
        self.classes = configured or self.default_classes

    def infer(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        timed = StageTimer(context)
        with timed("model", "load model"):
            model = self.model(device)
        with timed("preprocessing", "preprocess"):
            image = torch.as_tensor(self.preprocess(volume, model, context)["image"])
        with timed("inference"), inference_mode(device):
            logits = first_tensor(model.network(image[None].to(device))).float().cpu().flatten()
        if logits.numel() != len(self.classes):
            raise RuntimeError(
                f"the model gives {logits.numel()} outputs but pipelines.{self.name} names "
                f"{len(self.classes)} classes"
            )
        return PipelineResult(
            self.name, self.version, findings=self.findings(logits), timings=timed.timings
        )

    def findings(self, logits: torch.Tensor) -> list[Finding]:
        if self.activation == "softmax":
            probabilities = torch.softmax(logits, dim=0)
            decided = int(probabilities.argmax())
            present = [index == decided for index in range(len(self.classes))]
        else:
            probabilities = torch.sigmoid(logits)
            present = [
                float(p) >= c.threshold for p, c in zip(probabilities, self.classes, strict=True)
            ]
        return [
            Finding(c.code.code(), round(float(p), 4), flag, c.negative)
            for c, p, flag in zip(self.classes, probabilities, present, strict=True)
        ]


class ThoracicFindingsPipeline(ScanClassifierPipeline):
    """CT-RATE / CIRCLE: 18 findings, each called at its own threshold."""

    default_preprocessing = PreprocessingSettings(
        spacing_mm=(0.75, 0.75, 1.5),
        intensity_range=(-1000.0, 1000.0),
        crop="lungs",
        spatial_size=(480, 480, 240),
    )


class CovidTriagePipeline(ScanClassifierPipeline):
    """COVID-CT-MD: COVID-19, community-acquired pneumonia or normal; the most probable wins."""

    activation = "softmax"
    default_classes = COVID_CT_MD_CLASSES
    default_preprocessing = PreprocessingSettings(
        spacing_mm=(1.5, 1.5, 3.0),
        intensity_range=(-1150.0, 350.0),
        crop="lungs",
        spatial_size=(224, 224, 96),
    )


def first_tensor(output: object) -> torch.Tensor:
    """A network's main output: itself, or the first tensor of a tuple, list or dict."""
    while not isinstance(output, torch.Tensor):
        if isinstance(output, dict):
            output = next(iter(output.values()))
        elif isinstance(output, (list, tuple)):
            output = output[0]
        else:
            raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
    return output
