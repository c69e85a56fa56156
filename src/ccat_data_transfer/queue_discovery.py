"""Queue names and routing under the name the user's document uses.

A thin re-export of :mod:`ccat_data_transfer.core.queues`; nothing inside the project
imports this module.
"""

from ccat_data_transfer.core.queues import (
    discover_queues,
    queue_name,
    queues_for_location,
    route_task_by_location,
)

__all__ = ["discover_queues", "queue_name", "queues_for_location", "route_task_by_location"]
