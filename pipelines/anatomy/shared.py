"""Each volume's lungs, segmented once and shared by every pipeline that needs them
(lung-quant, the classifiers' lung crop, the nodules' side).

The last volume's masks are kept in memory, bit-packed (a 600-slice series: 60 MB, not 470).
Where the node names a folder per series (`Anatomy(folder_of)`), they are also kept on disk there,
compressed, for the node's other worker processes and for jobs after a restart: a file is
written whole (temp file, then rename) under the folder's lock, so a second process that asks
while the first segments waits for its masks instead of segmenting too."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from pipelines.anatomy.lungs import Lungs, segment_lungs
from pipelines.availability import LUNG_QUANT
from pipelines.base import BadInput
from pipelines.volume import Volume

log = logging.getLogger(__name__)

FolderOf = Callable[[Volume], Path]


@dataclass(frozen=True)
class _Packed:
    """One volume's lungs, bit-packed on the CPU."""

    key: str
    masks: tuple[np.ndarray, ...]
    shape: tuple[int, ...]

    @classmethod
    def of(cls, key: str, lungs: Lungs) -> _Packed:
        masks = tuple(np.packbits(mask.cpu().numpy(), axis=-1) for mask in lungs)
        return cls(key, masks, tuple(lungs.left.shape))

    def unpacked(self, device: torch.device) -> Lungs:
        arrays = (np.unpackbits(m, count=self.shape[-1], axis=-1).view(bool) for m in self.masks)
        return Lungs(*(torch.from_numpy(a).to(device) for a in arrays))


@dataclass(frozen=True)
class _Refused:
    """One volume in which no lungs were found, and why."""

    key: str
    reason: str

    def unpacked(self, device: torch.device) -> Lungs:
        raise BadInput(self.reason)


class Anatomy:
    """The lungs of the last volume asked for, segmented once; with `folder_of`, also kept on
    disk in `folder_of(volume)` for the node's other worker processes and for later jobs.
    One per worker process (or per `ainode run`), handed to each job in its `Context`."""

    def __init__(self, folder_of: FolderOf | None = None) -> None:
        self._folder_of = folder_of
        self._last: _Packed | _Refused | None = None

    def lungs(self, volume: Volume, device: torch.device | None = None) -> Lungs:
        """`segment_lungs` of the volume, segmented once per volume."""
        device = device or torch.device("cpu")
        key = _key(volume)
        if self._last is not None and self._last.key == key:
            return self._last.unpacked(device)
        if self._folder_of is None:
            return self._segmented(volume, key, device)
        folder = self._folder_of(volume)
        path = folder / f"lungs-{key}.npz"
        with _locked(folder, volume.series_instance_uid) as locked:
            packed = _read(path, key, volume.voxels.shape) if locked else None
            if packed is None:
                try:
                    return self._segmented(volume, key, device)
                finally:  # the masks, or why there are none
                    if locked and self._last is not None and self._last.key == key:
                        _write(path, self._last, volume.series_instance_uid)
        log.debug(
            "lungs of series %s: segmented before, read from %s", volume.series_instance_uid, path
        )
        self._last = packed
        return packed.unpacked(device)

    def _segmented(self, volume: Volume, key: str, device: torch.device) -> Lungs:
        """The lungs, segmented and kept in memory; a volume without lungs is kept as such."""
        try:
            found = segment_lungs(torch.from_numpy(volume.voxels).to(device), volume)
        except BadInput as exc:
            self._last = _Refused(key, str(exc))
            raise
        self._last = _Packed.of(key, found)
        return found


def _key(volume: Volume) -> str:
    """The series, its grid and its voxels, and lung-quant's version: any change to the
    volume, or to how lungs are segmented, makes a new key."""
    voxels = np.ascontiguousarray(volume.voxels)
    digest = hashlib.blake2b(voxels.data, digest_size=16)
    digest.update(LUNG_QUANT.version.encode())
    digest.update(f"{volume.series_instance_uid}/{voxels.shape}".encode())
    digest.update(np.ascontiguousarray(volume.affine).tobytes())
    return digest.hexdigest()


@contextmanager
def _locked(folder: Path, series_uid: str) -> Iterator[bool]:
    """Hold `folder`'s lock; yield False (and hold nothing) where it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock: IO[str] | None = open(folder / "lungs.lock", "a")  # noqa: SIM115
    except OSError as exc:
        log.warning("cannot share the lungs of series %s with other jobs: %s", series_uid, exc)
        lock = None
    if lock is None:
        yield False
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path, key: str, shape: tuple[int, ...]) -> _Packed | _Refused | None:
    """The masks kept at `path` (or why there are none), else None: none kept, unreadable."""
    refused = path.with_suffix(".refused")
    if refused.exists():
        return _Refused(key, refused.read_text(encoding="utf-8"))
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as kept:
            masks = tuple(kept[name] for name in Lungs._fields)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("kept lungs %s are unreadable (%s): segmenting again", path.name, exc)
        return None
    packed_shape = (*shape[:-1], (shape[-1] + 7) // 8)
    if any(mask.shape != packed_shape or mask.dtype != np.uint8 for mask in masks):
        log.warning("kept lungs %s do not fit the volume: segmenting again", path.name)
        return None
    return _Packed(key, masks, shape)


def _write(path: Path, kept: _Packed | _Refused, series_uid: str) -> None:
    """Keep `kept` at `path` (a refusal beside it), whole or not at all; a full disk costs
    only the sharing."""
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            if isinstance(kept, _Refused):
                file.write(kept.reason.encode())
                path = path.with_suffix(".refused")
            else:
                left, right, airway, aerated = kept.masks
                np.savez_compressed(file, left=left, right=right, airway=airway, aerated=aerated)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        log.warning("cannot share the lungs of series %s with other jobs: %s", series_uid, exc)
