"""Enrollment, run by the coordinator's operator: consortium CA, site registry and site kits."""

from server.enroll.consortium import Consortium, Rekeyed

__all__ = ["Consortium", "Rekeyed"]
