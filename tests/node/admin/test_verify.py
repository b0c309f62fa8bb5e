"""`ainode verify` on a real node's store: clean after a send; then a file deleted, one grown,
one swapped for another's content and a stray one added are each named, and nothing is
changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.node.edge.test_scp import phantom_file
from tests.peers import storescu, wait_until


def test_verify_names_what_the_store_and_the_catalog_disagree_on(
    start_node, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0})
    sent = tmp_path / "sent"
    sent.mkdir()
    storescu(node.port, [phantom_file(sent, f"{index}.dcm") for index in range(4)])
    wait_until(lambda: sum(s["instances"] for s in node.series().values()) == 4, 30)
    node.stop()

    clean = node.cli("verify", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["checked"] == 4

    root = Path(node.settings["storage"]["path"])
    deleted, grown, swapped, donor = sorted(root.glob("*/*/*.dcm"))
    deleted.unlink()
    with grown.open("ab") as file:
        file.write(b"\0" * 2)
    shutil.copyfile(donor, swapped)  # same size, another instance's content
    stray = root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    stray.parent.mkdir(parents=True)
    shutil.copyfile(donor, stray)

    found = node.cli("verify", "--json")
    assert found.returncode == 1
    report = json.loads(found.stdout)
    tampered = {"deleted": deleted, "grown": grown, "swapped": swapped, "stray": stray}
    relative = {name: str(path.relative_to(root)) for name, path in tampered.items()}
    assert report["missing"] == [relative["deleted"]]
    assert report["changed"] == [relative["grown"]]
    assert report["mislabelled"] == [relative["swapped"]]
    assert report["unrecorded"] == [relative["stray"]]
    assert report["clean"] is False and report["checked"] == 4
    text = node.cli("verify")
    assert text.returncode == 1 and f"missing: {relative['deleted']}" in text.stdout
    assert deleted.exists() is False and stray.exists()  # verify changes nothing
