"""The kinds of work under the name the user's document uses.

A thin re-export of :mod:`ccat_data_transfer.core.operation_types`.
"""

from ccat_data_transfer.core.operation_types import OperationType

__all__ = ["OperationType"]
