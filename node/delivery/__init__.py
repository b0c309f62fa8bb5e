"""Getting things out and in on a schedule, each a leased queue: results sent to
destinations (`dispatch`), notifications (`notify`), the audit trail to syslog
(`audit_export`), and studies and priors pulled from the PACS (`fetch`)."""
