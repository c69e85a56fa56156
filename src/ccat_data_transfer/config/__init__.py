"""Configuration of the Data Transfer System (Dynaconf settings)."""

from ccat_data_transfer.core.config import settings

__all__ = ["settings"]
