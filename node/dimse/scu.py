"""The node as a DIMSE client: C-ECHO to configured peers (C-STORE of results comes later)."""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import Peer


@dataclass(frozen=True)
class EchoResult:
    """The outcome of a C-ECHO: `status` is None when no association was made."""

    ok: bool
    status: int | None
    detail: str


def echo(local_ae_title: str, peer: Peer, timeout: float = 10.0) -> EchoResult:
    """Open an association to `peer`, send C-ECHO, release."""
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        return EchoResult(False, None, f"association {reason}: {peer.host}:{peer.port}")
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(response.Status) if "Status" in response else None
    if code is None:
        return EchoResult(False, None, "no response to C-ECHO")
    return EchoResult(code == 0, code, f"status 0x{code:04X}")
