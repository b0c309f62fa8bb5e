"""Where a pipeline runs: `auto` takes the GPU when there is one, else the CPU."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from pipelines.base import DevicePreference

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(preference: DevicePreference) -> torch.device:
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' is configured but no CUDA GPU is available")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def inference_mode(device: torch.device) -> Iterator[None]:
    """No autograd; mixed precision (AMP) on the GPU."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                yield
        else:
            yield


def release(device: torch.device) -> None:
    """Give cached GPU memory back after a job."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_on(preference: DevicePreference, name: str, work: Callable[[torch.device], T]) -> T:
    """`work(device)` on the preferred device; a GPU out-of-memory error reruns it on the CPU."""
    device = resolve_device(preference)
    try:
        return with_cpu_fallback(device, name, work)
    finally:
        release(device)


def with_cpu_fallback(device: torch.device, name: str, work: Callable[[torch.device], T]) -> T:
    """`work(device)`; a GPU out-of-memory error reruns it on the CPU."""
    try:
        return work(device)
    except torch.cuda.OutOfMemoryError:
        log.warning("%s: GPU out of memory; running this series on the CPU", name)
        release(device)
        return work(torch.device("cpu"))
