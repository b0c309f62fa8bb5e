"""Ingest: received bytes -> the instance's metadata and the Part 10 file that is stored.
Shared by every way an instance arrives (C-STORE, STOW-RS) and by the restart check."""
