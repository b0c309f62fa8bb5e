"""`nodule-detection`: lung nodules and tumours with MONAI's RetinaNet, compatible with the
public `lung_nodule_ct_detection` bundle (RAS, 0.703 x 0.703 x 1.25 mm, -1024..300 HU to
0..1, sliding window).

The bundle's 0.02 score cut only selects candidates for NMS; what is reported is what
scores at least `detection.threshold`. Boxes come back in the resampled image's voxel
coordinates and go to patient coordinates through that image's affine (the bundle's own
AffineBoxToWorldCoordinate does the same). Each nodule gets a segment (the voxels of the
ellipsoid inscribed in its box that are denser than `solid_hu`), its volume, its long axis,
and its side from lung-quant's lung masks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.bundle import ConfigParser

from pipelines import codes
from pipelines.base import BadInput, Requirements, StageTimer
from pipelines.context import Context, Need
from pipelines.detection_network import MONAI_EXTRACTOR, OUR_EXTRACTOR
from pipelines.device import inference_mode
from pipelines.model_pipeline import ModelPipeline
from pipelines.models import LoadedModel
from pipelines.preprocessing import LPS_TO_RAS, strip_io
from pipelines.result import Detection, Mask, Measurement, PipelineResult, Segment
from pipelines.settings import (
    DetectionSettings,
    DetectorSettings,
    PipelineSettings,
    PreprocessingSettings,
)
from pipelines.volume import Volume

log = logging.getLogger(__name__)

BUNDLE_ROI = "infer_patch_size"
NODULE_COLOR = (255, 64, 64)


class NoduleDetectionPipeline(ModelPipeline):
    requirements = Requirements(modalities=("CT",), min_slices=10, max_slice_thickness_mm=5.0)
    runs_channels_last = False
    """Unmeasured for a trained RetinaNet: the tests' hand-built one (GroupNorm over nearly
    constant channels) turns that layout's rounding into other boxes."""
    default_preprocessing = PreprocessingSettings(
        orientation="RAS",
        spacing_mm=(0.703125, 0.703125, 1.25),
        intensity_range=(-1024.0, 300.0),
        roi_size=(512, 512, 192),
    )

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        super().__init__(name, settings)
        self.detection = (
            settings.detection if isinstance(settings, DetectorSettings) else DetectionSettings()
        )
        if self.detection.lung_side:
            self.needs = self.needs | {Need.LUNGS}

    def prepare(self, parser: ConfigParser) -> None:
        """The bundle as a node runs it: resampling on (its default assumes LUNA16 data
        resampled beforehand) and a feature extractor that needs no torchvision."""
        if "whether_raw_luna16" in parser.get():
            parser["whether_raw_luna16"] = True
        extractor = parser.get().get("feature_extractor")
        if isinstance(extractor, str) and MONAI_EXTRACTOR in extractor:
            parser["feature_extractor"] = extractor.replace(MONAI_EXTRACTOR, OUR_EXTRACTOR)
        strip_io(parser)

    def infer(self, volume: Volume, device: torch.device, context: Context) -> PipelineResult:
        timed = StageTimer(context)
        with timed("model", "load model"):
            model = self.model(device)
            detector = self.detector(model)
        with timed("preprocessing", "preprocess"):
            image = self.preprocess(volume, model, context)["image"]
        with timed("inference"), inference_mode(device):
            found = detector([image.as_tensor().to(device)], use_inferer=True)[0]
        with timed("measurement", "measure"):
            result = self.measure(volume, found, detector, image.affine.numpy(), context)
        result.timings = timed.timings
        return result

    def measure(
        self,
        volume: Volume,
        found: dict[str, torch.Tensor],
        detector: RetinaNetDetector,
        ras_affine: np.ndarray,
        context: Context,
    ) -> PipelineResult:
        """The detections above the operating threshold, each with its segment and side."""
        settings = self.detection
        scores = found[detector.pred_score_key].float().cpu().numpy()
        boxes = found[detector.target_box_key].float().cpu().numpy()
        keep = np.flatnonzero(scores >= settings.threshold)[: settings.max_detections]
        world = [patient_box(boxes[i], ras_affine) for i in keep]
        sides = (
            self.sides(volume, world, context)
            if settings.lung_side and world
            else [None] * len(world)
        )
        result = PipelineResult(self.name, self.version)
        for number, (i, (low, high), side) in enumerate(
            zip(keep, world, sides, strict=True), start=1
        ):
            label = f"Nodule {number}"
            mask = nodule_mask(volume, low, high, settings.solid_hu)
            result.masks.append(Mask(nodule_segment(label), mask))
            volume_mm3 = round(float(mask.sum()) * volume.voxel_volume_ml * 1000.0, 1)
            result.detections.append(
                Detection(
                    codes.NODULE,
                    round(float(scores[i]), 4),
                    _rounded_point(low),
                    _rounded_point(high),
                    finding_site=side,
                    segment=label,
                    measurements=(Measurement(codes.VOLUME, volume_mm3, codes.CUBIC_MILLIMETER),),
                )
            )
        return result

    def detector(self, model: LoadedModel) -> RetinaNetDetector:
        settings = self.detection
        parser = model.bundle
        if parser is not None and "anchor_generator" in parser.get():
            anchors = parser.get_parsed_content("anchor_generator", instantiate=True)
        else:
            anchors = AnchorGeneratorWithAnchorShape(
                feature_map_scales=settings.feature_map_scales,
                base_anchor_shapes=[list(s) for s in settings.anchor_shapes],
            )
        detector = RetinaNetDetector(
            model.network,
            anchors,
            spatial_dims=3,
            num_classes=1,
            size_divisible=_size_divisible(model, parser),
        )
        detector.set_box_selector_parameters(
            score_thresh=settings.candidate_threshold,
            topk_candidates_per_level=1000,
            nms_thresh=settings.nms_threshold,
            detections_per_img=max(settings.max_detections, 1),
        )
        roi = settings.roi_size or (
            parser[BUNDLE_ROI] if parser is not None and BUNDLE_ROI in parser.get() else None
        )
        detector.set_sliding_window_inferer(
            roi_size=list(roi or self.preprocessing_settings.roi_size),
            overlap=0.25,
            sw_batch_size=1,
            mode="constant",
            device="cpu",
        )
        return detector.eval()

    def sides(
        self, volume: Volume, boxes: list[tuple[np.ndarray, np.ndarray]], context: Context
    ) -> list[codes.Code | None]:
        """Left or right lung for each box centre, from lung-quant's lung masks."""
        try:
            lungs = context.lungs(volume)
            left, right = lungs.left.numpy(), lungs.right.numpy()
        except BadInput as exc:
            log.info("%s: no lung masks for the nodules' side: %s", self.name, exc)
            return [None] * len(boxes)
        last = np.array(volume.voxels.shape) - 1
        sides: list[codes.Code | None] = []
        for low, high in boxes:
            index = np.round(volume.to_voxel((low + high) / 2)).astype(int)
            sides.append(_nearest_lung(np.clip(index, 0, last), left, right))
        return sides


def patient_box(box: np.ndarray, ras_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An (x0, y0, z0, x1, y1, z1) box in image voxel coordinates as LPS (min, max) corners."""
    corners = np.array(
        [[x, y, z, 1.0] for x in box[0::3] for y in box[1::3] for z in box[2::3]]
    ).reshape(-1, 4)
    lps = (np.linalg.inv(LPS_TO_RAS) @ ras_affine @ corners.T).T[:, :3]
    return lps.min(axis=0), lps.max(axis=0)


def nodule_mask(volume: Volume, low: np.ndarray, high: np.ndarray, solid_hu: float) -> np.ndarray:
    """Voxels inside the ellipsoid inscribed in the box that are denser than `solid_hu`."""
    indices = volume.box_corners(low, high)
    shape = np.array(volume.voxels.shape)
    start = np.clip(np.floor(indices.min(axis=0)).astype(int), 0, shape)
    stop = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 1, 0, shape)
    mask = np.zeros(volume.voxels.shape, dtype=bool)
    if np.any(stop <= start):
        return mask
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b) for a, b in zip(start, stop, strict=True)), indexing="ij"),
        axis=-1,
    )
    points = volume.to_patient(grid)
    center, radii = (low + high) / 2, np.maximum((high - low) / 2, 1e-3)
    inside = (((points - center) / radii) ** 2).sum(axis=-1) <= 1.0
    region = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    mask[region] = inside & (volume.voxels[region] > solid_hu)
    return mask


def _rounded_point(point: np.ndarray) -> tuple[float, float, float]:
    x, y, z = (round(float(v), 2) for v in point)
    return x, y, z


def nodule_segment(label: str) -> Segment:
    return Segment(
        label, codes.MORPHOLOGICALLY_ALTERED_STRUCTURE, codes.NODULE, codes.LUNG, NODULE_COLOR
    )


def _nearest_lung(index: np.ndarray, left: np.ndarray, right: np.ndarray) -> codes.Code | None:
    """The lung the voxel lies in, or the nearer one within a few centimetres (a nodule at
    the pleura or hilum can sit just outside the lung mask)."""
    for radius in (0, 4, 8, 16, 32):
        window = tuple(slice(max(0, i - radius), i + radius + 1) for i in index)
        in_left, in_right = left[window].sum(), right[window].sum()
        if in_left or in_right:
            return codes.LEFT_LUNG if in_left >= in_right else codes.RIGHT_LUNG
    return None


def _size_divisible(model: LoadedModel, parser: ConfigParser | None) -> int | Sequence[int]:
    """What the network's input sizes must be multiples of (its own attribute, else the
    bundle's network definition, else 1)."""
    divisible = getattr(model.network, "size_divisible", None)
    if divisible is None and parser is not None:
        divisible = parser.get().get("network_def", {}).get("size_divisible")
    if isinstance(divisible, int):
        return divisible
    if isinstance(divisible, Sequence) and all(isinstance(v, int) for v in divisible):
        return tuple(divisible)
    return 1
