"""The kinds of work a worker does; each is part of a queue name."""

from __future__ import annotations

import enum


class OperationType(enum.Enum):
    RAW_DATA_PACKAGE_CREATION = "raw_data_package_creation"
    DATA_TRANSFER_PACKAGE_CREATION = "data_transfer_package_creation"
    DATA_TRANSFER = "data_transfer"
    DATA_TRANSFER_UNPACKING = "data_transfer_unpacking"
    LONG_TERM_ARCHIVE_TRANSFER = "long_term_archive_transfer"
    # Proof and fixity of archive copies, run by a worker at the archive's site.
    ARCHIVE_VERIFICATION = "archive_verification"
    STAGING = "staging"
    DELETION = "deletion"
    BUFFER_MONITORING = "buffer_monitoring"

    def __str__(self) -> str:
        return self.value
