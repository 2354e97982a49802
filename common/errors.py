"""The one error hierarchy of fedrad.

Every error is rooted in a builtin (callers that do not know fedrad can still ``except ValueError``),
and its message says what went wrong and what to do. The CLIs turn any :class:`FedradError` into one
line on stderr and its non-zero ``exit_code``, never a traceback.
"""

from __future__ import annotations


class FedradError(Exception):
    """Base class of all errors fedrad raises on purpose."""

    exit_code: int = 1


class ConfigError(FedradError, ValueError):
    """A configuration value (run config, node config, CLI option) is invalid."""

    exit_code = 2


class DataError(FedradError, ValueError):
    """A site's data cannot be used (missing folder, no usable images, bad labels)."""

    exit_code = 3


class DicomRejected(DataError):
    """One DICOM file cannot be used; the message is the reason."""


class PrivacyBudgetExceeded(FedradError, RuntimeError):
    """Training would take a site beyond its own privacy budget."""

    exit_code = 4

    def __init__(self, message: str, *, spent: float | None = None) -> None:
        super().__init__(message)
        self.spent = spent  # ε already spent on the dataset, when known


class FederationError(FedradError, RuntimeError):
    """A federation process could not be started, reached or finished."""

    exit_code = 5


class AuditFailed(FedradError, RuntimeError):
    """An audit found a problem: a broken ledger, an ε that does not recompute, a budget breach."""

    exit_code = 6


class UpdateOutOfRange(FedradError, ValueError):
    """A model update cannot be encoded for secure aggregation without clipping or overflow."""

    exit_code = 7


class IncompatibleVersion(ConfigError):
    """An installed library is not the version fedrad was tested with (see :mod:`common.adapters`)."""
