"""ainode: a chest-CT AI node between the PACS and its AI models.

The packages are the steps of the flow, in order:

    edge      receive: the DICOM door (DIMSE upper layer, storage SCP, SCUs)
    ingest    bytes -> a validated instance, one path for C-STORE, STOW-RS and fetches
    store     keep: durable files, the catalog, the database and its leased queues
    flow      complete -> route -> queue: series completion, routing rules, the job queue
    work      infer -> encode: workers, pipeline runs, outcomes, the input guard, SR/SEG
    delivery  deliver: results to destinations, notifications, audit export, priors fetched
    web       the HTTP face: DICOMweb, the API, the dashboard, health and metrics
    admin     what the CLI and the API report and change
    ops       the floor every step stands on: audit events, metrics, logs, process lifecycle

`config` (typed settings), `service` (the process tree) and `cli` (`ainode`) sit beside them.
The layer rules are import-linter contracts in pyproject.toml.
"""

__version__ = "0.1.0"
