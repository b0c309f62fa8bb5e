"""The node as a DIMSE client: associations with configured peers, C-ECHO, C-STORE, and the
storage commitment request that follows a C-STORE."""

from __future__ import annotations

import enum
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, Association, _config, evt

from node.config import Peer
from node.edge.commitment import (
    COMMITMENT_SYNTAXES,
    STORAGE_COMMITMENT,
    Reference,
    request_commitment,
)
from node.edge.protocol import VERIFICATION
from node.edge.status import Status, StoreWarning

STORED = {Status.SUCCESS, *StoreWarning}
"""The C-STORE response statuses of an instance the peer kept."""
_config.STORE_SEND_CHUNKED_DATASET = True
"""A file sent by path goes as its stored bytes, read in chunks (not decoded, re-encoded and
held whole in memory); a Dataset is sent as before."""


class CStorePriority(enum.IntEnum):
    """The C-STORE request's Priority (PS3.7 9.1.1.1)."""

    MEDIUM = 0
    HIGH = 1
    LOW = 2


@dataclass(frozen=True)
class EchoResult:
    """The outcome of a C-ECHO: `status` is None when no association was made."""

    ok: bool
    status: int | None
    detail: str


@dataclass(frozen=True)
class StoreResult:
    """The outcome of sending files: ok when every one was stored (success or warning);
    `stored` names the SOP instances the peer acknowledged."""

    ok: bool
    detail: str
    stored: tuple[str, ...] = ()


def _tls_args(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    if peer.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(peer.tls.ca_file))
    if peer.tls.cert_file is not None:
        key = str(peer.tls.key_file) if peer.tls.key_file else None
        context.load_cert_chain(str(peer.tls.cert_file), key)
    return context, peer.host


def associate(
    ae: AE,
    peer: Peer,
    roles: list[Any] | None = None,
    handlers: list[Any] | None = None,
) -> Association | str:
    """An established association with `peer` (with SCP/SCU `roles` and event `handlers`),
    or why there is none. Its socket sends at once (TCP_NODELAY): pynetdicom writes a command
    and its dataset apart, and Nagle's algorithm would hold the second for the peer's delayed
    ACK, some 40 ms a message."""
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=_tls_args(peer),
        ext_neg=roles,
        evt_handlers=[(evt.EVT_CONN_OPEN, _send_at_once), *(handlers or [])],
    )
    if assoc.is_established:
        _answers_only_to_waiters(assoc)
        return assoc
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        return f"association rejected by {where}"
    refused = sorted({UID(cx.abstract_syntax or "").name for cx in assoc.rejected_contexts})
    if refused and not assoc.accepted_contexts:
        return f"{where} accepts none of the SOP classes proposed: {', '.join(refused)}"
    return f"no association with {where} (down, unreachable or aborted)"


def _answers_only_to_waiters(assoc: Association) -> None:
    """Only a caller that waits for a message (a send_* method) takes it off the queue.

    pynetdicom's reactor thread polls the queue, without waiting, for requests to serve.
    A send_* pauses it by clearing a checkpoint and then reading a flag, but the reactor sets
    that flag before its wait. Under load it can slip past the pause and take the response
    itself: "Received unexpected C-STORE service message", and the sender waits out the DIMSE
    timeout (pynetdicom#875). An association this node opens serves no requests: C-GET's
    C-STOREs come to send_c_get's own wait."""
    take = assoc.dimse.get_msg

    def waited_for(block: bool = False) -> Any:
        return take(block=True) if block else (None, None)

    assoc.dimse.get_msg = waited_for  # type: ignore[method-assign]


def _send_at_once(event: evt.Event) -> None:
    connection = event.assoc.dul.socket
    if connection is not None and connection.socket is not None:
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def echo(local_ae_title: str, peer: Peer, timeout: float = 10.0) -> EchoResult:
    """Open an association to `peer`, send C-ECHO, release."""
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = associate(ae, peer)
    if isinstance(assoc, str):
        return EchoResult(False, None, assoc)
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(response.Status) if "Status" in response else None
    if code is None:
        return EchoResult(False, None, "no response to C-ECHO")
    return EchoResult(code == 0, code, f"status 0x{code:04X}")


def store(
    local_ae_title: str,
    peer: Peer,
    files: Sequence[Path],
    timeout: float = 30.0,
    priority: CStorePriority = CStorePriority.MEDIUM,
) -> StoreResult:
    """C-STORE every file in one association. Each SOP class is proposed in each file's own
    transfer syntax and in Explicit VR Little Endian, one presentation context each: a peer
    that takes the file's own syntax gets its bytes as stored (a deflated SEG is a hundredth
    of its size, and nothing is decoded), one that refuses it gets the dataset re-encoded.
    Structured reports go first: small, they are in the PACS while the images follow."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    order = sorted(range(len(files)), key=lambda i: headers[i].get("Modality") != "SR")
    files, headers = [files[i] for i in order], [headers[i] for i in order]
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers}
    contexts |= {(sop_class, ExplicitVRLittleEndian) for sop_class, _ in contexts}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = associate(ae, peer)
    if isinstance(assoc, str):
        return StoreResult(False, assoc)
    accepted = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    stored: list[str] = []
    failures: list[str] = []
    try:
        for path, header in zip(files, headers, strict=True):
            as_stored = (str(header.SOPClassUID), header.file_meta.TransferSyntaxUID) in accepted
            message = path if as_stored else pydicom.dcmread(path)
            response = assoc.send_c_store(message, priority=priority)
            code = int(response.Status) if "Status" in response else None
            if code in STORED:
                stored.append(str(header.SOPInstanceUID))
                continue
            comment = str(response.get("ErrorComment", "")).strip()
            status = "no response" if code is None else f"status 0x{code:04X}"
            failures.append(
                f"{header.SOPInstanceUID}: {status}{f' ({comment})' if comment else ''}"
            )
            if code is None:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    counts = f"{len(stored)} of {len(files)} stored"
    if failures:
        return StoreResult(False, f"{counts}; " + "; ".join(failures), tuple(stored))
    return StoreResult(True, counts, tuple(stored))


def ask_commitment(
    local_ae_title: str,
    peer: Peer,
    transaction_uid: str,
    references: Sequence[Reference],
    timeout: float = 30.0,
) -> str | None:
    """Ask `peer` to commit `references` under `transaction_uid` (an N-ACTION on an
    association of its own, opened once the request is on record, so the report can come
    at once); why it was not taken, or None."""
    ae = AE(ae_title=local_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(STORAGE_COMMITMENT, list(COMMITMENT_SYNTAXES))
    assoc = associate(ae, peer)
    if isinstance(assoc, str):
        return assoc
    try:
        return request_commitment(assoc, transaction_uid, references)
    except ValueError:  # no accepted context for it
        return f"{peer.ae_title} does not accept the Storage Commitment Push Model"
    finally:
        if assoc.is_established:
            assoc.release()
