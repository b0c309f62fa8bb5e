"""From stored instances to queued work: series and study completion (`completion`), the
routing rules and their engine (`routing`), and the job queue (`queue`)."""
