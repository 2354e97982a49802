"""Site data: DICOM ingest and preprocessing, labels, the on-disk cache, the patient split."""

__all__: list[str] = []
