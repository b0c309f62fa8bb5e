"""`bundle-segmentation`: any MONAI segmentation model, its labels named by a table in config.

The bundle's own `preprocessing`, `inferer` and `postprocessing` are used (its file loading
and saving transforms are dropped: the node hands it the volume in memory, with its
affine); a bare TorchScript file gets its preprocessing from config. The label map is
inverted back onto the series' own grid, so masks line up with the source slices.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import (
    Compose,
    EnsureTyped,
    Invertd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from pipelines import codes
from pipelines.base import Requirements, Stage, Unavailable
from pipelines.device import inference_mode, release, resolve_device
from pipelines.models import LoadedModel, ModelSource
from pipelines.result import Mask, Measurement, PipelineResult, Region, Segment
from pipelines.settings import PipelineSettings, PreprocessingSettings
from pipelines.volume import Volume

log = logging.getLogger(__name__)

IO_TRANSFORMS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")
SAVE_TRANSFORMS = ("SaveImage", "SaveImaged")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class BundleSegmentationPipeline:
    requirements = Requirements(modalities=("CT",), min_slices=3)

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        self.name = name
        self.settings = settings
        self.source = (
            ModelSource(settings.model.path, settings.model.sha256) if settings.model else None
        )
        version = self.source.metadata().get("version") if self.source else None
        self.version = str(version or "1.0")
        self.segments = {
            value: Segment(
                label.name,
                label.category.code(),
                label.type.code(),
                None,
                label.color,
            )
            for value, label in sorted(settings.labels.items())
        }
        self._loaded: dict[str, LoadedModel] = {}

    def problem(self) -> str | None:
        if self.source is None:
            return f"no model configured (pipelines.{self.name}.model.path)"
        problem = self.source.problem()
        if problem is None and not self.segments:
            problem = f"no label table configured (pipelines.{self.name}.labels)"
        return problem

    def run(self, volume: Volume, stage: Stage | None = None) -> PipelineResult:
        stage = stage or (lambda _: None)
        device = resolve_device(self.settings.device)
        try:
            return self._run(volume, device, stage)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s: GPU out of memory; running this series on the CPU", self.name)
            release(device)
            return self._run(volume, torch.device("cpu"), stage)
        finally:
            release(device)

    def model(self, device: torch.device) -> LoadedModel:
        """The network on `device`, loaded once per worker process."""
        if str(device) not in self._loaded:
            problem = self.problem()
            if problem or self.source is None:
                raise Unavailable(problem or "no model")
            self._loaded[str(device)] = self.source.load(device)
        return self._loaded[str(device)]

    def _run(self, volume: Volume, device: torch.device, stage: Stage) -> PipelineResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        stage("load model")
        model = self.model(device)
        preprocessing, inferer, postprocessing = self._transforms(model)
        timings["model"] = time.perf_counter() - clock
        clock = time.perf_counter()
        stage("preprocess")
        data = preprocessing({"image": to_meta_tensor(volume)})
        timings["preprocessing"] = time.perf_counter() - clock
        clock = time.perf_counter()
        stage("inference")
        with inference_mode(device):
            prediction = inferer(data["image"][None].to(device), model.network)[0]
        timings["inference"] = time.perf_counter() - clock
        clock = time.perf_counter()
        stage("postprocess")
        data["pred"] = prediction.float().cpu()
        data["image"] = data["image"].cpu()
        if postprocessing is not None:
            data = postprocessing(data)
        labels = _label_map(data["pred"], activated=postprocessing is not None)
        if not _has_inverse(model):
            data["pred"] = labels
            data = Invertd("pred", preprocessing, "image", nearest_interp=True)(data)
            labels = data["pred"]
        label_volume = np.asarray(labels)[0].transpose(2, 1, 0).round().astype(np.int32)
        if label_volume.shape != volume.voxels.shape:
            raise RuntimeError(
                f"the model's output {label_volume.shape} does not map back onto the series "
                f"grid {volume.voxels.shape}"
            )
        result = self._result(label_volume, volume)
        timings["postprocessing"] = time.perf_counter() - clock
        result.timings = timings
        return result

    def _transforms(self, model: LoadedModel) -> tuple[Compose, Inferer, Compose | None]:
        parser = model.bundle
        if parser is None or "preprocessing" not in parser.get():
            return _configured(self.settings.preprocessing or PreprocessingSettings())
        config = parser.get()
        config["preprocessing"]["transforms"] = _without(
            config["preprocessing"]["transforms"], IO_TRANSFORMS
        )
        parser.ref_resolver.reset()  # forget what was parsed before the edit
        preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        inferer = (
            parser.get_parsed_content("inferer", instantiate=True)
            if "inferer" in config
            else _configured(self.settings.preprocessing or PreprocessingSettings())[1]
        )
        postprocessing = None
        if "postprocessing" in config:
            config["postprocessing"]["transforms"] = _without(
                config["postprocessing"]["transforms"], SAVE_TRANSFORMS
            )
            postprocessing = parser.get_parsed_content("postprocessing", instantiate=True)
        return preprocessing, inferer, postprocessing

    def _result(self, labels: np.ndarray, volume: Volume) -> PipelineResult:
        masks, regions = [], []
        for value, segment in self.segments.items():
            mask = labels == value
            masks.append(Mask(segment, mask))
            volume_ml = round(float(mask.sum()) * volume.voxel_volume_ml, 2)
            regions.append(
                Region(
                    segment.label,
                    segment.type,
                    (Measurement(codes.VOLUME, volume_ml, codes.MILLILITER),),
                    segment.label,
                )
            )
        return PipelineResult(self.name, self.version, masks=masks, regions=regions)


def to_meta_tensor(volume: Volume) -> MetaTensor:
    """The volume as MONAI expects it: channel first, axes (column, row, slice), RAS affine."""
    array = np.ascontiguousarray(volume.voxels.transpose(2, 1, 0), dtype=np.float32)[None]
    affine = LPS_TO_RAS @ volume.affine[:, [2, 1, 0, 3]]
    return MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine))


def _configured(settings: PreprocessingSettings) -> tuple[Compose, Inferer, None]:
    transforms: list[Any] = [Orientationd("image", axcodes=settings.orientation)]
    if settings.spacing_mm:
        transforms.append(Spacingd("image", pixdim=settings.spacing_mm, mode="bilinear"))
    low, high = settings.intensity_range
    transforms += [
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped("image"),
    ]
    inferer = SlidingWindowInferer(
        roi_size=settings.roi_size,
        sw_batch_size=settings.sw_batch_size,
        overlap=settings.overlap,
        mode="gaussian",
    )
    return Compose(transforms), inferer, None


def _without(transforms: list[dict[str, Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [t for t in transforms if str(t.get("_target_", "")).split(".")[-1] not in names]


def _has_inverse(model: LoadedModel) -> bool:
    parser = model.bundle
    if parser is None or "postprocessing" not in parser.get():
        return False
    return any(
        str(t.get("_target_", "")).split(".")[-1] in ("Invertd", "Invert")
        for t in parser.get()["postprocessing"]["transforms"]
    )


def _label_map(prediction: torch.Tensor, activated: bool) -> torch.Tensor:
    """Channels to one label channel: argmax; a single channel that already holds label values
    is kept; else a threshold (0.5 on activated output, 0 on logits)."""
    if prediction.shape[0] > 1:
        return prediction.argmax(dim=0, keepdim=True)
    if torch.equal(prediction, prediction.round()):
        return prediction
    return (prediction > (0.5 if activated else 0.0)).to(prediction.dtype)
