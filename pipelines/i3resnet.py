"""The image backbone of Merlin and of its chest-CT fine-tune Astra: torchvision's ResNet-152
(v1.5: the stride sits in the 3x3 convolution) inflated to 3-D, written here in plain torch
with the checkpoints' own layer names, so their state dicts load with `strict=True`.

Input `[B, 1, X, Y, Z]`: RAS, scaled to 0..1; it is permuted to `[B, 1, Z, X, Y]` and
repeated to three channels. Output `[B, 2048, Z/16, X/32, Y/32]` (the features before
Merlin's pooling); `pipelines.networks.pooled_features` averages them to a 2048-d vector.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

BLOCKS = (3, 8, 36, 3)
"""Bottlenecks per stage: ResNet-152."""
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck3d(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, project: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * EXPANSION, kernel_size=1, bias=False)
        self.bn3: nn.Module = nn.BatchNorm3d(planes * EXPANSION)
        self.relu = nn.ReLU()
        self.downsample = (
            nn.Sequential(
                nn.Conv3d(inplanes, planes * EXPANSION, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * EXPANSION),
            )
            if project
            else None
        )

    def fold_batch_norms(self) -> None:
        """For inference: each BatchNorm folded into the convolution before it."""
        for conv, norm in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
            setattr(self, conv, _folded(getattr(self, conv), getattr(self, norm)))
            setattr(self, norm, nn.Identity())
        if self.downsample is not None:
            self.downsample = nn.Sequential(_folded(*self.downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


def _folded(conv: nn.Module, norm: nn.Module) -> nn.Conv3d:
    assert isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d)
    return fuse_conv_bn_eval(conv, norm)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    first = Bottleneck3d(inplanes, planes, stride, project=True)
    rest = [Bottleneck3d(planes * EXPANSION, planes, 1, project=False) for _ in range(blocks - 1)]
    return nn.Sequential(first, *rest)


class I3ResNet152(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(
            3, 64, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )
        self.bn1: nn.Module = nn.BatchNorm3d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip(WIDTHS, BLOCKS, strict=True)):
            stride = 1 if index == 0 else 2
            self.add_module(f"layer{index + 1}", _stage(inplanes, planes, blocks, stride))
            inplanes = planes * EXPANSION

    def fold_batch_norms(self) -> None:
        """For inference (an eval-mode network): every BatchNorm folded into the convolution
        before it, one pass over the activations fewer per convolution, the same outputs to
        float rounding."""
        self.conv1 = _folded(self.conv1, self.bn1)
        self.bn1 = nn.Identity()
        for module in list(self.modules()):
            if isinstance(module, Bottleneck3d):
                module.fold_batch_norms()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 1, 4, 2, 3)  # [B, 1, X, Y, Z] -> [B, 1, Z, X, Y]
        x = x.expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return x


CHECKPOINT_PREFIXES = (
    "visual_encoder.model.encode_image.i3_resnet.",  # Astra
    "encode_image.i3_resnet.",  # Merlin
)
"""Where the backbone sits in each published checkpoint."""


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a Merlin or Astra checkpoint, under this module's names
    (as float32: the published files store bfloat16)."""
    for prefix in CHECKPOINT_PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {
                key[len(prefix) :]: value.float()
                for key, value in state.items()
                if key.startswith(prefix)
            }
    return {key: value.float() for key, value in state.items()}
