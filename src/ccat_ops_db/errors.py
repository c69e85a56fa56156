"""The root of the project's error family, and the topology's error.

Room in the house: ``ccat_ops_db``, the bottom floor, so that both the database package
(topology loading) and ``ccat_data_transfer`` (which re-exports these names from
:mod:`ccat_data_transfer.core.errors`) raise members of one family: ``except CcatError``
catches every error the project defines, :class:`TopologyError` included, while
``ccat_ops_db`` still imports nothing from ``ccat_data_transfer``.
"""

from __future__ import annotations

__all__ = ["CcatError", "ConfigurationError", "TopologyError"]


class CcatError(Exception):
    """Base of every error the project defines; its message is meant for an operator."""


class ConfigurationError(CcatError):
    """Settings or topology are wrong."""


class TopologyError(ConfigurationError, ValueError):
    """The topology is malformed or inconsistent; nothing was changed.  ``problems``
    lists every issue found.  (Also a ValueError, as it was before the family.)"""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            msg = f"{source}: {problems[0]}"
        else:
            msg = f"{source}: {len(problems)} problems: " + "; ".join(problems)
        super().__init__(msg)
