"""The worker API's messages (`/api/v1/worker`), shared by the node's routes
(`node.web.workers`) and the remote worker (`node.work.remote`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from node.work.guard import GuardScore
from node.work.outcome import ResultSummary
from node.work.siblings import Reconstruction

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
"""A worker's or a pipeline's name."""


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Field(pattern=NAME, description="the worker's name, unique under its token")
    pipelines: list[Annotated[str, Field(pattern=NAME)]] = Field(min_length=1, max_length=64)
    """The pipelines it runs: it is given jobs of these only."""
    device: str = Field(default="", max_length=200)
    """What it runs them on (e.g. `cuda:0 NVIDIA H100 80GB HBM3, 80 GiB`), for the log."""


class Work(BaseModel):
    """A claimed job: what the worker needs to run it and write a result a local worker
    would have written."""

    job: int
    attempt: int
    pipeline: str
    study_instance_uid: str
    series_instance_uid: str
    revision: int
    instances: list[str]
    """The SOP Instance UIDs of the series revision (WADO-RS may serve newer ones too)."""
    lease_seconds: float
    station: str
    """The node's AE title: the results' Station Name."""
    guard: GuardScore | None
    siblings: list[Reconstruction]


class Failure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detail: str = Field(min_length=1, max_length=2000)
    permanent: bool
    """Bad input or a pipeline that cannot run here: no retry."""


class Ended(BaseModel):
    state: str


class Stored(BaseModel):
    sop_instance_uid: str
    file: str
    """Where the store keeps it, relative to the storage root."""


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: ResultSummary
    objects: list[Annotated[str, Field(max_length=64)]] = Field(max_length=64)
    """The SOP Instance UIDs of the objects uploaded for the job, in dispatch order."""
    embedding: list[float] | None = Field(default=None, max_length=65536)
    profile: list[float] | None = Field(default=None, max_length=65536)
