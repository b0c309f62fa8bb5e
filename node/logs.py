"""Logging to stderr. Log lines carry UIDs and AE titles, never patient names or IDs."""

from __future__ import annotations

import faulthandler
import logging
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    # A fatal signal (SIGBUS from SQLite's shared memory when its files turn immutable,
    # SIGSEGV in a native library) leaves "Fatal Python error" and the stacks in the log
    # instead of a silent death.
    faulthandler.enable()
    # pynetdicom's own INFO/DEBUG output dumps whole datasets, patient data included, and its
    # ERRORs come with tracebacks of what a peer sent: the node logs each outcome itself.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances reached": a sweep still running when its
    # next turn comes is expected (coalesced); a job's own exception is still logged.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # INFO lines per object built
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Warnings about values quote the values: highdicom's about person names quotes the
    # patient's name, pydicom's about invalid values quote them (patient IDs among them).
    for library in ("highdicom", "pydicom"):
        warnings.filterwarnings("ignore", category=UserWarning, module=rf"{library}(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # it logs those warnings too
