"""DICOM ingest: decode one file into model inputs, or reject it with a one-line reason."""

from client.data.dicom.decode import RETRYABLE, DecodedFile, decode_file, quiet_pydicom_log, read_bytes
from client.data.dicom.header import DicomInfo, hash_identifier
from common.errors import DicomRejected

__all__ = [
    "RETRYABLE", "DecodedFile", "DicomInfo", "DicomRejected", "decode_file", "hash_identifier",
    "quiet_pydicom_log", "read_bytes",
]
