"""What one peer may take of the node over DIMSE (`node.*` settings), and the deadline a PDU
or a whole message must meet."""

from __future__ import annotations

from dataclasses import dataclass

PDU_CEILING = 4 << 20
"""The largest PDU the node announces when `max_pdu_size` is 0 ("no limit" in PS3.8)."""
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
MAX_COMMAND_BYTES = 64 << 10
FIRST_READ = 64 << 10
READ_STEP = 1 << 20
"""A PDU body is read into a buffer of `FIRST_READ` bytes that doubles as bytes arrive, by
`READ_STEP` at most: what a peer announces costs nothing until it sends it."""


@dataclass(frozen=True)
class Limits:
    """What one peer may take of the node (`node.*` settings)."""

    max_pdu_size: int = 16384
    max_associations: int = 16
    max_pending: int = 32
    """Connections that have not finished association negotiation."""
    max_dataset_bytes: int = 4 << 30
    association_timeout: float = 30.0
    """ARTIM: the whole A-ASSOCIATE-RQ must have arrived this long after the connection."""
    network_timeout: float = 60.0
    """Each PDU must have arrived whole this long after the node starts waiting for it."""
    min_bytes_per_second: float = 32 * 1024
    """A whole message must arrive at least this fast on average, after `network_timeout`:
    a peer that trickles a few bytes per PDU cannot hold its slot for ever."""
    max_per_address: int = 8
    """Associations one peer address may hold at once."""

    def message_deadline(self, started: float, received: int) -> float:
        """When a message begun at `started`, `received` bytes in, must have arrived whole."""
        return started + self.network_timeout + received / self.min_bytes_per_second

    @property
    def announced_pdu_size(self) -> int:
        return self.max_pdu_size or PDU_CEILING

    @property
    def receive_limit(self) -> int:
        """The largest PDU body accepted: what was announced, with room for a sloppy peer."""
        return 2 * self.announced_pdu_size


class Deadline(TimeoutError):
    """A PDU did not arrive whole in time."""
