"""Errors a person can act on.  The CLI prints their message as one line, no traceback."""

from __future__ import annotations


class CcatError(Exception):
    """Base of all errors with a message meant for an operator."""


class ConfigurationError(CcatError):
    """Settings or topology are wrong."""


class TopologyError(ConfigurationError):
    """The topology file is malformed or inconsistent; nothing was changed."""


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
