"""`bundle-segmentation`: any MONAI segmentation model, its labels named by a table in config.

The bundle's own `preprocessing`, `inferer` and `postprocessing` are used (its file loading
and saving transforms are dropped: the node hands it the volume in memory, with its
affine); a bare TorchScript file gets its preprocessing from config. The label map is
inverted back onto the series' own grid, so masks line up with the source slices.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import Compose, Invertd

from pipelines import codes
from pipelines.availability import of_segmentation
from pipelines.base import StageTimer
from pipelines.context import Context
from pipelines.device import inference_mode
from pipelines.model_pipeline import ModelPipeline
from pipelines.models import LoadedModel
from pipelines.preprocessing import bundle_part, preprocessing_for, to_meta_tensor
from pipelines.result import Mask, Measurement, PipelineResult, Region, Segment
from pipelines.settings import PipelineSettings, SegmentationSettings
from pipelines.volume import Volume


class BundleSegmentationPipeline(ModelPipeline):
    check = staticmethod(of_segmentation)

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        super().__init__(name, settings)
        labels = settings.labels if isinstance(settings, SegmentationSettings) else {}
        self.segments = {
            value: Segment(
                label.name,
                label.category.code(),
                label.type.code(),
                None,
                label.color,
            )
            for value, label in sorted(labels.items())
        }

    def infer(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        timed = StageTimer(context)
        with timed("model", "load model"):
            model = self.model(device)
            preprocessing, inferer, postprocessing = self._transforms(model)
        with timed("preprocessing", "preprocess"):
            data = preprocessing({"image": to_meta_tensor(volume)})
        with timed("inference"), inference_mode(device):
            prediction = inferer(data["image"][None].to(device), model.network)[0]
        with timed("postprocessing", "postprocess"):
            result = self._labels_back(
                volume, model, data, prediction, preprocessing, postprocessing
            )
        result.timings = timed.timings
        return result

    def _labels_back(
        self,
        volume: Volume,
        model: LoadedModel,
        data: dict[str, Any],
        prediction: torch.Tensor,
        preprocessing: Compose,
        postprocessing: Compose | None,
    ) -> PipelineResult:
        """The prediction as a label map on the series grid, then masks and volumes."""
        data["pred"] = prediction.float().cpu()
        data["image"] = data["image"].cpu()
        if postprocessing is not None:
            data = postprocessing(data)
        labels = _label_map(data["pred"], activated=postprocessing is not None)
        if not _has_inverse(model):
            data["pred"] = labels
            invert = Invertd("pred", preprocessing, "image", nearest_interp=True)
            keyed: dict[Hashable, Any] = {key: value for key, value in data.items()}
            labels = invert(keyed)["pred"]
        label_volume = np.asarray(labels)[0].transpose(2, 1, 0).round().astype(np.int32)
        if label_volume.shape != volume.voxels.shape:
            raise RuntimeError(
                f"the model's output {label_volume.shape} does not map back onto the series "
                f"grid {volume.voxels.shape}"
            )
        return self._result(label_volume, volume)

    def _transforms(self, model: LoadedModel) -> tuple[Compose, Inferer, Compose | None]:
        parser = model.bundle
        prep = self.preprocessing_settings
        configured_inferer = SlidingWindowInferer(
            roi_size=prep.roi_size,
            sw_batch_size=prep.sw_batch_size,
            overlap=prep.overlap,
            mode="gaussian",
        )
        return (
            preprocessing_for(parser, prep),
            bundle_part(parser, "inferer") or configured_inferer,
            bundle_part(parser, "postprocessing"),
        )

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
