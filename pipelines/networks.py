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
