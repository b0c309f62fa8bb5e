"""Small models with the real architectures, saved in the real formats (MONAI bundle, state
dict, TorchScript), so loading, preprocessing, inference and encoding all run for real.
Their weights are set by hand to do something a test can check."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.networks.nets.resnet import ResNet
from pydantic import TypeAdapter

from pipelines.detection_network import resnet_fpn_feature_extractor
from pipelines.networks import EncoderClassifier
from pipelines.settings import AnyPipelineSettings, PipelineSettings

PIPELINE_SETTINGS: TypeAdapter[PipelineSettings] = TypeAdapter(AnyPipelineSettings)
"""Validates a `pipelines:` entry (with its `type`) as the node's config does."""
ENCODER_ARGS = {"in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 1]}


def write_bundle(
    root: Path, inference: dict[str, Any], network: torch.nn.Module, version: str = "0.1.0"
) -> Path:
    """configs/metadata.json, configs/inference.json and models/model.pt."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": version}))
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def fixed_classifier(logits: list[float]) -> EncoderClassifier:
    """A CT-FM-style classifier whose head ignores the features: its outputs are `logits`."""
    net = EncoderClassifier(out_channels=len(logits), **ENCODER_ARGS)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor(logits))
    return net.eval()


class MeanIntensityClassifier(torch.nn.Module):
    """Logit k = scale[k] * (mean of the preprocessed input - offset[k]): denser lungs raise
    every logit, which a test can see."""

    def __init__(self, scale: list[float], offset: list[float]) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.offset = torch.nn.Parameter(torch.tensor(offset))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = image.flatten(start_dim=1).mean(dim=1, keepdim=True)
        return self.scale * (mean - self.offset)


def densenet_findings_bundle(root: Path, seed: int = 0) -> Path:
    """A small MONAI DenseNet with CT-RATE's 18 outputs (random weights, seeded) as a bundle
    with its own preprocessing: 4 x 4 x 5 mm, -1000..1000 HU, padded or cropped to 48x40x40."""
    from monai.networks.nets import DenseNet

    network = {
        "_target_": "DenseNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 18,
        "init_features": 8,
        "growth_rate": 4,
        "block_config": [2, 2],
    }
    torch.manual_seed(seed)
    net = DenseNet(**{k: v for k, v in network.items() if k != "_target_"}).eval()
    window = {"a_min": -1000, "a_max": 1000, "b_min": 0, "b_max": 1, "clip": True}
    inference = {
        "network_def": network,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [4.0, 4.0, 5.0]},
                {"_target_": "ScaleIntensityRanged", "keys": "image", **window},
                {"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [48, 40, 40]},
            ],
        },
    }
    return write_bundle(root, inference, net, version="2.1.0")


def blob_detector(diameter_voxels: float, fpn_channels: int = 16) -> RetinaNet:
    """A real RetinaNet (ResNet + FPN, MONAI's heads) whose weights make it a blob detector:
    the first convolution is a centre-surround filter matched to a ball of the given diameter
    (in resampled voxels), every other layer passes that response through, and the box
    regression is zero, so each box is the anchor where the response peaks.

    Details that keep it exact: the filter is centred one voxel on, so that feature j of the
    finest level answers for voxel 2j + 1, where MONAI centres its anchor; the coarser levels
    are switched off; and each GroupNorm of the heads is paired with a constant channel, so
    it scales every patch the same way."""
    size = filter_size(diameter_voxels)
    backbone = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 32, 64],
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_size=[size] * 3,
        conv1_t_stride=[1, 1, 1],
    )
    extractor = resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], fpn_channels=fpn_channels)
    net = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=1,
        feature_extractor=extractor,
        size_divisible=[8, 8, 8],
    )
    constant = 100.0
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        backbone.conv1.weight[0, 0] = torch.from_numpy(_centre_surround(size, diameter_voxels))
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Conv3d) and _passes_through(name):
                module.weight[0, 0][tuple(k // 2 for k in module.kernel_size)] = 1.0
        tower = list(net.classification_head.conv)
        for index, (conv, norm) in enumerate(zip(tower[0::3], tower[1::3], strict=True)):
            conv.bias[1] = constant  # GroupNorm of (r, constant) is 2r/constant - 1
            if index:
                conv.weight[0, 0] *= constant / 2
            norm.bias[0] = 1.0
        logits = net.classification_head.cls_logits
        logits.weight[0, 0][1, 1, 1] = 8.0 * constant / 2  # logit = 8 (response - 0.3)
        logits.bias[0] = -8.0 * 0.3
    return net.eval()


def filter_size(diameter_voxels: float) -> int:
    """The centre-surround filter's width: odd, the ball and two voxels of surround on each
    side (11 for 7 voxels, 7 for 3). The first convolution is most of the detector's
    time on the CPU: a coarse grid keeps it small and the tests quick."""
    return math.ceil(diameter_voxels + 4) | 1


def _centre_surround(size: int, diameter: float) -> np.ndarray:
    offsets = np.indices((size, size, size)) - (size // 2 + 1)
    distance = np.sqrt((offsets**2).sum(axis=0))
    inner = distance <= diameter / 2
    return np.where(inner, 1.0 / inner.sum(), -1.0 / (~inner).sum()).astype(np.float32)


def _passes_through(name: str) -> bool:
    """Layers that hand channel 0 on unchanged (the residual branches stay zero, so a ResNet
    block is the identity or its downsampling)."""
    if name.endswith(("cls_logits", "bbox_reg")) or name == "feature_extractor.body.conv1":
        return False
    if name.startswith("feature_extractor.body.layer") and "downsample" not in name:
        return False
    return not name.startswith(
        ("feature_extractor.fpn.inner_blocks.1", "feature_extractor.fpn.layer_blocks.1")
    )


def blob_detector_bundle(root: Path, diameter_voxels: float, spacing_mm: float) -> Path:
    """The blob detector as a bundle laid out like `lung_nodule_ct_detection`: its
    network_def, anchor generator, and preprocessing with the same switches."""
    anchor = math.ceil(diameter_voxels)
    size = filter_size(diameter_voxels)
    inference = {
        "whether_raw_luna16": False,
        "whether_resampled_luna16": "$(not @whether_raw_luna16)",
        "infer_patch_size": [96, 96, 64],
        "anchor_generator": {
            "_target_": "monai.apps.detection.utils.anchor_utils.AnchorGeneratorWithAnchorShape",
            "feature_map_scales": [1, 1, 1],
            "base_anchor_shapes": [[anchor, anchor, anchor]],
        },
        "backbone": (
            "$monai.networks.nets.resnet.ResNet(block='basic',layers=[1,1,1,1],"
            "block_inplanes=[8,16,32,64],spatial_dims=3,n_input_channels=1,"
            f"conv1_t_size=[{size},{size},{size}],conv1_t_stride=[1,1,1])"
        ),
        "feature_extractor": (
            "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor"
            "(@backbone,3,False,[1,2],None,fpn_channels=16)"
        ),
        "network_def": {
            "_target_": "RetinaNet",
            "spatial_dims": 3,
            "num_classes": 1,
            "num_anchors": 1,
            "feature_extractor": "@feature_extractor",
            "size_divisible": [8, 8, 8],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "_disabled_": "@whether_raw_luna16"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": [spacing_mm] * 3,
                    "_disabled_": "@whether_resampled_luna16",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1024.0,
                    "a_max": 300.0,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
    }
    return write_bundle(root, inference, blob_detector(diameter_voxels))


def ct_fm_embedding(folder: Path, spacing_mm: float) -> dict[str, object]:
    """`ct-embedding` settings with a small CT-FM encoder (seeded weights) saved in `folder`,
    on a coarse grid of `spacing_mm`."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    torch.manual_seed(1)
    model = folder / "ct-fm.pt"
    torch.save(SegResEncoder(spatial_dims=3, **ENCODER_ARGS).state_dict(), model)
    return {
        "device": "cpu",
        "model": {"path": str(model)},
        "network": {
            "target": "monai.networks.nets.segresnet_ds.SegResEncoder",
            "args": {"spatial_dims": 3, **ENCODER_ARGS},
        },
        "preprocessing": {
            "orientation": "SPL",
            "intensity_range": [-1024, 2048],
            "spacing_mm": [spacing_mm] * 3,
        },
    }
