"""Prometheus metrics of every process of the node.

With the HTTP server on, `ainode serve` gives all its processes one directory
(`PROMETHEUS_MULTIPROC_DIR`, prometheus-client's multiprocess mode, set before anything imports
prometheus-client) and `/metrics` sums what they counted; queue depths and free disk are read
when scraped (`node.web.metrics`). Without it the counters stay in each process's memory.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

INSTANCES = Counter(
    "ainode_instances_received",
    "Instances answered, by door (dimse, dicomweb, node) and status (success or why not)",
    ["source", "status"],
)
RECEIVED_BYTES = Counter(
    "ainode_received_bytes", "Bytes of the instances stored, by door", ["source"]
)
OPEN_ASSOCIATIONS = Gauge(
    "ainode_open_associations", "DIMSE associations open now", multiprocess_mode="livesum"
)
COMPLETION_DELAY = Histogram(
    "ainode_series_completion_delay_seconds",
    "From a series' last instance to its completion",
    buckets=SECONDS,
)
JOB_SECONDS = Histogram(
    "ainode_job_duration_seconds",
    "Job time by pipeline and stage (load, the pipeline's own stages, encoding, total)",
    ["pipeline", "stage"],
    buckets=SECONDS,
)
JOBS = Counter("ainode_jobs", "Jobs ended, by pipeline and outcome", ["pipeline", "outcome"])
DISPATCHES = Counter(
    "ainode_dispatch_attempts",
    "Attempts to send results, by destination and outcome",
    ["destination", "outcome"],
)
COMMITMENTS = Counter(
    "ainode_storage_commitments",
    "Storage commitment outcomes of sent results, by destination: committed, failed "
    "(the destination reported failures) or unreported (no report in time)",
    ["destination", "outcome"],
)
FETCHES = Counter("ainode_fetches", "Fetch runs, by source and outcome", ["source", "outcome"])
GPU_MEMORY = Gauge(
    "ainode_gpu_memory_peak_bytes",
    "Peak GPU memory of the last job of each worker",
    ["worker"],
    multiprocess_mode="liveall",
)
