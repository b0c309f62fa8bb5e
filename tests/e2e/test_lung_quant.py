"""lung-quant end to end: DCMTK sends a real series to `ainode serve`, the rules route it, a
worker runs the pipeline, and the result is stored and shown by `status` and `jobs list`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.e2e.test_routing import finished_job, uid_of
from tests.peers import NodeProcess, storescu, wait_until

LUNG_QUANT_FOR_CT = """
rules:
  - name: chest-ct
    match: {Modality: CT}
    pipelines: [lung-quant]
    destinations: [origin]
"""


@pytest.mark.slow
def test_a_routed_series_is_quantified_by_the_service(
    start_node: Callable[..., NodeProcess], real_series: dict[str, list[Path]], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(LUNG_QUANT_FOR_CT)
    model = tmp_path / "missing-model"
    node = start_node(
        routing={"rules_file": str(rules)},
        pipelines={"lobes": {"type": "bundle-segmentation", "model": {"path": str(model)}}},
    )
    files = real_series["body-kernel"]
    wait_until(lambda: re.search(r"node \S+ ready", node.log()), timeout=120)  # the worker too
    storescu(node.port, files)
    job = wait_until(lambda: finished_job(node, uid_of(files)), timeout=90, interval=0.5)
    assert job["pipeline"] == "lung-quant" and job["state"] == "succeeded"
    regions = {r["name"]: r for r in job["result"]["regions"]}
    volume = {m["concept"]["meaning"]: m["value"] for m in regions["Both lungs"]["measurements"]}
    assert 4000 < volume["Volume"] < 7000
    assert [s["label"] for s in job["result"]["segments"]] == [
        "Left lung",
        "Right lung",
        "Low attenuation area",
        "High attenuation area",
        "Trachea and main bronchi",
    ]
    output = Path(job["result"]["output"])
    assert output.is_relative_to(node.storage)
    assert len(list(output.parent.glob("lungs-*.npz"))) == 1  # for the other workers
    masks = np.load(output / "masks.npz")
    assert np.unpackbits(masks["Left lung"], axis=-1).shape == (64, 512, 512)
    assert json.loads((output / "result.json").read_text())["regions"] == job["result"]["regions"]
    assert job["result"]["objects"] == [  # in the order they are sent: the SR first
        "sr.dcm",
        "seg.dcm",
        "key-image-1.dcm",
        "key-image-2.dcm",
        "key-image-3.dcm",
    ]
    # kept once: in the store, as instances of their study; only result.json and the masks
    # stay in the output folder
    kept = [node.storage / path for path in job["result"]["files"]]
    assert all(path.is_file() and path.parent.parent.parent == node.storage for path in kept)
    assert not list(output.glob("*.dcm"))
    seg = pydicom.dcmread(kept[1], stop_before_pixels=True)
    assert seg.Modality == "SEG"
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    assert seg.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian

    status = node.status()
    pipelines = {p["name"]: p for p in status["pipelines"]}
    assert pipelines["lung-quant"]["available"] is True
    assert pipelines["lobes"] == {
        "name": "lobes",
        "version": "1.0",
        "available": False,
        "problem": f"model not found at {model}",
    }
    listed = node.cli("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["result"]["regions"] == job["result"]["regions"]
    log = node.log()
    assert "pipeline lobes is unavailable" in log
    # the worker decoded the series as it arrived, and the job read what it had decoded (all
    # of it, or the part decoded before the job started: that depends on the machine's load)
    ahead = re.search(rf"job {job['id']}: (\d+) of {len(files)} files decoded as they arrived", log)
    assert ahead and int(ahead[1]) > 0, log
    assert "decoding ahead" not in log
