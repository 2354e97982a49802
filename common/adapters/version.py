"""The installed version of a library fedrad reaches into, checked against the one it was tested with."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from common.errors import IncompatibleVersion


def require_version(distribution: str, tested: str, *, install: str) -> str:
    """The installed version of ``distribution``, when it is ``tested``; else :class:`IncompatibleVersion`.

    Parameters
    ----------
    distribution, tested
        The distribution's name on PyPI (``"flwr"``), and the version fedrad's use of its private APIs was tested with.
    install
        The requirement to install, without the version (``"flwr[simulation]"``), for the error message.
    """
    try:
        installed: str | None = version(distribution)
    except PackageNotFoundError:
        installed = None
    if installed != tested:
        raise IncompatibleVersion(
            f"Expected {distribution} {tested} (the version fedrad was tested with), but "
            f"{'got ' + installed if installed else 'it is not installed'}; "
            f"run `pip install '{install}=={tested}'`"
        )
    return installed
