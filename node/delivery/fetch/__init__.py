"""Pulling studies from a PACS or a DICOMweb server: `ainode fetch` and the priors of
completed studies, queued and retried like dispatches."""
