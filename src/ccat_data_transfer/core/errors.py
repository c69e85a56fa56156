"""Errors a person can act on: the project's one error family.

Every exception class the project defines derives from
:class:`~ccat_ops_db.errors.CcatError` (defined in :mod:`ccat_ops_db.errors`, the bottom
floor, so that the topology's :class:`~ccat_ops_db.errors.TopologyError` is a member too;
``tests/core/test_errors.py`` checks it).  Both, and
:class:`~ccat_ops_db.errors.ConfigurationError`, are importable from here.  The CLI prints
the message of any of them as one line, no traceback (``--verbose`` adds it); the API
answers each with a status code and the message as its reason.

Room in the house: core.
"""

from __future__ import annotations

from ccat_ops_db.errors import CcatError, ConfigurationError, TopologyError

__all__ = [
    "CcatError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "NotFoundError",
    "PermanentError",
    "RetryableError",
    "TopologyError",
    "ValidationError",
]


class DatabaseUnavailableError(CcatError):
    """The operations database cannot be reached."""


class NotFoundError(CcatError):
    """A named thing (location, package, job) does not exist."""


class ValidationError(CcatError):
    """Input was refused; nothing was written."""


class RetryableError(CcatError):
    """A transient failure: the work may succeed if tried again."""


class PermanentError(CcatError):
    """A failure that retrying will not fix."""
