"""Time and peak memory per series of each model pipeline, with the real architectures at
their published sizes (random weights: the arithmetic is the same as with trained ones).

    python bench/pipelines.py [--runs 1] [--device auto|cpu|cuda] [--series covid]

nodule-detection: the `lung_nodule_ct_detection` network (RetinaNet, ResNet-50 FPN,
0.703 x 0.703 x 1.25 mm, 512x512x192 sliding window); thoracic-findings: DenseNet-121 with
18 outputs at CT-RATE's 480x480x240; covid-triage: a CT-FM EncoderClassifier at
224x224x96; ct-embedding: CT-FM's SegResEncoder (here at 1.5 mm to fit a CPU box; pass
--native for the published full resolution). Each run is its own process, so its peak RSS
is its own. Prints medians per pipeline: load, model, preprocessing, inference, total.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.peers import REAL_SERIES

PIPELINES = ("nodule-detection", "thoracic-findings", "covid-triage", "ct-embedding")


def build_models(folder: Path) -> dict[str, dict]:
    """Real-size networks saved as the formats the node loads; their pipeline settings."""
    import torch
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.networks.nets import DenseNet121
    from monai.networks.nets.resnet import resnet50
    from monai.networks.nets.segresnet_ds import SegResEncoder

    from pipelines.detection_network import resnet_fpn_feature_extractor
    from pipelines.networks import EncoderClassifier

    backbone = resnet50(
        spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7]
    )
    retina = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=3,
        feature_extractor=resnet_fpn_feature_extractor(backbone, 3, False, [1, 2]),
        size_divisible=[16, 16, 8],
    )
    torch.save(retina.state_dict(), folder / "retinanet.pt")
    torch.save(
        DenseNet121(spatial_dims=3, in_channels=1, out_channels=18).state_dict(),
        folder / "densenet.pt",
    )
    torch.save(EncoderClassifier(out_channels=3).state_dict(), folder / "triage.pt")
    torch.save(
        SegResEncoder(
            spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4)
        ).state_dict(),
        folder / "ct-fm.pt",
    )
    retina_args = {
        "spatial_dims": 3,
        "num_classes": 1,
        "num_anchors": 3,
        "size_divisible": [16, 16, 8],
        "feature_extractor": "$pipelines.detection_network.resnet_fpn_feature_extractor("
        "monai.networks.nets.resnet.resnet50(spatial_dims=3,n_input_channels=1,"
        "conv1_t_stride=[2,2,1],conv1_t_size=[7,7,7]),3,False,[1,2])",
    }
    return {
        "nodule-detection": {
            "model": {"path": str(folder / "retinanet.pt")},
            "network": {
                "target": "monai.apps.detection.networks.retinanet_network.RetinaNet",
                "args": retina_args,
            },
            "detection": {"roi_size": [512, 512, 192], "lung_side": True},
        },
        "thoracic-findings": {
            "model": {"path": str(folder / "densenet.pt")},
            "network": {
                "target": "DenseNet121",
                "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 18},
            },
        },
        "covid-triage": {
            "model": {"path": str(folder / "triage.pt")},
            "network": {
                "target": "pipelines.networks.EncoderClassifier",
                "args": {"out_channels": 3},
            },
        },
        "ct-embedding": {
            "model": {"path": str(folder / "ct-fm.pt")},
            "preprocessing": {
                "orientation": "SPL",
                "intensity_range": [-1024, 2048],
                "spacing_mm": [3.0, 1.5, 1.5],
            },
        },
    }


def one(name: str, settings: dict, folder: Path, device: str) -> dict[str, float]:
    import torch

    from pipelines.registry import build_pipelines
    from pipelines.settings import PipelineSettings
    from pipelines.volume import load_volume

    config = PipelineSettings.model_validate({"type": name, "device": device, **settings})
    pipeline = build_pipelines({name: config})[name]
    problem = pipeline.problem()
    if problem:
        raise SystemExit(problem)
    clock = time.perf_counter()
    volume = load_volume(sorted(folder.glob("*.dcm")), requirements=pipeline.requirements)
    load = time.perf_counter() - clock
    result = pipeline.run(volume)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - clock
    return {
        "load": load,
        **result.timings,
        "total": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--series", default="covid", choices=sorted(REAL_SERIES))
    parser.add_argument("--native", action="store_true", help="ct-embedding at full resolution")
    parser.add_argument("--only", nargs="*", default=list(PIPELINES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = REAL_SERIES[args.series]
    if args.one:
        print(json.dumps(one(args.one, json.loads(args.settings), folder, args.device)))
        return
    if not folder.is_dir():
        raise SystemExit(f"real data not found: {folder}")
    with tempfile.TemporaryDirectory() as tmp:
        configs = build_models(Path(tmp))
        if args.native:
            configs["ct-embedding"].pop("preprocessing")
        print(f"series {args.series}; device {args.device}; medians of {args.runs}")
        columns = ["load", "model", "preprocess", "inference", "post", "total"]
        print(f"| pipeline | {' | '.join(c + ' s' for c in columns)} | peak RSS GB | peak GPU GB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.only:
            runs = []
            for _ in range(args.runs):
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        name,
                        "--settings",
                        json.dumps(configs[name]),
                        "--series",
                        args.series,
                        "--device",
                        args.device,
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode:
                    print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} |")
                    break
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
            post = med.get("measurement", med.get("postprocessing", 0.0))
            print(
                f"| {name} | {med['load']:.1f} | {med['model']:.1f} | "
                f"{med['preprocessing']:.1f} | {med['inference']:.1f} | {post:.1f} | "
                f"{med['total']:.1f} | {med['peak_rss_mb'] / 1024:.2f} | "
                f"{med['peak_gpu_mb'] / 1024:.2f} |"
            )


if __name__ == "__main__":
    main()
