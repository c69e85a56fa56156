"""The buffer manager under the name the user's document uses.

A thin re-export of :mod:`ccat_data_transfer.buffers.cycle`; nothing inside the project
imports this module.
"""

from ccat_data_transfer.buffers.cycle import BufferManager, measure_location, run_once

__all__ = ["BufferManager", "measure_location", "run_once"]
