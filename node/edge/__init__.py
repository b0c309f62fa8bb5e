"""The DICOM edge: the DIMSE upper layer (`acceptor`: PDU codec, limits, state machine;
`protocol`: DIMSE messages), the storage SCP that hands every instance to ingest, the receiver
process that runs it, and the SCUs that echo, send and retrieve. `status` names every DIMSE
status for all of them; sending (`scu`) loads no database code."""
