"""The series input guard inside a real `ainode serve`, fed by DCMTK storescu: ct-embedding
(a small CT-FM encoder) embeds three reference chest phantoms, `ainode guard fit` makes them
the site's reference, and a rule runs `echo` only on series the guard passed. A chest like
the reference is routed again once scored and runs `echo`, whose SR (dciodvfy-clean) reports
the guard's evaluation; a chest-sized block with no lungs is held, and `ainode status` says
so."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pytest

from tests.dicom_checks import qualitative_evaluations, validate
from tests.e2e.test_routing import jobs_of, uid_of
from tests.models import ct_fm_embedding
from tests.peers import NodeProcess, storescu, wait_until
from tests.phantoms import chest, chest_geometry, write_series

RULES = """
rules:
  - name: embed
    match: {Modality: CT}
    pipelines: [ct-embedding]
  - name: like-the-reference
    match: {guard_distance: {le: 1.5}}
    pipelines: [echo]
"""


def solid_block(points):
    """Soft tissue the size of a chest, with no lungs: not what the reference holds."""
    hu = chest()(points)
    hu[hu < -500] = 40.0
    hu[(points[..., 0] / 150) ** 2 + (points[..., 1] / 110) ** 2 > 1] = -1000.0
    return hu


def succeeded(node: NodeProcess, uid: str, pipeline: str) -> dict | None:
    found = [j for j in jobs_of(node, uid) if j["pipeline"] == pipeline]
    return found[0] if found and found[0]["state"] == "succeeded" else None


@pytest.mark.slow
def test_the_guard_holds_a_series_unlike_the_reference_and_passes_one_like_it(
    start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    node = start_node(
        routing={"rules_file": str(rules)},
        pipelines={"ct-embedding": ct_fm_embedding(tmp_path, 4.0)},
    )
    geometry = chest_geometry()
    shifts = [(-8, 0), (0, 6), (8, -6)]
    reference = [
        write_series(tmp_path / f"ref-{i}", geometry, chest((60 + dx, dy, 0), (-60 + dx, dy, 0)))
        for i, (dx, dy) in enumerate(shifts)
    ]
    for files in reference:
        storescu(node.port, files)
    uids = [uid_of(files) for files in reference]
    for uid in uids:
        wait_until(lambda uid=uid: succeeded(node, uid, "ct-embedding"), timeout=120, interval=1)
    assert all(jobs_of(node, uid)[0]["pipeline"] == "ct-embedding" for uid in uids)
    assert not any(j["pipeline"] == "echo" for uid in uids for j in jobs_of(node, uid))

    listing = tmp_path / "reference.txt"
    listing.write_text("# the site's chest CTs\n" + "\n".join(uids) + "\n")
    fitted = node.cli("guard", "fit", "--series-list", str(listing), "--json")
    assert fitted.returncode == 0, fitted.stderr
    answer = json.loads(fitted.stdout)
    assert answer["pipeline"] == "ct-embedding" and answer["scored"] == 3
    assert sorted(answer["held_out"]) == sorted(uids)

    like = write_series(tmp_path / "like", geometry, chest((62, 3, 0), (-58, 3, 0)))
    unlike = write_series(tmp_path / "unlike", geometry, solid_block)
    storescu(node.port, like)
    storescu(node.port, unlike)
    echo = wait_until(lambda: succeeded(node, uid_of(like), "echo"), timeout=120, interval=1)
    held = wait_until(
        lambda: succeeded(node, uid_of(unlike), "ct-embedding"), timeout=120, interval=1
    )
    assert held["result"]["guard_distance"] > 1.5
    assert held["result"]["guard_threshold"] == 1.5
    embedded = succeeded(node, uid_of(like), "ct-embedding")
    assert embedded is not None and embedded["result"]["guard_distance"] <= 1.5

    status = node.status()
    series = {s["series_instance_uid"]: s for s in status["series"]}
    assert series[uid_of(unlike)]["guard_distance"] == held["result"]["guard_distance"]
    (guard,) = status["guards"]
    assert guard["reference_series"] == 3 and guard["scored"] == 5 and guard["unlike"] == 1
    routed = f"series {uid_of(unlike)} revision 1 routed"
    wait_until(lambda: node.log().count(routed) == 2, timeout=30, interval=0.5)  # scored
    assert [j["pipeline"] for j in jobs_of(node, uid_of(unlike))] == ["ct-embedding"]

    (report_path,) = [node.storage / path for path in echo["result"]["files"]]
    validate(report_path)
    evaluations = qualitative_evaluations(hd.sr.srread(report_path))
    verdict, distance = evaluations["Series like the site's reference series"]
    assert verdict == "Present"
    assert distance == pytest.approx(embedded["result"]["guard_distance"], abs=1e-3)
