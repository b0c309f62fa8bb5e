"""The ResNet + FPN feature extractor of MONAI's RetinaNet, built without torchvision.

MONAI's `resnet_fpn_feature_extractor` takes torchvision's IntermediateLayerGetter, and the
torchvision wheels are built for CUDA torch only. This builds the same modules under the
same names (`body.*`, `fpn.*`), so the weights of MONAI's detection bundles (e.g.
`lung_nodule_ct_detection`) load unchanged, and it computes the same features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from torch import nn

MONAI_EXTRACTOR = "monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor"
OUR_EXTRACTOR = "pipelines.detection_network.resnet_fpn_feature_extractor"
FPN_CHANNELS = 256


class ResNetFPN(nn.Module):
    """The backbone's children up to the last returned layer (all of them run, as in
    torchvision's IntermediateLayerGetter), then a feature pyramid over the returned layers."""

    def __init__(
        self,
        backbone: ResNet,
        spatial_dims: int,
        returned_layers: Sequence[int],
        fpn_channels: int = FPN_CHANNELS,
    ):
        super().__init__()
        last = f"layer{max(returned_layers)}"
        self.body = nn.ModuleDict()
        for name, child in backbone.named_children():
            self.body[name] = child
            if name == last:
                break
        self.returned = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
        stage2 = backbone.in_planes // 8
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=spatial_dims,
            in_channels_list=[stage2 * 2 ** (k - 1) for k in returned_layers],
            out_channels=fpn_channels,
            extra_blocks=LastLevelMaxPool(spatial_dims),
        )
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.body.items():
            x = module(x)
            if name in self.returned:
                features[self.returned[name]] = x
        return self.fpn(features)


def resnet_fpn_feature_extractor(
    backbone: ResNet,
    spatial_dims: int,
    pretrained_backbone: bool = False,
    returned_layers: Sequence[int] = (1, 2, 3),
    trainable_backbone_layers: int | None = None,
    fpn_channels: int = FPN_CHANNELS,
) -> ResNetFPN:
    """Drop-in for MONAI's function of the same name (same arguments; `pretrained_backbone`
    and `trainable_backbone_layers` only matter for training). `fpn_channels` is MONAI's
    fixed 256 unless a smaller network is wanted."""
    return ResNetFPN(backbone, spatial_dims, returned_layers, fpn_channels)
