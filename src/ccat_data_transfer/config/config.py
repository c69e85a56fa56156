"""The settings under the name the user's document uses (``ccat_data_transfer.config.config``).

A thin re-export: the settings live in :mod:`ccat_data_transfer.core.config`.
"""

from ccat_data_transfer.core.config import settings

__all__ = ["settings"]
