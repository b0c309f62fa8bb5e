"""Configuration of pipelines (the node's `pipelines:` and `volume:` sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.base import DevicePreference
from pipelines.codes import Code
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
    """A model on disk: a MONAI bundle directory or a TorchScript file."""

    path: Path
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")


class PreprocessingSettings(_Strict):
    """Preprocessing for a TorchScript model that comes without a bundle config."""

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] | None = None
    intensity_range: tuple[float, float] = (-1024.0, 300.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_batch_size: int = Field(default=1, ge=1)


class PipelineSettings(_Strict):
    """One configured pipeline; `type` names the implementation (default: the key itself)."""

    type: str | None = None
    device: DevicePreference = "auto"
    model: ModelSettings | None = None
    labels: dict[int, LabelSettings] = {}
    preprocessing: PreprocessingSettings | None = None


class VolumeSettings(_Strict):
    """How series become volumes; see pipelines/volume.py."""

    gantry_tilt: Literal["refuse", "resample"] = "refuse"
    spacing_tolerance: float = Field(default=0.1, gt=0, lt=1)
    decode_threads: int | None = Field(default=None, ge=1)

    def options(self) -> VolumeOptions:
        if self.decode_threads is None:
            return VolumeOptions(self.gantry_tilt, self.spacing_tolerance)
        return VolumeOptions(
            self.gantry_tilt, self.spacing_tolerance, decode_threads=self.decode_threads
        )
