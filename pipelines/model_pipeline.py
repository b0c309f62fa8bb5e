"""What every pipeline with a model shares: the model's source, loading it once per worker
and device, falling back to the CPU when the GPU runs out of memory, and, for types that
batch, several series in one forward pass."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.bundle import ConfigParser

from pipelines.availability import of_model
from pipelines.base import Requirements, Stage, Unavailable
from pipelines.context import Context, Need, context_for
from pipelines.device import release, run_on, with_cpu_fallback
from pipelines.models import LoadedModel, channels_last, fold_batch_norms
from pipelines.preprocessing import crop_box, preprocessing_for, strip_io, to_meta_tensor
from pipelines.result import PipelineResult
from pipelines.settings import PipelineSettings, PreprocessingSettings
from pipelines.volume import Volume

log = logging.getLogger(__name__)

GPU_BATCH = 4
"""Series per forward pass on a GPU unless `batch_size` says otherwise."""


class ModelPipeline:
    requirements = Requirements(modalities=("CT",), min_slices=3)
    default_preprocessing = PreprocessingSettings()
    check = staticmethod(of_model)
    """Its version and availability from its settings (what `ainode status` reports)."""
    batched = False
    """Whether `infer_batch` puts several series through the network at once."""
    runs_channels_last = True
    """Whether the network runs channels-last on the CPU (`pipelines.models.channels_last`)."""

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        self.name = name
        self.settings = settings
        self.source = settings.model_source()
        self.version = self.check(name, settings).version
        self.preprocessing_settings = settings.preprocessing or self.default_preprocessing
        self.needs = self.needs_for(self.preprocessing_settings)
        self._loaded: dict[str, LoadedModel] = {}
        self._gpu_batch = GPU_BATCH

    def problem(self) -> str | None:
        return self.check(self.name, self.settings).problem

    def needs_for(self, preprocessing: PreprocessingSettings) -> frozenset[Need]:
        """The lungs when the input is cropped to them."""
        return frozenset({Need.LUNGS}) if preprocessing.crop == "lungs" else frozenset()

    def prepare(self, parser: ConfigParser) -> None:
        """Adjust a bundle's config before its network is built."""
        strip_io(parser)

    def model(self, device: torch.device) -> LoadedModel:
        """The network on `device`, loaded once per worker process."""
        if str(device) not in self._loaded:
            problem = self.problem()
            if problem or self.source is None:
                raise Unavailable(problem or "no model")
            loaded = self.source.load(device, self.prepare)
            fold_batch_norms(loaded.network)
            if device.type == "cpu" and self.runs_channels_last:
                channels_last(loaded.network)
            self._loaded[str(device)] = loaded
        return self._loaded[str(device)]

    def preprocess(self, volume: Volume, model: LoadedModel, context: Context) -> dict[str, Any]:
        """`{"image": ...}`: the volume, cropped as configured, through the bundle's
        preprocessing or the configured one."""
        settings = self.preprocessing_settings
        transform = preprocessing_for(model.bundle, settings)
        box = crop_box(volume, settings, context)
        return transform({"image": to_meta_tensor(volume, box)})

    def run(self, volume: Volume, context: Context | Stage | None = None) -> PipelineResult:
        job = context_for(self, context)
        return run_on(
            self.settings.device, self.name, lambda device: self.infer(volume, device, job)
        )

    def infer(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        raise NotImplementedError

    def batch_limit(self) -> int:
        """How many waiting series to take at once: `batch_size`, else what fits the GPU
        (`GPU_BATCH` until it ran out of memory), and 1 on the CPU or without batching."""
        if not self.batched:
            return 1
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        if self.settings.device == "cpu" or not torch.cuda.is_available():
            return 1
        return self._gpu_batch

    def run_batch(
        self, volumes: list[Volume], context: Context | Stage | None = None
    ) -> list[PipelineResult]:
        """Each volume's result, the volumes through the network together. When the GPU runs
        out of memory the batch is halved (and so is what this worker takes from then on);
        a single series then runs on the CPU, as `run` does."""
        return run_on(
            self.settings.device,
            self.name,
            lambda device: self._halving(volumes, device, context_for(self, context)),
        )

    def _halving(
        self, volumes: list[Volume], device: torch.device, context: Context
    ) -> list[PipelineResult]:
        if len(volumes) == 1:
            return with_cpu_fallback(
                device, self.name, lambda on: self.infer_batch(volumes, on, context)
            )
        try:
            return self.infer_batch(volumes, device, context)
        except torch.cuda.OutOfMemoryError:
            release(device)
            half = len(volumes) // 2
            self._gpu_batch = min(self._gpu_batch, half)
            log.warning(
                "%s: GPU out of memory with %d series at once; %d from now on",
                self.name,
                len(volumes),
                self._gpu_batch,
            )
            first = self._halving(volumes[:half], device, context)
            return first + self._halving(volumes[half:], device, context)

    def infer_batch(
        self, volumes: list[Volume], device: torch.device, context: Context
    ) -> list[PipelineResult]:
        return [self.infer(volume, device, context) for volume in volumes]
