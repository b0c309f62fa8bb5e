"""The storage SCP: listen, admit associations from known peers, and hand each association
and instance to its handler (ingest's `DimseIntake`, which stores and records an instance
before the answer leaves), as pynetdicom binds handlers to events. It drains the instances in
flight when it stops. The edge knows no database: the handler does.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from typing import Protocol

from node.config import InboundTlsSettings, Peer, Settings
from node.edge.acceptor import Acceptor, Association
from node.edge.commitment import CommitmentReport, EventReportStatus, Reports
from node.edge.limits import Limits
from node.edge.messages import QueryRequest, Reply, StoreRequest
from node.edge.protocol import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    TEMPORARILY_UNAVAILABLE,
    Rejection,
)
from node.edge.qr import Archive, Exchange, QueryRetrieveSCP
from node.edge.status import Status
from node.ops.lifecycle import CannotListen

log = logging.getLogger(__name__)


class InstanceHandler(Protocol):
    """What the storage SCP hands each association and instance to."""

    def problem(self) -> str | None:
        """Why nothing can be stored now (associations are then refused), or None."""

    def opened(self, association: Association) -> None: ...

    def closed(self, association: Association) -> None: ...

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        """Store the instance durably, then answer."""


class StorageSCP:
    """Verification and every Storage SOP class, in every transfer syntax pydicom knows; with
    an `archive`, Query/Retrieve (C-FIND, C-MOVE, C-GET) over what the node holds; with
    `reports`, the storage commitment reports of the peers the node sends to."""

    def __init__(
        self,
        settings: Settings,
        handler: InstanceHandler,
        archive: Archive | None = None,
        reports: Reports | None = None,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._reports = reports
        self._query_retrieve = None if archive is None else QueryRetrieveSCP(settings, archive)
        self._peer_addresses = {peer.ae_title: _addresses(peer) for peer in settings.peers.values()}
        self._acceptors: list[Acceptor] = []
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
        if self._stopping or self._handler.problem() is not None:
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
        self._handler.opened(association)

    def closed(self, association: Association) -> None:
        self._handler.closed(association)

    def query_retrieve(
        self, association: Association, request: QueryRequest, exchange: Exchange
    ) -> None:
        if self._query_retrieve is None:
            comment = "this receiver serves no query/retrieve"
            exchange.respond(Status.SOP_CLASS_NOT_SUPPORTED, comment=comment)
            return
        self._query_retrieve.serve(association.calling_ae, request, exchange)

    def commitment_report(self, association: Association, report: CommitmentReport) -> Reply:
        if self._reports is None:
            comment = "this receiver takes no storage commitment reports"
            return Reply(EventReportStatus.NO_SUCH_SOP_CLASS, comment)
        return self._reports.report(association.calling_ae, report)

    def store(self, association: Association, request: StoreRequest, dataset: bytes) -> Reply:
        with self._lock:
            if self._stopping:
                return Reply(Status.OUT_OF_RESOURCES, "node is shutting down, send again later")
            self._in_flight += 1
        try:
            return self._handler.store(association, request, dataset)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()


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
