"""Networks the pipelines build from config that MONAI does not ship as one class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder
from torch import nn

CT_FM_ENCODER = {
    "_target_": "monai.networks.nets.segresnet_ds.SegResEncoder",
    "spatial_dims": 3,
    "in_channels": 1,
    "init_filters": 32,
    "blocks_down": [1, 2, 2, 4, 4],
}
"""CT-FM's published feature extractor (project-lighter/ct_fm_feature_extractor)."""


def pooled_features(output: object) -> torch.Tensor:
    """(batch, features) from an encoder's output: the last feature map of a list,
    average-pooled over space; a (batch, features) tensor as it is."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the encoder returned {type(output).__name__}, not tensors")
    return output.flatten(start_dim=2).mean(dim=2) if output.ndim > 2 else output


PROFILE_PARTS = 5


def axial_profile(output: object, parts: int = PROFILE_PARTS) -> torch.Tensor | None:
    """(batch, features * parts): the last feature map averaged over `parts` equal spans of
    its first spatial axis (the body axis for CT-FM's SPL input and for I3ResNet, which
    puts Z first), each span over the rest of space; None for a (batch, features) output.

    The series input guard compares these: unlike the pooled vector, they tell a scan
    flipped head to feet or cut to the abdomen from a chest. Five spans: I3ResNet's map has
    ten along Z at 160 slices; on the real series five separated the perturbed scans from
    the real ones with a wider margin than three or four."""
    if isinstance(output, (list, tuple)):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.ndim != 5:
        return None
    pooled = nn.functional.adaptive_avg_pool3d(output.float(), (parts, 1, 1))
    return pooled.flatten(start_dim=2).transpose(1, 2).flatten(start_dim=1)


class EncoderClassifier(nn.Module):
    """A CT-FM-style SegResEncoder backbone with a linear head on its pooled last features."""

    def __init__(
        self,
        out_channels: int,
        in_channels: int = 1,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4, 4),
    ) -> None:
        super().__init__()
        self.encoder = SegResEncoder(
            spatial_dims=3,
            in_channels=in_channels,
            init_filters=init_filters,
            blocks_down=tuple(blocks_down),
        )
        self.head = nn.Linear(init_filters * 2 ** (len(blocks_down) - 1), out_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.encoder(image)))
