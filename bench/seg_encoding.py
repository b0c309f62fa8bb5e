"""SEG encodings of lung-quant's masks on real series: size, encode and decode time, and
whether dciodvfy accepts each (the node stores and sends BINARY, deflated).

    python bench/seg_encoding.py [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.work.results.encode import source_headers  # noqa: E402
from node.work.results.identity import ResultIdentity  # noqa: E402
from node.work.results.seg import build_segmentation  # noqa: E402
from pipelines.lung_quant import LungQuantPipeline  # noqa: E402
from pipelines.volume import load_volume  # noqa: E402

DATA = REPO.parent / "shared" / "data"
SERIES = {
    "covid P001": "covid-ct-md/covid/P001",
    "A0001 lung kernel": "lung-pet-ct-dx/A0001/series-2",
}
BINARY, LABELMAP = hd.seg.SegmentationTypeValues.BINARY, hd.seg.SegmentationTypeValues.LABELMAP
VARIANTS: list[tuple[str, hd.seg.SegmentationTypeValues, UID]] = [
    ("BINARY", BINARY, ExplicitVRLittleEndian),
    ("BINARY deflated", BINARY, DeflatedExplicitVRLittleEndian),
    ("LABELMAP", LABELMAP, ExplicitVRLittleEndian),
    ("LABELMAP RLE", LABELMAP, RLELossless),
    ("LABELMAP JPEG-LS", LABELMAP, JPEGLSLossless),
    ("LABELMAP JPEG 2000", LABELMAP, JPEG2000Lossless),
]
DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(encoded: bytes, folder: Path) -> str:
    """How many errors dciodvfy reports on the object ("-" without dciodvfy)."""
    if DCIODVFY is None:
        return "-"
    path = folder / "seg.dcm"
    path.write_bytes(encoded)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return str(sum(line.startswith("Error") for line in (run.stdout + run.stderr).splitlines()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    pipeline = LungQuantPipeline("auto")
    print(
        f"{'series':<18} {'encoding':<19} {'MB':>6} {'encode s':>9} {'decode s':>9} {'errors':>7}"
    )
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name, relative in SERIES.items():
            files = sorted((DATA / relative).glob("*.dcm"))
            if not files:
                print(f"{name}: no data at {DATA / relative}")
                continue
            volume = load_volume(files, requirements=pipeline.requirements)
            result = pipeline.run(volume)
            sources = source_headers(volume)
            identity = ResultIdentity("lung-quant", "bench", volume.series_instance_uid, 1, "B")
            for label, kind, syntax in VARIANTS:
                encode_times, decode_times = [], []
                for _ in range(args.runs):
                    clock = time.perf_counter()
                    deflate = syntax == DeflatedExplicitVRLittleEndian
                    built_as = ExplicitVRLittleEndian if deflate else syntax
                    seg = build_segmentation(result, volume, sources, identity, kind, built_as)
                    if deflate:  # highdicom cannot; pydicom deflates what it writes
                        seg.file_meta.TransferSyntaxUID = syntax
                    buffer = io.BytesIO()
                    seg.save_as(buffer, enforce_file_format=True)
                    encode_times.append(time.perf_counter() - clock)
                    clock = time.perf_counter()
                    _ = pydicom.dcmread(io.BytesIO(buffer.getvalue())).pixel_array
                    decode_times.append(time.perf_counter() - clock)
                encoded = buffer.getvalue()
                print(
                    f"{name:<18} {label:<19} {len(encoded) / 1e6:>6.2f} "
                    f"{statistics.median(encode_times):>9.2f} "
                    f"{statistics.median(decode_times):>9.2f} "
                    f"{dciodvfy_errors(encoded, work):>7}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
