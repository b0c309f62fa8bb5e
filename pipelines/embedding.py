"""`ct-embedding`: a CT foundation model's feature vector for the whole scan (CT-FM by
default: SegResEncoder, orientation SPL, -1024..2048 HU to 0..1, crop to the foreground).

The vector is unit length (cosine similarity is a dot product) and the node stores it per
series, so `ainode similar` can find earlier scans like a new one. No DICOM object is made.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import CropForeground

from pipelines.base import Requirements, Stage, StageTimer
from pipelines.device import inference_mode
from pipelines.model_pipeline import ModelPipeline
from pipelines.networks import CT_FM_ENCODER, pooled_features
from pipelines.result import PipelineResult
from pipelines.settings import NetworkSettings, PipelineSettings, PreprocessingSettings
from pipelines.volume import Volume


class CTEmbeddingPipeline(ModelPipeline):
    requirements = Requirements(modalities=("CT",), min_slices=10)
    default_preprocessing = PreprocessingSettings(
        orientation="SPL", intensity_range=(-1024.0, 2048.0)
    )

    def __init__(self, name: str, settings: PipelineSettings) -> None:
        if settings.network is None:
            target = str(CT_FM_ENCODER["_target_"])
            args = {k: v for k, v in CT_FM_ENCODER.items() if k != "_target_"}
            settings = settings.model_copy(
                update={"network": NetworkSettings(target=target, args=args)}
            )
        super().__init__(name, settings)

    def infer(self, volume: Volume, device: torch.device, stage: Stage) -> PipelineResult:
        timed = StageTimer(stage)
        with timed("model", "load model"):
            model = self.model(device)
        with timed("preprocessing", "preprocess"):
            image = self.preprocess(volume, model)["image"]
            if model.bundle is None:
                image = CropForeground()(image)
            image = torch.as_tensor(image)
        with timed("inference"), inference_mode(device):
            features = pooled_features(model.network(image[None].to(device)))
        vector = features.float().cpu().numpy().reshape(-1)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise RuntimeError("the model gave an empty or non-finite embedding")
        return PipelineResult(
            self.name, self.version, embedding=vector / norm, timings=timed.timings
        )
