"""Inbound DIMSE TLS on a port of its own, with real clients: DCMTK storescu (+tls) and
pynetdicom. A client with a certificate from the node's CA is served; one from another CA,
or with none when one is required, is refused; the plain port works as before."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.node.edge.test_scp import StartNode, echo, phantom_file
from tests.peers import DCMTK_ENV, dcmtk, free_port


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def certificate(folder: Path, name: str, ca: str | None, ip: str | None = None) -> None:
    """`name`.key and `name`.crt: self-signed (a CA) or signed by `ca`."""
    subject = f"/CN={name}"
    if ca is None:
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", subject,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder,
        )  # fmt: skip
        return
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", subject, cwd=folder,
    )  # fmt: skip
    extensions = folder / f"{name}.ext"
    extensions.write_text(f"subjectAltName=IP:{ip}\n" if ip else "basicConstraints=CA:FALSE\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", extensions.name,
        cwd=folder,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    folder.mkdir()
    certificate(folder, "ca", None)
    certificate(folder, "node", "ca", ip="127.0.0.1")
    certificate(folder, "modality", "ca")
    certificate(folder, "rogue-ca", None)
    certificate(folder, "rogue", "rogue-ca")
    return folder


def store_over_tls(port: int, pki: Path, dataset: Path, *client: str) -> str:
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "AINODE", *client,
         "+cf", str(pki / "ca.crt"), "127.0.0.1", str(port), str(dataset)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def test_tls_clients_of_the_nodes_ca_are_served_others_refused(
    start_node: StartNode, pki: Path, tmp_path: Path
) -> None:
    tls_port = free_port()
    node = start_node(
        node={
            "tls": {
                "cert_file": str(pki / "node.crt"),
                "key_file": str(pki / "node.key"),
                "ca_file": str(pki / "ca.crt"),
                "require_client_cert": True,
            },
            "tls_port": tls_port,
        },
        workers={"count": 0},
    )
    phantom = phantom_file(tmp_path)

    trusted = store_over_tls(
        tls_port, pki, phantom, "+tls", str(pki / "modality.key"), str(pki / "modality.crt")
    )
    assert trusted.startswith("rc=0"), trusted
    assert len(list(node.storage.rglob("*.dcm"))) == 1

    rogue = store_over_tls(
        tls_port, pki, phantom, "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt")
    )
    assert not rogue.startswith("rc=0"), rogue
    anonymous = store_over_tls(tls_port, pki, phantom, "+tla")
    assert not anonymous.startswith("rc=0"), anonymous
    assert "TLS handshake failed" in node.log()

    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "modality.crt"), str(pki / "modality.key"))
    context.check_hostname = False
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", tls_port, ae_title="AINODE", tls_args=(context, None))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    assert echo(node.port).returncode == 0  # the plain port is unchanged


def test_a_port_in_use_or_unreadable_tls_files_refuse_start_with_the_reason(
    start_node: StartNode, pki: Path
) -> None:
    """One line naming the port or the TLS files and exit status 1, no traceback."""
    node = start_node(workers={"count": 0})
    node.stop()

    def serve() -> subprocess.CompletedProcess[str]:
        node.config_path.write_text(yaml.safe_dump(node.settings))
        return subprocess.run(
            [sys.executable, "-m", "node", "serve", "--config", str(node.config_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", node.port))
        holder.listen()
        busy = serve()
    assert busy.returncode == 1, busy.stderr
    assert f"not starting: cannot listen on 127.0.0.1:{node.port}" in busy.stderr
    assert "Traceback" not in busy.stderr

    node.settings["node"]["tls"] = {
        "cert_file": str(pki / "missing.crt"),
        "key_file": str(pki / "node.key"),
    }
    unreadable = serve()
    assert unreadable.returncode == 1, unreadable.stderr
    assert "not starting: node.tls: cannot load" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr
