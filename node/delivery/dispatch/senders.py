"""Senders by destination kind: a registry keyed by the destination's config type, so a new
kind (a webhook, a cloud store) is one function and one entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from node.config import DicomWebDestination, Peer
from node.delivery.dispatch.dicomweb import stow
from node.edge.commitment import Reference
from node.edge.scu import CStorePriority, StoreResult, ask_commitment, store
from node.flow.routing.rules import Priority
from node.work.results.files import is_key_image


@dataclass(frozen=True)
class Delivery:
    """What to send and how: every result object of a job (each destination takes what it
    asked for), the dispatch's priority, this node's AE title and the network timeout."""

    files: Sequence[Path]
    priority: int
    ae_title: str
    timeout: float


def send_dimse(peer: Peer, delivery: Delivery) -> StoreResult:
    """C-STORE to a peer; a stat result goes with the request's Priority HIGH."""
    priority = CStorePriority.HIGH if delivery.priority == Priority.STAT else CStorePriority.MEDIUM
    files = wanted(delivery.files, peer.key_images)
    return store(delivery.ae_title, peer, files, delivery.timeout, priority)


def ask_to_commit(peer: Peer, delivery: Delivery, uid: str, stored: Sequence[str]) -> str | None:
    """Ask a DIMSE peer to commit the instances of `delivery` it stored, under `uid`; why it
    did not take the request, or None."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in delivery.files]
    references = [
        Reference(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        for ds in headers
        if str(ds.SOPInstanceUID) in stored
    ]
    return ask_commitment(delivery.ae_title, peer, uid, references, delivery.timeout)


def send_stow(destination: DicomWebDestination, delivery: Delivery) -> StoreResult:
    """STOW-RS to a DICOMweb server."""
    return stow(destination, wanted(delivery.files, destination.key_images), delivery.timeout)


SENDERS: dict[type[Any], Callable[[Any, Delivery], StoreResult]] = {
    Peer: send_dimse,
    DicomWebDestination: send_stow,
}


def send(destination: Peer | DicomWebDestination, delivery: Delivery) -> StoreResult:
    return SENDERS[type(destination)](destination, delivery)


def wanted(files: Sequence[Path], key_images: bool) -> list[Path]:
    """The result objects a destination receives: key images only where it asked for them."""
    return [path for path in files if key_images or not is_key_image(path)]
