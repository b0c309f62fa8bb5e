"""The storage SCP: accept associations from known peers and hand each instance to the
intake (`node.ingest.intake`), which stores and records it before the answer leaves.

Bytes are stored exactly as received (no decode and re-encode). An association is recorded
with its first instance: a C-ECHO never needs the database, and a database that cannot be
written answers A700 per instance, with nothing left behind.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time

from node.config import InboundTlsSettings, Peer, Settings
from node.edge.acceptor import Acceptor, Association, Limits, Reply, StoreRequest
from node.edge.protocol import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    TEMPORARILY_UNAVAILABLE,
    Rejection,
)
from node.ingest.intake import Answer, Delivery, Intake, Sender, Status
from node.ingest.metadata import InstanceMetadata
from node.ops.lifecycle import CannotListen
from node.ops.metrics import OPEN_ASSOCIATIONS
from node.store.db.models import Source

log = logging.getLogger(__name__)


class StorageSCP:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows."""

    def __init__(self, settings: Settings, intake: Intake) -> None:
        self._settings = settings
        self._intake = intake
        self._peer_addresses = {peer.ae_title: _addresses(peer) for peer in settings.peers.values()}
        self._acceptors: list[Acceptor] = []
        self._deliveries: dict[str, Delivery] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = False

    @property
    def port(self) -> int:
        """The bound port of the first listener (useful when configured as 0)."""
        return self._acceptors[0].port

    def start(self, reuse_port: bool = False) -> None:
        """Bind and serve in background threads: `node.port`, and `node.tls_port` when TLS
        has a port of its own (else TLS is on `node.port`)."""
        node = self._settings.node
        limits = Limits(
            max_pdu_size=node.max_pdu_size,
            max_associations=node.max_associations,
            max_pending=node.max_pending_connections,
            max_dataset_bytes=node.max_instance_mb << 20,
            association_timeout=node.association_timeout_seconds,
            network_timeout=node.network_timeout_seconds,
            min_bytes_per_second=node.min_transfer_kbps * 1024,
            max_per_address=node.max_associations_per_address,
        )
        tls = _server_context(node.tls) if node.tls is not None else None
        listeners = [(node.port, tls if node.tls_port is None else None)]
        if tls is not None and node.tls_port is not None:
            listeners.append((node.tls_port, tls))
        # Every port listens before any is served: a sender that finds one open finds all.
        self._acceptors = [
            _listen(node.host, port, self, limits, reuse_port, context)
            for port, context in listeners
        ]
        for acceptor in self._acceptors:
            thread = threading.Thread(
                target=acceptor.serve_forever, name="scp-listener", daemon=True
            )
            thread.start()
            log.info(
                "listening as %s on %s:%d%s",
                node.ae_title,
                node.host,
                acceptor.port,
                " (TLS)" if acceptor.tls is not None else "",
            )

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Refuse new associations, finish the instances being stored, abort the rest."""
        with self._lock:
            self._stopping = True
        for acceptor in self._acceptors:
            acceptor.stop_listening()
        deadline = time.monotonic() + drain_seconds
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
        time.sleep(0.2)  # let the last responses leave before aborting
        for acceptor in self._acceptors:
            acceptor.abort_all()
        log.info("storage SCP stopped")

    def admit(self, calling_ae: str, called_ae: str, address: str) -> Rejection | None:
        """Addressed to this node, from a known peer on its own host (unless
        `node.accept_unknown_peers`), while there is room to store."""
        node = self._settings.node
        if called_ae != node.ae_title:
            return CALLED_AE_NOT_RECOGNIZED
        if self._stopping or self._intake.problem() is not None:
            return TEMPORARILY_UNAVAILABLE
        addresses = self._peer_addresses.get(calling_ae)
        if addresses is None:
            return None if node.accept_unknown_peers else CALLING_AE_NOT_RECOGNIZED
        host = address.rsplit(":", 1)[0]
        if node.check_peer_address and _normalized(host) not in addresses:
            log.warning(
                "%s connected from %s, but its peer entry's host resolves to %s",
                calling_ae,
                host,
                ", ".join(sorted(addresses)) or "nothing",
            )
            return CALLING_AE_NOT_RECOGNIZED
        return None

    def opened(self, association: Association) -> None:
        sender = Sender(
            association.id,
            association.calling_ae,
            association.called_ae,
            association.address,
            Source.DIMSE,
        )
        with self._lock:
            self._deliveries[association.id] = Delivery(sender)
        OPEN_ASSOCIATIONS.inc()
        log.info(
            "association %s accepted: %s -> %s from %s",
            association.id,
            association.calling_ae,
            association.called_ae,
            association.address,
        )

    def closed(self, association: Association) -> None:
        with self._lock:
            delivery = self._deliveries.pop(association.id, None)
        if delivery is not None:
            OPEN_ASSOCIATIONS.dec()
            self._intake.close(delivery, association.released)

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        with self._lock:
            if self._stopping:
                return Reply(Status.OUT_OF_RESOURCES, "node is shutting down, send again later")
            self._in_flight += 1
            delivery = self._deliveries[association.id]
        try:
            answer = self._intake.accept(
                delivery,
                dataset,
                request.transfer_syntax,
                lambda meta: _mismatch(meta, request),
            )
            return Reply(answer.status, answer.reason)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()


def _mismatch(meta: InstanceMetadata, request: StoreRequest) -> Answer | None:
    """How the dataset contradicts its C-STORE-RQ, if it does."""
    if meta.sop_class_uid != request.sop_class_uid:
        reason = "SOPClassUID of the dataset differs from the Affected SOP Class UID"
    elif meta.key.sop_instance_uid != request.sop_instance_uid:
        reason = "SOPInstanceUID of the dataset differs from the Affected SOP Instance UID"
    else:
        return None
    return Answer(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, reason)


def _addresses(peer: Peer) -> frozenset[str]:
    """The addresses a peer's host resolves to (none, and a warning, if it does not)."""
    try:
        infos = socket.getaddrinfo(peer.host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("peer %s: host %r does not resolve (%s)", peer.ae_title, peer.host, exc)
        return frozenset()
    return frozenset(_normalized(str(info[4][0])) for info in infos)


def _normalized(host: str) -> str:
    """An address as one spelling (an IPv4-mapped IPv6 address as IPv4)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _listen(
    host: str,
    port: int,
    scp: StorageSCP,
    limits: Limits,
    reuse_port: bool,
    context: ssl.SSLContext | None,
) -> Acceptor:
    try:
        return Acceptor((host, port), scp, limits, reuse_port, context)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _server_context(settings: InboundTlsSettings) -> ssl.SSLContext:
    """TLS 1.2 or later; client certificates checked against `ca_file`, required when asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file)
        if settings.ca_file is not None:
            context.load_verify_locations(settings.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CannotListen(f"node.tls: cannot load the certificate, key or CA: {exc}") from exc
    if settings.ca_file is not None:
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
        )
    return context
