"""`ainode verify` on a real node's store: clean after a send; then a file deleted, one grown,
one swapped for another's content, one with a byte flipped in place and a stray one added are
each named (by SHA-256 where the size is the same; `--quick` compares sizes only), and nothing
is changed."""

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
    storescu(node.port, [phantom_file(sent, f"{index}.dcm") for index in range(5)])
    wait_until(lambda: sum(s["instances"] for s in node.series().values()) == 5, 30)
    node.stop()

    clean = node.cli("verify", "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["checked"] == 5 and json.loads(clean.stdout)["unhashed"] == 0

    root = Path(node.settings["storage"]["path"])
    deleted, grown, swapped, flipped, donor = sorted(root.glob("*/*/*.dcm"))
    deleted.unlink()
    with grown.open("ab") as file:
        file.write(b"\0" * 2)
    # another instance's content, the same size (UIDs differ in length; so may files)
    uid, their_uid = swapped.stem, swapped.stem[:-1] + ("1" if swapped.stem[-1] != "1" else "2")
    swapped.write_bytes(swapped.read_bytes().replace(uid.encode(), their_uid.encode()))
    with flipped.open("r+b") as file:  # one pixel changed in place: same size, same UID
        file.seek(-1, 2)
        last = file.read(1)
        file.seek(-1, 2)
        file.write(bytes([last[0] ^ 0xFF]))
    stray = root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    stray.parent.mkdir(parents=True)
    shutil.copyfile(donor, stray)

    found = node.cli("verify", "--json")
    assert found.returncode == 1
    report = json.loads(found.stdout)
    tampered = {
        "deleted": deleted, "grown": grown, "swapped": swapped, "flipped": flipped,
        "stray": stray,
    }  # fmt: skip
    relative = {name: str(path.relative_to(root)) for name, path in tampered.items()}
    assert report["missing"] == [relative["deleted"]]
    changed = sorted(relative[name] for name in ("grown", "swapped", "flipped"))
    assert sorted(report["changed"]) == changed
    assert report["mislabelled"] == []
    assert report["unrecorded"] == [relative["stray"]]
    assert report["clean"] is False and report["checked"] == 5
    quick = json.loads(node.cli("verify", "--json", "--quick").stdout)
    assert quick["changed"] == [relative["grown"]]  # sizes only: the flipped byte is missed
    assert quick["mislabelled"] == [relative["swapped"]]
    text = node.cli("verify")
    assert text.returncode == 1 and f"missing: {relative['deleted']}" in text.stdout
    assert "(sizes and SHA-256): problems above" in text.stdout
    assert deleted.exists() is False and stray.exists()  # verify changes nothing
