"""Database sessions under the name the user's document uses.

A thin re-export of :mod:`ccat_data_transfer.core.database`; nothing inside the project
imports this module.
"""

from ccat_data_transfer.core.database import (
    DatabaseConnection,
    get_engine,
    init_database,
    is_postgresql,
)

__all__ = ["DatabaseConnection", "get_engine", "init_database", "is_postgresql"]
