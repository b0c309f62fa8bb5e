"""What every pipeline with a model shares: the model's source, loading it once per worker
and device, and falling back to the CPU when the GPU runs out of memory."""

from __future__ import annotations

from typing import Any

import torch
from monai.bundle import ConfigParser

from pipelines.availability import of_model
from pipelines.base import Requirements, Stage, Unavailable
from pipelines.device import run_on
from pipelines.models import LoadedModel
from pipelines.preprocessing import crop_box, preprocessing_for, strip_io, to_meta_tensor
from pipelines.result import PipelineResult
from pipelines.settings import PipelineSettings, PreprocessingSettings
from pipelines.volume import Volume


class ModelPipeline:
    requirements = Requirements(modalities=("CT",), min_slices=3)
    default_preprocessing = PreprocessingSettings()
    check = staticmethod(of_model)
    """Its version and availability from its settings (what `ainode status` reports)."""

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        self.name = name
        self.settings = settings
        self.source = settings.model_source()
        self.version = self.check(name, settings).version
        self.preprocessing_settings = settings.preprocessing or self.default_preprocessing
        self._loaded: dict[str, LoadedModel] = {}

    def problem(self) -> str | None:
        return self.check(self.name, self.settings).problem

    def prepare(self, parser: ConfigParser) -> None:
        """Adjust a bundle's config before its network is built."""
        strip_io(parser)

    def model(self, device: torch.device) -> LoadedModel:
        """The network on `device`, loaded once per worker process."""
        if str(device) not in self._loaded:
            problem = self.problem()
            if problem or self.source is None:
                raise Unavailable(problem or "no model")
            self._loaded[str(device)] = self.source.load(device, self.prepare)
        return self._loaded[str(device)]

    def preprocess(self, volume: Volume, model: LoadedModel) -> dict[str, Any]:
        """`{"image": ...}`: the volume, cropped as configured, through the bundle's
        preprocessing or the configured one."""
        settings = self.preprocessing_settings
        transform = preprocessing_for(model.bundle, settings)
        return transform({"image": to_meta_tensor(volume, crop_box(volume, settings))})

    def run(self, volume: Volume, stage: Stage | None = None) -> PipelineResult:
        return run_on(
            self.settings.device,
            self.name,
            lambda device: self.infer(volume, device, stage or (lambda _: None)),
        )

    def infer(self, volume: Volume, device: torch.device, stage: Stage) -> PipelineResult:
        raise NotImplementedError
