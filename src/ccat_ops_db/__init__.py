"""ccat_ops_db: the operations database of the observatory Data Transfer System.

``ccat_ops_db.models`` holds the tables and enums; ``ccat_ops_db.migrations`` the Alembic
migrations; ``ccat_ops_db.topology`` loads sites, locations and routes from a TOML file;
``ccat_ops_db.names`` is the one rule of temporary names (shared with the storage code).
"""

from ccat_ops_db import models

__all__ = ["models"]
