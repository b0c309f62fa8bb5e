"""Running pipelines: worker processes (`worker`), one pipeline run on one series
(`inference`), a job's outcome written in one transaction (`outcome`), the input guard and
embeddings, the results encoded as DICOM SR, SEG and key images (`results`), model checks
and `ainode run` (`offline`)."""
