"""The floor every step stands on: audit events (typed, one model per kind), Prometheus
metrics, one-line logs, the process table and child-process lifecycle, and how the node
names itself on the wire."""
