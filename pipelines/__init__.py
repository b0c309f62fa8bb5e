"""AI pipelines: each turns a complete CT series into structured results."""
